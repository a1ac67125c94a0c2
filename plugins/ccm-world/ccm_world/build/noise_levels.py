"""``ccm-world noise-levels``: one consistency step from each noise level, on held-out world scenes.

    ccm-world noise-levels --condition sketch --out outputs/noise-levels \\
        "no control=" "DM's ControlNet=world:dm-controlnet-sketch" "CM's ControlNet=world:cm-controlnet-sketch"

Each ``LABEL=CONTROLNET`` (empty: no ControlNet), or ``LABEL=CONTROLNET+ADAPTER`` (the ControlNet
through the unified adapter, e.g. ``world:dm-controlnet-sketch+world:adapter``), runs on the LCM (``--model``) over the same scenes
and noise; writes ``noise-levels.md`` (the tables: the reconstruction error per strength, then the
held-out consistency-training loss per grid pair), ``noise-levels.json``, ``noise-levels.png`` and
``consistency.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ccm_sdk.errors import CCMError, InputError
from ccm_sdk.eval.noise_levels import consistency_error_by_level, error_by_noise_level, markdown_table, plot_curves, save_curves

from .config import load_preset
from .stages import world_data

DEFAULT_STRENGTHS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
DEFAULT_GRID = (0, 2, 5, 10, 20, 30, 40, 48)


def parse_models(specs: list[str]) -> list[tuple[str, str | None, str | None]]:
    """(label, ControlNet or None, adapter or None) from each ``LABEL=CONTROLNET[+ADAPTER]``."""
    models = []
    for spec in specs:
        label, sep, nets = spec.partition("=")
        controlnet, plus, adapter = nets.partition("+")
        if not sep or not label or (plus and not (controlnet and adapter)):
            raise InputError(f"expected LABEL=CONTROLNET or LABEL=CONTROLNET+ADAPTER (CONTROLNET empty for none), got {spec!r}")
        models.append((label, controlnet or None, adapter or None))
    return models


def run(condition: str, models: list[tuple[str, str | None, str | None]], out: Path, *, model: str = "world:lcm", scenes: int = 64,
        strengths: tuple[float, ...] = DEFAULT_STRENGTHS, grid: tuple[int, ...] = DEFAULT_GRID, preset: str = "full",
        seed: int = 0) -> Path:  # fmt: skip
    """Measure every model, write the table, JSON and plot into ``out``; returns the table's path."""
    from ccm_sdk.pipeline import CCMPipeline

    if scenes < 1:
        raise InputError(f"expected --scenes >= 1, got {scenes}")
    data = world_data(load_preset(preset), (condition,), seed_offset=1, length=scenes)
    items = [data[i] for i in range(scenes)]
    prompts = [item["caption"] for item in items]
    images = torch.stack([item["image"] for item in items])
    controls = torch.stack([item["controls"][condition] for item in items])
    curves, pairs = [], []
    for label, controlnet, adapter in models:
        pipe = CCMPipeline.from_pretrained(model, controlnet=controlnet, adapter=adapter) if controlnet else CCMPipeline.from_pretrained(model)
        pipe.set_progress_bar_config(disable=True)
        control = controls if controlnet else None
        curves.append(error_by_noise_level(pipe, prompts, images, strengths, control_image=control, label=label, seed=seed))
        pairs.append(consistency_error_by_level(pipe, prompts, images, grid, control_image=control, label=label, seed=seed))
        print(f"  {label}: " + " ".join(f"{e:.4f}" for e in curves[-1].errors), file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    save_curves([*curves, *pairs], out / "noise-levels.json")
    plot_curves(curves, out / "noise-levels.png", title=f"{condition}: one consistency step from each noise level ({scenes} scenes)")
    plot_curves(pairs, out / "consistency.png", title=f"{condition}: held-out consistency-training loss ({scenes} scenes)")
    table = out / "noise-levels.md"
    table.write_text("One consistency step from each noise level: mean |y - x| (decoded images in [0, 1]), and its ratio "
                     "to the first row.\n\n" + markdown_table(curves) +
                     "\nThe consistency-training loss, held out: mean |f(x_{t_n+1}) - f(x_{t_n})| (latents) per pair of the "
                     "50-point grid, at t_n+1.\n\n" + markdown_table(pairs))  # fmt: skip
    return table


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.1,0.5,1.0, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,10,48, got {text!r}") from None


def main(argv: list[str] | None = None, *, prog: str = "ccm-world noise-levels") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="LABEL=CONTROLNET or LABEL=CONTROLNET+ADAPTER (folders or world:<name>; "
                        "CONTROLNET empty for no ControlNet; LABEL without '=')")
    parser.add_argument("--condition", required=True, help="the world condition whose maps the ControlNets get")
    parser.add_argument("--out", type=Path, required=True, help="folder for the table, JSON and plot")
    parser.add_argument("--model", default="world:lcm", help="the consistency model (default: world:lcm)")
    parser.add_argument("--scenes", type=int, default=64, help="held-out scenes (world seed + 1)")
    parser.add_argument("--strengths", type=_floats, default=DEFAULT_STRENGTHS,
                        help="img2img strengths, comma-separated (default: %(default)s)")  # fmt: skip
    parser.add_argument("--grid", type=_ints, default=DEFAULT_GRID,
                        help="indices n of the consistency grid pairs (t_n, t_n+1), comma-separated (default: %(default)s)")  # fmt: skip
    parser.add_argument("--preset", default="full", help="the preset whose world the scenes come from")
    args = parser.parse_args(argv)
    try:
        table = run(args.condition, parse_models(args.models), args.out, model=args.model, scenes=args.scenes,
                    strengths=args.strengths, grid=args.grid, preset=args.preset)  # fmt: skip
    except CCMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table.read_text(), end="")
    return 0
