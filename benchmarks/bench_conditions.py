"""Throughput of every condition (images/s at 512x512 on CPU) and canny beside controlnet_aux's.

    .venv/bin/python benchmarks/bench_conditions.py [--size 512] [--batch 2] [--seconds 2]

Model-backed conditions run full-size networks of the real architectures (HED as ControlNet
ships it, Depth Anything small, ViTPose base) with random weights unless --hed-model,
--depth-model or --pose-model name real checkpoints: the compute is the same, the maps are not.
Canny is timed in the same run beside controlnet_aux's CannyDetector and a bare cv2.Canny loop,
and printed as ratios. controlnet_aux is not a dependency: it is used if importable (its canny
module alone is loaded when the package's __init__ fails on its heavier optional imports).
"""

from __future__ import annotations

import argparse
import os
import importlib
import importlib.util
import sys
import tempfile
import time
import types
from pathlib import Path

import cv2
import numpy as np
import torch

import ccm_sdk
from ccm_sdk.conditions.mask import random_masks
from ccm_sdk.testing.conditions import sample_photos


def throughput(fn, images_per_call: int, seconds: float, min_calls: int = 3) -> float:
    """Images per second of ``fn()`` after one warm-up call, over at least ``seconds``."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls * images_per_call / (time.perf_counter() - start)


def load_controlnet_aux_canny():
    """controlnet_aux's CannyDetector class, or (None, why)."""
    try:
        from controlnet_aux import CannyDetector

        return CannyDetector, "controlnet_aux"
    except Exception as exc:  # its __init__ imports every detector (timm, torchvision, ...)
        first_error = f"{type(exc).__name__}: {exc}"
    spec = importlib.util.find_spec("controlnet_aux") if "controlnet_aux" not in sys.modules else None
    if spec is None or not spec.submodule_search_locations:
        return None, f"controlnet_aux is not importable ({first_error})"
    # Import only controlnet_aux.canny (cv2, numpy, PIL, and controlnet_aux.util) under an empty parent package.
    for name in [m for m in sys.modules if m == "controlnet_aux" or m.startswith("controlnet_aux.")]:
        del sys.modules[name]
    package = types.ModuleType("controlnet_aux")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["controlnet_aux"] = package
    try:
        module = importlib.import_module("controlnet_aux.canny")
    except Exception as exc:
        return None, f"controlnet_aux.canny is not importable ({type(exc).__name__}: {exc})"
    return (
        module.CannyDetector,
        f"controlnet_aux.canny alone (package import failed: {first_error.splitlines()[0][:90]})",
    )


def model_sources(args, names: list[str], workdir: Path) -> dict[str, str]:
    """Real checkpoints from the command line, else full-size random networks saved to ``workdir``."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    sources: dict[str, str] = {}
    if "hed" in names:
        import ccm_condition_hed as hed

        if args.hed_model is None:
            torch.manual_seed(0)
            hed.save_hed(hed.HEDNetwork(), workdir / "hed")
        sources["hed"] = args.hed_model or str(workdir / "hed")
    if "depth" in names:
        if args.depth_model is None:
            from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

            torch.manual_seed(0)
            DepthAnythingForDepthEstimation(DepthAnythingConfig()).save_pretrained(workdir / "depth")
        sources["depth"] = args.depth_model or str(workdir / "depth")
    if "pose" in names:
        if args.pose_model is None:
            from transformers import VitPoseConfig, VitPoseForPoseEstimation

            torch.manual_seed(0)
            VitPoseForPoseEstimation(VitPoseConfig(num_labels=17)).save_pretrained(workdir / "pose")
        sources["pose"] = args.pose_model or str(workdir / "pose")
    return sources


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per entry")
    parser.add_argument("--conditions", nargs="*", help="names to run (default: all registered)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--hed-model")
    parser.add_argument("--depth-model")
    parser.add_argument("--pose-model")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = sample_photos((args.size, args.size), args.batch)
    names = args.conditions or ccm_sdk.registry.conditions.names()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, opencv {cv2.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
        f"{args.batch} photos of {args.size}x{args.size} per call, CPU"
    )
    print(f"{'condition':<10} {'images/s':>10} {'ms/image':>10}  notes")
    with tempfile.TemporaryDirectory() as tmp:
        sources = model_sources(args, names, Path(tmp))
        for name in names:
            options, kwargs, note = {}, {}, ""
            if name in sources:
                options["model"] = sources[name]
                given = getattr(args, f"{name}_model")
                note = given if given else "random weights, full-size architecture"
            if name == "mask":
                kwargs["mask"] = random_masks(args.batch, args.size, args.size, seed=0)
            condition = ccm_sdk.get_condition(name, **options)
            rate = throughput(lambda c=condition, kw=kwargs: c(images, **kw), args.batch, args.seconds)
            print(f"{name:<10} {rate:>10.1f} {1000 / rate:>10.1f}  {note}")

    # canny side by side, same photos, one image at a time for all three (controlnet_aux takes one)
    print("\ncanny, one image per call, same photos:")
    as_uint8 = [(im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for im in images]
    ours = ccm_sdk.get_condition("canny", low_threshold=100, high_threshold=200)
    rates = {
        "ccm_sdk canny (tensor in/out)": throughput(lambda: [ours(a[None]) for a in images], len(images), args.seconds),
        "ccm_sdk canny (numpy uint8 in, PIL out)": throughput(
            lambda: [ours(a, output_type="pil") for a in as_uint8], len(images), args.seconds
        ),
        "bare cv2.Canny on uint8": throughput(
            lambda: [cv2.Canny(a, 100, 200) for a in as_uint8], len(images), args.seconds
        ),
    }
    detector_cls, how = load_controlnet_aux_canny()
    if detector_cls is not None:
        detector = detector_cls()
        print(f"  controlnet_aux: {how}")
        rates["controlnet_aux CannyDetector"] = throughput(
            lambda: [detector(a, 100, 200, detect_resolution=args.size, image_resolution=args.size) for a in as_uint8],
            len(images),
            args.seconds,
        )
    else:
        print(f"  controlnet_aux: not run: {how}")
    reference_name = next((k for k in rates if k.startswith("controlnet_aux")), "bare cv2.Canny on uint8")
    reference = rates[reference_name]
    for label, rate in rates.items():
        print(f"  {label:<42} {rate:>8.1f} images/s  {rate / reference:>5.2f}x")
    print(f"  (ratios relative to: {reference_name})")


if __name__ == "__main__":
    main()
