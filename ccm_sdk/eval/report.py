"""Writing an EvalResult: a Table-2-style markdown table, a CSV, JSON, sample grids and bar charts."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .figures import save_figure

if TYPE_CHECKING:
    from .results import EvalResult, EvalRow


def _number(value: float, digits: int) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _groups(rows: list[EvalRow]) -> list[tuple[str, int]]:
    """(method, steps) in the order they were run."""
    return list(dict.fromkeys((r.method, r.steps) for r in rows))


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def markdown_table(result: EvalResult) -> str:
    """| method | steps | NFE | time (s) | <condition> FID / Fidelity ... | mean |, plus the real and flat-image references."""
    conditions = [c.title for c in result.config.conditions]
    header = ["method", "steps", "NFE", "time (s)", *conditions, "mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, steps in _groups(result.rows):
        rows = {r.condition: r for r in result.rows if r.method == method and r.steps == steps}
        nfes = sorted({r.nfe for r in rows.values()})
        cells = [method, str(steps), "/".join(map(str, nfes)), _number(_mean([r.seconds_per_image for r in rows.values()]), 3)]
        for title in conditions:
            row = rows.get(title)
            cells.append("" if row is None else f"{_number(row.fid, 2)} / {_number(row.fidelity, 3)}")
        cells.append(f"{_number(_mean([r.fid for r in rows.values()]), 2)} / {_number(_mean([r.fidelity for r in rows.values()]), 3)}")
        lines.append("| " + " | ".join(cells) + " |")
    floor = [f"- / {_number(result.real_fidelity[t], 3)}" for t in conditions]
    lines.append("| real images (Fidelity floor) | - | - | - | " + " | ".join(floor) + f" | - / {_number(_mean(list(result.real_fidelity.values())), 3)} |")
    if result.flat_fidelity:
        flat = [f"- / {_number(result.flat_fidelity[t], 3)}" for t in conditions]
        mean = _number(_mean(list(result.flat_fidelity.values())), 3)
        lines.append("| flat images (mean colour, no content) | - | - | - | " + " | ".join(flat) + f" | - / {mean} |")
    return "\n".join(lines)


def line_f1_table(result: EvalResult) -> str:
    """| method | steps | <line condition> F1 ... |, plus the real images' F1; "" when no condition asks for it."""
    specs = [c for c in result.config.conditions if c.line_f1 is not None]
    if not specs:
        return ""
    header = ["method", "steps", *(f"{c.title} (±{c.line_f1.tolerance} px)" for c in specs)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, steps in _groups(result.rows):
        rows = {r.condition: r for r in result.rows if r.method == method and r.steps == steps}
        cells = ["" if c.title not in rows else _number(rows[c.title].line_f1, 3) for c in specs]
        lines.append(f"| {method} | {steps} | " + " | ".join(cells) + " |")
    lines.append("| real images | - | " + " | ".join(_number(result.real_line_f1.get(c.title, float("nan")), 3) for c in specs) + " |")
    return "\n".join(lines)


def _measure_table(result: EvalResult, column: str, real: float) -> str:
    """| method | steps | <condition> ... | of one per-cell measure (an EvalRow field), plus the real images'; "" when none was scored."""
    if not any(math.isfinite(getattr(r, column)) for r in result.rows) and not math.isfinite(real):
        return ""
    conditions = [c.title for c in result.config.conditions]
    lines = ["| method | steps | " + " | ".join(conditions) + " |", "|" + "---|" * (len(conditions) + 2)]
    for method, steps in _groups(result.rows):
        rows = {r.condition: r for r in result.rows if r.method == method and r.steps == steps}
        lines.append(f"| {method} | {steps} | " + " | ".join("" if t not in rows else _number(getattr(rows[t], column), 3) for t in conditions) + " |")
    lines.append("| real images | - | " + " | ".join(_number(real, 3) for _ in conditions) + " |")
    return "\n".join(lines)


def colour_table(result: EvalResult) -> str:
    """| method | steps | <condition> colour accuracy ... |, plus the real images'; "" when the dataset has no colour targets."""
    return _measure_table(result, "colour_accuracy", result.real_colour_accuracy)


def shape_table(result: EvalResult) -> str:
    """| method | steps | <condition> shape accuracy ... |, plus the real images'; "" when the dataset has no shape targets."""
    return _measure_table(result, "shape_accuracy", result.real_shape_accuracy)


def limb_table(result: EvalResult) -> str:
    """| method | steps | <condition> limb accuracy ... |, plus the real images'; "" when the dataset has no limb targets."""
    return _measure_table(result, "limb_accuracy", result.real_limb_accuracy)


def fidelity_noise(rows: list[EvalRow]) -> str:
    """One sentence on the Fidelity column's sampling noise (its standard errors), or "" when none is known."""
    errors = sorted(r.fidelity_sem for r in rows if r.fidelity_sem is not None and math.isfinite(r.fidelity_sem))
    if not errors:
        return ""
    spread = _number(errors[0], 4) if errors[0] == errors[-1] else f"{_number(errors[0], 4)} to {_number(errors[-1], 4)}"
    return (
        f"Fidelity's standard error (standard deviation over a cell's images / sqrt(images)) is {spread} here: "
        "two Fidelity values closer than about twice that are not told apart by this many samples."
    )


def _markdown(result: EvalResult) -> str:
    config = result.config
    parts = [
        "# Evaluation results",
        "",
        f"FID / Fidelity per condition (lower is better); {config.num_samples} samples per cell, FID in "
        f"`{result.feature_extractor}` features against the dataset's real images; Fidelity is the mean absolute "
        "difference between h(y) and the control map, in [0, 1] units (docs/evaluation.md). NFE is network "
        "evaluations per image; time is wall-clock seconds per image on this machine.",
        "",
        markdown_table(result),
    ]
    if math.isfinite(result.fid_floor):
        parts += ["", f"FID floor: a second set of {config.num_samples} real images against the first scores "
                  f"{_number(result.fid_floor, 2)}; FID differences well inside that are sampling noise at this size."]  # fmt: skip
    if noise := fidelity_noise(result.rows):
        parts += ["", noise]
    if lines := line_f1_table(result):
        parts += ["", "Line F1 (higher is better): how many of c's lines h(y) draws and how many of h(y)'s lines are in c, "
                  "within the tolerance shown; an empty h(y) scores 0 where Fidelity would reward it.", "", lines]  # fmt: skip
    if colours := colour_table(result):
        parts += ["", "Colour accuracy (higher is better): the share of regions (the background and each object, from the "
                  "dataset's labels) whose mean generated colour is nearest to the colour the caption asks for.", "", colours]  # fmt: skip
    if shapes := shape_table(result):
        parts += ["", "Shape accuracy (higher is better): the share of objects whose generated segment (the pixels nearer the "
                  "object's mean colour than the background's, around its place) matches the shape the caption names better "
                  "than every other shape of the vocabulary drawn at the same place, with IoU at least 0.5.", "", shapes]  # fmt: skip
    if limbs := limb_table(result):
        parts += ["", "Limb accuracy (higher is better): the share of the figures' arms and legs that the dataset's pose "
                  "estimator finds in the generated image (line pixels along at least 60% of the limb, within 1 px).", "", limbs]  # fmt: skip
    for i, analysis in enumerate(result.correlations):
        parts += ["", f"## Correlation: {analysis.label_a} vs {analysis.label_b}", "",
                  "| depth | " + " | ".join(analysis.names) + " |", "|---|" + "---|" * len(analysis.names),
                  "| cosine | " + " | ".join(_number(v, 3) for v in analysis.cosine_mean) + " |",
                  "", f"![correlation](correlation_{i}.png)"]  # fmt: skip
    parts += ["", "![samples](samples.png)", "", "![metrics](metrics.png)", ""]
    return "\n".join(parts)


def _strip(images: torch.Tensor) -> np.ndarray:
    """[n, C, H, W] -> one [H, n*W, 3] strip; 4-channel mask maps show masked pixels grey."""
    if images.shape[1] == 4:
        masked = images[:, 3:]
        images = images[:, :3] * (1 - masked) + 0.5 * masked
    elif images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return torch.cat(list(images[:, :3].clamp(0, 1)), dim=-1).permute(1, 2, 0).numpy()


def plot_samples(result: EvalResult, path: Path) -> Path:
    """Rows: control maps, real images, then each (method, steps); columns: conditions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = [c.title for c in result.config.conditions]
    groups = _groups(result.rows)
    labels = ["control", "real", *(f"{m}\n{s} steps" for m, s in groups)]
    show = max(1, result.reals.shape[0])
    cell_width = 0.65 * show
    figure, axes = plt.subplots(len(labels), len(conditions), squeeze=False,
                                figsize=(cell_width * len(conditions) + 2.0, (cell_width / show + 0.3) * len(labels) + 0.4))  # fmt: skip
    for column, title in enumerate(conditions):
        panels = [result.controls[title], result.reals, *(result.samples.get((m, s, title)) for m, s in groups)]
        for row, panel in enumerate(panels):
            axis = axes[row][column]
            axis.set_xticks([]), axis.set_yticks([])
            if panel is not None:
                axis.imshow(_strip(panel), interpolation="nearest")
            if row == 0:
                axis.set_title(title, fontsize=9)
            if column == 0:
                axis.set_ylabel(labels[row], fontsize=7, rotation=0, ha="right", va="center")
    return save_figure(figure, path, bbox_inches="tight")  # row labels can be wider than the margin


def plot_metrics(result: EvalResult, path: Path) -> Path:
    """Grouped bar charts (FID, Fidelity, and line F1 where asked): conditions on the x axis, one bar per (method, steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_conditions = [c.title for c in result.config.conditions]
    panels = [("fid", "FID", all_conditions), ("fidelity", "Fidelity (mean |h(y) - c|, bars: 1 standard error)", all_conditions)]
    if line_conditions := [c.title for c in result.config.conditions if c.line_f1 is not None]:
        panels.append(("line_f1", "line F1 (higher is better)", line_conditions))
    groups = _groups(result.rows)
    widths = [max(3.5, 1.4 * len(conditions)) for _, _, conditions in panels]
    figure, axes = plt.subplots(1, len(panels), figsize=(sum(widths) + 2.5, 3.6), gridspec_kw={"width_ratios": widths})
    width = 0.8 / max(1, len(groups))
    for axis, (metric, title, conditions) in zip(axes, panels):
        for g, (method, steps) in enumerate(groups):
            values, errors = [], []
            for condition in conditions:
                row = next((r for r in result.rows if r.method == method and r.steps == steps and r.condition == condition), None)
                values.append(getattr(row, metric) if row is not None else float("nan"))
                errors.append(row.fidelity_sem if row is not None and metric == "fidelity" else float("nan"))
            error_bars = errors if any(math.isfinite(e) for e in errors) else None
            axis.bar(np.arange(len(conditions)) + (g - (len(groups) - 1) / 2) * width, values, width, yerr=error_bars,
                     capsize=2, label=f"{method} ({steps})")  # fmt: skip
        axis.set_xticks(range(len(conditions)), conditions)
        axis.set_title(title, fontsize=9)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return save_figure(figure, path, bbox_inches="tight")  # the legend sits outside the axes


def write_report(result: EvalResult, output_dir) -> dict[str, Any]:
    """Write every output file; returns their paths by kind."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {"markdown": out / "results.md", "csv": out / "results.csv", "json": out / "results.json"}
    paths["markdown"].write_text(_markdown(result))
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(result.columns))
        writer.writeheader()
        writer.writerows(asdict(r) for r in result.rows)
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2, allow_nan=True))
    paths["samples"] = plot_samples(result, out / "samples.png")
    paths["metrics"] = plot_metrics(result, out / "metrics.png")
    paths["correlation"] = []
    for i, analysis in enumerate(result.correlations):
        analysis.save_json(out / f"correlation_{i}.json")
        paths["correlation"].append(analysis.plot(out / f"correlation_{i}.png"))
    return paths
