"""Consistency-training recipes on the exact toy: control accuracy against training steps.

A zero-initialised branch on a frozen, exact consistency model of a 4-mode Gaussian mixture (the
world's noise schedule and LCM parameterisation; ``ccm_sdk.testing.consistency_toy``) is trained by
the SDK's consistency-training code under each recipe, from the same seed and batches. Every
``--every`` steps it prints, per recipe: control accuracy at 1 and 4 steps (0.25 is chance), the
spread of the samples around their mode (1.0 is the data's), the one-step error from pure noise
against the exact conditional consistency function (in the modes' std), and the low-noise-end
one-step reconstruction error as a ratio to the frozen base's. It draws accuracy against steps for
every recipe into ``--figure``.

    python benchmarks/bench_ct_toy.py [--steps 4000] [--every 500] [--recipes ccm relative-gap ...]
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from ccm_sdk.testing.consistency_toy import ConsistencyToy, train_branch
from ccm_sdk.training.config import ConsistencyConfig

# name -> (ConsistencyConfig keys, toy options)
RECIPES: dict[str, tuple[dict, dict]] = {
    "ccm": ({"recipe": "ccm"}, {}),  # the paper: L1, adjacent pairs of the 50-point grid, stopgrad target
    "ccm-l2": ({"recipe": "ccm", "distance": "l2"}, {}),
    "ccm-huber": ({"recipe": "ccm", "distance": "huber", "huber_c": 0.03}, {}),
    "data-targets": ({"recipe": "ccm", "data_target_above": 0}, {}),  # every pair's target is x_0 (gap = t)
    "data-targets-above-500": ({"recipe": "ccm", "data_target_above": 500}, {}),
    "gap-0.5-l1": ({"recipe": "ccm", "gap_ratio": 0.5}, {}),
    "gap-0.2-huber": ({"recipe": "relative-gap", "gap_ratio": 0.2}, {}),
    "relative-gap": ({"recipe": "relative-gap"}, {}),  # the default: gap 0.5 and pseudo-Huber c = 0.03
    "relative-gap-output-scale": ({"recipe": "relative-gap", "weighting": "output_scale"}, {}),
    "relative-gap-ict": ({"recipe": "relative-gap", "weighting": "ict"}, {}),
    "free-ccm": ({"recipe": "ccm"}, {"free": True}),  # a free network, no frozen base
    "guided-base-ccm": ({"recipe": "ccm"}, {"base_std": 0.05}),  # the base is exact for sharper modes
    "guided-base-relative-gap": ({"recipe": "relative-gap"}, {"base_std": 0.05}),
}
DEFAULT = ["ccm", "ccm-l2", "data-targets", "gap-0.5-l1", "relative-gap", "relative-gap-output-scale", "free-ccm",
           "guided-base-ccm", "guided-base-relative-gap"]  # fmt: skip


def run(name: str, steps: int, every: int, batch: int, lr: float, seed: int, bar: tqdm) -> list[dict]:
    keys, options = RECIPES[name]
    toy = ConsistencyToy.build(base_std=options.get("base_std"))
    rows = []

    def measure(step: int, model) -> None:
        bar.update(1)
        if (step + 1) % every == 0:
            rows.append({"step": step + 1, **toy.measure(model, samples=1000).as_dict()})

    started = time.perf_counter()
    train_branch(toy, ConsistencyConfig(**keys), steps=steps, batch=batch, lr=lr, seed=seed,
                 free=options.get("free", False), callback=measure)  # fmt: skip
    rows[-1]["seconds"] = round(time.perf_counter() - started, 1)
    return rows


def draw(results: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ccm_sdk.eval.figures import save_figure

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in ((axes[0], "accuracy_1", "1 step"), (axes[1], "accuracy_4", "4 steps")):
        for name, rows in results.items():
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", markersize=3, label=name)
        ax.axhline(0.25, color="grey", linestyle=":", linewidth=1)
        ax.axhline(0.9, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"control accuracy, {title}")
        ax.set_xlabel("training steps")
    axes[0].set_ylabel("share of samples in the asked mode (0.25: chance)")
    axes[1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=DEFAULT, choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--figure", default="docs/images/ct-toy.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    with tqdm(total=args.steps * len(args.recipes), unit="step", desc="toy CT") as bar:
        for name in args.recipes:
            results[name] = run(name, args.steps, args.every, args.batch, args.lr, args.seed, bar)
    columns = ["accuracy_1", "accuracy_4", "spread_1", "spread_4", "function_error", "low_end_growth"]
    print(f"\nafter {args.steps} steps (batch {args.batch}, lr {args.lr}, seed {args.seed}):")
    print("| recipe | " + " | ".join(columns) + " | seconds |")
    print("|---" * (len(columns) + 2) + "|")
    for name, rows in results.items():
        last = rows[-1]
        print(f"| {name} | " + " | ".join(f"{last[c]:.3f}" for c in columns) + f" | {last['seconds']} |")
    print("\naccuracy at 1 / 4 steps by training step:")
    for name, rows in results.items():
        print(f"{name:>28}: " + "  ".join(f"{r['step']}: {r['accuracy_1']:.2f}/{r['accuracy_4']:.2f}" for r in rows))
    draw(results, args.figure)
    print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
