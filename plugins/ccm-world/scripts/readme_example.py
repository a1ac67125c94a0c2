"""The README's example over seeds: is each picture what the prompt asks for?

    python plugins/ccm-world/scripts/readme_example.py [--seeds 10] [--model world:lcm --controlnet world:dm-controlnet-sketch]
        [--steps 4] [--guidance G] [--grid outputs/readme-example.png]

The README's main command (``scripts/generate.sh``) turns ``examples/world-sketch.png`` and "a large
blue diamond below a medium yellow triangle on a green background" into a picture at seed 0. This
script makes it at seeds 0..N-1 with the same defaults as ``ccm generate`` (the embedded default model
and ControlNet, 4 steps, the model's recommended guidance) and judges each with ``ccm eval``'s colour
measure: the sketch's outlines cut the picture into the background (the part that touches the border)
and two closed shapes; the upper one is the triangle (asked yellow), the lower one the diamond (asked
blue), the background is asked green. A region is right when the palette colour nearest its mean
generated colour is the asked one; a seed is right when all three regions are. The outline pixels
themselves are not judged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from ccm_sdk.errors import InputError
from ccm_sdk.eval.colour import ColourTargets, region_colours
from ccm_world.vocabulary import COLORS, PALETTE

ROOT = Path(__file__).resolve().parents[3]
SKETCH = ROOT / "examples" / "world-sketch.png"
PROMPT = "a large blue diamond below a medium yellow triangle on a green background"
ASKED = ("green", "yellow", "blue")  # background, the upper shape (triangle), the lower shape (diamond)


def sketch_regions(sketch: Image.Image) -> torch.Tensor:
    """long [H, W]: 0 the background, 1 the upper closed shape, 2 the lower one, 3 the outlines (not judged).

    Raises ``InputError`` unless the sketch's outlines enclose at least two shapes."""
    lines = np.asarray(sketch.convert("L")) > 127
    parts, count = ndimage.label(~lines)  # 4-connected: a one-pixel diagonal outline still closes a shape
    border = set(np.unique(np.concatenate([parts[0], parts[-1], parts[:, 0], parts[:, -1]]))) - {0}
    inner = [k for k in range(1, count + 1) if k not in border]
    if not border or len(inner) < 2:
        raise InputError(f"expected a sketch whose outlines enclose two shapes inside a background, got {len(inner)} "
                         f"enclosed part(s) and {len(border)} part(s) touching the border")
    inner = sorted(sorted(inner, key=lambda k: -int((parts == k).sum()))[:2],  # the two largest; stray specks are not judged
                   key=lambda k: float(np.nonzero(parts == k)[0].mean()))  # top to bottom
    regions = np.full(parts.shape, 3, dtype=np.int64)
    regions[np.isin(parts, list(border))] = 0
    regions[parts == inner[0]] = 1
    regions[parts == inner[1]] = 2
    return torch.from_numpy(regions)


def example_targets(sketch: Image.Image) -> ColourTargets:
    palette = torch.tensor([PALETTE[name] for name in COLORS], dtype=torch.float32) / 255.0
    return ColourTargets(sketch_regions(sketch), torch.tensor([COLORS.index(c) for c in ASKED]), palette)


def judge(image: Image.Image, targets: ColourTargets) -> list[str]:
    """The palette colour nearest each region's mean: [background, triangle, diamond]."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    if tuple(pixels.shape[1:]) != tuple(targets.regions.shape):
        raise InputError(f"expected a picture of the sketch's size {tuple(targets.regions.shape)}, got {tuple(pixels.shape[1:])}")
    return [COLORS[index] for index in region_colours(pixels, targets, min_pixels=1)]  # ccm eval's rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--model", default=None, help="default: the embedded default (world:lcm)")
    parser.add_argument("--controlnet", default=None, help="default: the embedded default's sketch ControlNet")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's recommended scale")
    parser.add_argument("--grid", default=None, help="write the sketch and the pictures side by side here")
    args = parser.parse_args()

    from ccm_sdk import CCMPipeline
    from ccm_sdk.cli import embedded_default
    from ccm_sdk.images import make_grid

    default = embedded_default("sketch")
    model = args.model or (default[0] if default else None)
    controlnet = args.controlnet or (default[1] if default else None)
    if model is None or controlnet is None:
        raise SystemExit("the embedded world models are not installed: pass --model and --controlnet")
    sketch = Image.open(SKETCH).convert("RGB")
    targets = example_targets(sketch)
    pipe = CCMPipeline.from_pretrained(model, controlnet=[controlnet])
    pipe.set_progress_bar_config(disable=True)  # one table line a seed
    pictures, right_seeds = [], 0
    print(f"{model} + {controlnet}, {args.steps} steps, guidance {pipe.generation_defaults.guidance_scale if args.guidance is None else args.guidance}")
    print("seed | background (green) | triangle (yellow) | diamond (blue) | all right")
    for seed in range(args.seeds):
        out = pipe(PROMPT, sketch, num_inference_steps=args.steps, guidance_scale=args.guidance,
                   generator=torch.Generator().manual_seed(seed))
        image = out.images[0]
        names = judge(image, targets)
        ok = all(n == a for n, a in zip(names, ASKED))
        right_seeds += ok
        pictures.append(image.convert("RGB"))
        print(f"{seed:4d} | {names[0]:18s} | {names[1]:17s} | {names[2]:14s} | {'yes' if ok else 'no'}")
    print(f"right at {right_seeds} of {args.seeds} seeds")
    if args.grid:
        scale = 4
        tiles = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in [sketch, *pictures]]
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        make_grid(tiles).save(args.grid)
        print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
