"""Colour accuracy of a world model on held-out scenes, split by region: the background, and the
objects by how many the scene holds.

    python plugins/ccm-world/scripts/prompt_colour_breakdown.py --model world:teacher \
        --controlnet world:dm-controlnet-sketch --sampler ddim --steps 50 --guidance 7.5 [--scenes 128] [--grid out.png]

(``--guidance`` left out: the model's recommended scale, its ccm_defaults.json, else 8.0.)

The measure is ``ccm eval``'s colour accuracy (docs/evaluation.md): a region is right when the palette
colour nearest its mean generated colour is the one the caption asks for. ``ccm eval`` pools all
regions; this script reports the background (one region a scene) and the objects apart, and the
objects by scene size, which tells a model that does not follow colours at all from one that
colours a lone object but mixes up the colours of two or three (attribute binding). Of the objects
that scenes of two or more get wrong, it counts those that took a colour the caption asks for another
region (a leak: the colour is bound to the wrong place) against the count a uniformly wrong colour
would give (not following colours at all), and splits the leaks into the background's colour (the
object is not drawn apart from its background) and another object's (colours swapped between objects). The sketch
control is the scene's own exact map (world seed 1: scenes no training run used); samples use
noise seed 0. ``--grid`` writes the real images above the samples (first 16 scenes).
"""

from __future__ import annotations

import argparse

import torch

from ccm_sdk import CCMPipeline
from ccm_sdk.eval.colour import region_colours
from ccm_world.dataset import WorldDataset


def breakdown(images: torch.Tensor, dataset: WorldDataset) -> dict[str, tuple[int, int]]:
    """(right, scored) per group: "background", "objects", "objects in scenes of K"."""
    counts: dict[str, list[int]] = {}
    for i, image in enumerate(images):
        targets = dataset.colour_targets(i)
        objects = len(dataset.scene(i).objects)
        for region, (got, asked) in enumerate(zip(region_colours(image, targets), targets.asked.tolist())):
            if got is None:  # too few pixels to score, as in colour_accuracy
                continue
            groups = ["background"] if region == 0 else ["objects", f"objects in scenes of {objects}"]
            for group in groups:
                hit = counts.setdefault(group, [0, 0])
                hit[0] += int(got == asked)
                hit[1] += 1
    return {group: (right, scored) for group, (right, scored) in sorted(counts.items())}


def leaks(images: torch.Tensor, dataset: WorldDataset) -> tuple[int, int, float, int]:
    """(leaked, wrong, expected, to_background): of the objects in scenes of two or more that come out
    wrong, how many took a colour the caption asks for another region, how many would by chance (a
    wrong colour drawn uniformly from the other palette colours), and how many of the leaked took
    the background's colour (the object is not drawn apart from its background) rather than
    another object's (the colours are bound to the wrong objects)."""
    leaked, wrong, expected, to_background = 0, 0, 0.0, 0
    for i, image in enumerate(images):
        if len(dataset.scene(i).objects) < 2:
            continue
        targets = dataset.colour_targets(i)
        asked = targets.asked.tolist()
        for region, got in enumerate(region_colours(image, targets)):
            if region == 0 or got is None or got == asked[region]:
                continue
            others = {a for r, a in enumerate(asked) if r != region and a != asked[region]}
            wrong += 1
            leaked += int(got in others)
            to_background += int(got in others and got == asked[0])
            expected += len(others) / (len(targets.palette) - 1)
    return leaked, wrong, expected, to_background


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="world:lcm")
    parser.add_argument("--controlnet", default="world:dm-controlnet-sketch")
    parser.add_argument("--sampler", default="consistency", choices=("consistency", "ddim"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's recommended scale")
    parser.add_argument("--scenes", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--grid", default=None)
    args = parser.parse_args()
    dataset = WorldDataset(size=64, length=100_000, seed=1, conditions=("sketch",))
    items = [dataset[i] for i in range(args.scenes)]
    pipe = CCMPipeline.from_pretrained(args.model, controlnet=args.controlnet, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images = []
    for start in range(0, args.scenes, args.batch):
        part = items[start : start + args.batch]
        out = pipe(prompt=[it["caption"] for it in part], control_image=torch.stack([it["controls"]["sketch"] for it in part]),
                   num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler, generator=generator,
                   output_type="pt")  # fmt: skip
        images.append(out.images.float())
    images = torch.cat(images)
    real = torch.stack([it["image"] for it in items])
    print(f"{args.model} + {args.controlnet}, {args.sampler} {args.steps} steps, guidance {pipe.generation_defaults.guidance_scale if args.guidance is None else args.guidance}, {args.scenes} scenes")
    for name, found in (("generated", images), ("real", real)):
        groups = breakdown(found, dataset)
        right = sum(r for g, (r, _) in groups.items() if g in ("background", "objects"))
        scored = sum(s for g, (_, s) in groups.items() if g in ("background", "objects"))
        cells = "  ".join(f"{g} {r / s:.3f} ({s})" for g, (r, s) in groups.items())
        print(f"  {name:9s} all {right / scored:.3f}  {cells}")
    leaked, wrong, expected, to_background = leaks(images, dataset)
    if wrong:
        print(f"  wrong objects in scenes of 2+: {wrong}; took another region's asked colour: {leaked} "
              f"({leaked / wrong:.2f}; by chance {expected / wrong:.2f}), the background's {to_background}, "
              f"another object's {leaked - to_background}")
    if args.grid:
        from PIL import Image

        rows = [real[:16], images[:16]]
        grid = torch.cat([torch.cat(list(row), 2) for row in rows], 1)
        Image.fromarray((grid.permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy()).save(args.grid)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
