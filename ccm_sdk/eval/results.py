"""What an evaluation produces: one row of scores per cell, and the whole result with what it was scored against.

The runner (runner.py) makes them, progress.py keeps finished rows on disk, report.py writes them out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .report import write_report

if TYPE_CHECKING:
    from .config import EvalConfig


@dataclass
class EvalRow:
    """One method at one step count on one condition."""

    method: str
    sampler: str
    steps: int
    condition: str
    nfe: int  # network evaluations per image (a CFG step counts two)
    seconds_per_image: float  # wall time of the pipeline calls (warm-up excluded) / images
    fid: float
    fidelity: float
    num_samples: int
    # standard error of the Fidelity mean over the images scored (std / sqrt(n)); NaN with fewer than two
    fidelity_sem: float = float("nan")
    line_f1: float = float("nan")  # mean line F1 of h(y) against c, where the condition asks for it (higher is better)
    colour_accuracy: float = float("nan")  # share of regions in the asked colour, where the dataset knows them (colour.py)
    shape_accuracy: float = float("nan")  # share of objects in the asked shape, where the dataset knows them (shape.py)
    limb_accuracy: float = float("nan")  # share of figures' limbs the dataset's pose estimator finds (limbs.py)


@dataclass
class EvalResult:
    config: EvalConfig
    rows: list[EvalRow]
    real_fidelity: dict[str, float]  # h(x_real) against c: 0 for extracted controls, the floor for dataset maps
    reals: torch.Tensor  # the first ``show`` real images
    controls: dict[str, torch.Tensor]  # per condition, the first ``show`` control maps
    samples: dict[tuple[str, int, str], torch.Tensor] = field(default_factory=dict)  # (method, steps, condition)
    # h(flat image) against c, where each real image is replaced by its mean colour: what an image with
    # no content scores (on sparse maps such as edges, an empty h(y) scores the share of lines in c)
    flat_fidelity: dict[str, float] = field(default_factory=dict)
    real_line_f1: dict[str, float] = field(default_factory=dict)  # h(x_real)'s line F1 against c, per line_f1 condition
    correlations: list[Any] = field(default_factory=list)  # CorrelationResult per config.correlation entry
    feature_extractor: str = ""
    real_colour_accuracy: float = float("nan")  # the real images' colour accuracy (NaN: the dataset has no colour targets)
    real_shape_accuracy: float = float("nan")  # the real images' shape accuracy (NaN: the dataset has no shape targets)
    real_limb_accuracy: float = float("nan")  # the real images' limb accuracy (NaN: the dataset has no limb targets)
    # FID of a second, disjoint set of real images of the same size against the first: what two samples
    # of the very same distribution score at this sample count (NaN: the dataset is too small)
    fid_floor: float = float("nan")
    columns: ClassVar[tuple[str, ...]] = tuple(f.name for f in fields(EvalRow))  # of the rows' table (results.csv)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [asdict(r) for r in self.rows],
            "real_fidelity": self.real_fidelity,
            "flat_fidelity": self.flat_fidelity,
            "real_line_f1": self.real_line_f1,
            "real_colour_accuracy": self.real_colour_accuracy,
            "real_shape_accuracy": self.real_shape_accuracy,
            "real_limb_accuracy": self.real_limb_accuracy,
            "fid_floor": self.fid_floor,
            "features": self.feature_extractor,
            "correlation": [c.to_dict() for c in self.correlations],
            "config": self.config.model_dump(mode="json"),
        }

    def write(self, output_dir=None) -> dict[str, Any]:
        """results.md, results.csv, results.json, samples.png, metrics.png (+ correlation_<i>.png/json)."""
        return write_report(self, output_dir or self.config.output_dir)
