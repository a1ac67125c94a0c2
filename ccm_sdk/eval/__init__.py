"""Evaluation: FID, Fidelity, NFE and time per method and condition (CCM's Table 2), and the analyses.

    from ccm_sdk.eval import load_eval_config, run_evaluation
    result = run_evaluation(load_eval_config("configs/eval/world_table2.yaml"))
    result.write("outputs/eval")        # results.md / .csv / .json, samples.png, metrics.png

or ``ccm eval --config FILE``; see docs/evaluation.md. Imports are lazy, so the ``ccm`` command
starts fast.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "analysis": (
        "CorrelationResult", "compare_controlnets", "controlnet_residuals", "correlation_analysis", "cosine_similarity",
        "radial_spectrum", "reverse_transfer_method",
    ),
    "colour": ("ColourTargets", "colour_accuracy", "region_colours", "region_hits"),
    "config": ("PRESETS", "TABLE2_PRESETS", "EvalConfig", "MethodConfig", "PaperModels", "expand_methods", "load_eval_config"),
    "feature_net": ("FeatureNetExtractor", "SmallFeatureNet", "train_feature_net"),
    "features": ("FeatureExtractor", "ModuleExtractor", "PixelExtractor", "extract_features", "load_extractor"),
    "fid": ("FeatureStatistics", "feature_statistics", "fid_from_features", "frechet_distance", "sqrtm_psd"),
    "fidelity": ("fidelity", "fidelity_per_image"),
    "limbs": ("LimbTargets", "limb_accuracy", "limb_hits"),
    "inception": ("FIDInceptionV3", "InceptionExtractor", "convert_pytorch_fid_weights"),
    "results": ("EvalResult", "EvalRow"),
    "runner": ("run_evaluation",),
    "shape": ("ShapeTargets", "object_match", "shape_accuracy", "shape_hits"),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
