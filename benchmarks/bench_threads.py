"""Generation time against the CPU thread count: 1, 2, torch's default and ccm's default, in one run.

    python benchmarks/bench_threads.py [--steps 1 4] [--repeats 7] [--model world:lcm --controlnet world:dm-controlnet-sketch]

Run it without OMP_NUM_THREADS set, so torch picks its own default (one thread per physical core);
ccm's default is ``ccm_sdk.utils.threads.default_threads`` (OMP_NUM_THREADS, else 1 on at most 2
cores, else torch's default capped at 4). The counts take turns within each repeat, so machine
noise (other processes on the cores) hits all of them alike; medians are printed per step count
with each one's ratio to one thread. On a machine other work keeps busy the ratios are the point:
a thread count above the free cores makes torch's threads wait on each other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

TORCH_DEFAULT = torch.get_num_threads()  # read before anything changes it

from PIL import Image  # noqa: E402

from ccm_sdk.pipeline import CCMPipeline  # noqa: E402
from ccm_sdk.utils.threads import available_cores, default_threads  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SKETCH = ROOT / "examples/world-sketch.png"
PROMPT = "a large blue diamond below a medium yellow triangle on a green background"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="world:lcm")
    parser.add_argument("--controlnet", default="world:dm-controlnet-sketch")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    ours = default_threads(TORCH_DEFAULT)
    labels: dict[int, list[str]] = {}  # a count is timed once, whatever names it goes by
    for label, threads in (("1", 1), ("2", 2), ("torch default", TORCH_DEFAULT), ("ccm default", ours)):
        labels.setdefault(threads, []).append(label)
    counts = {f"{threads}: {' = '.join(names)}": threads for threads, names in labels.items()}
    pipe = CCMPipeline.from_pretrained(args.model, controlnet=args.controlnet)
    pipe.set_progress_bar_config(disable=True)
    control = Image.open(SKETCH).convert("RGB")
    print(f"cores available: {available_cores()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}, "
          f"model {args.model} + {args.controlnet}, {control.width}x{control.height}, median of {args.repeats}")
    print("threads:", "; ".join(counts))
    header = "".join(f"{f'{threads} thread(s)':>22}" for threads in counts.values())
    print(f"{'steps':>5}{header}")
    for steps in args.steps:
        def run(threads: int) -> float:
            torch.set_num_threads(threads)
            start = time.perf_counter()
            pipe(PROMPT, control, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt")
            return time.perf_counter() - start

        for threads in counts.values():
            run(threads)  # warm-up at each count
        times: dict[str, list[float]] = {name: [] for name in counts}
        for _ in range(args.repeats):
            for name, threads in counts.items():
                times[name].append(run(threads))
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        one = medians[next(iter(medians))]
        cells = "".join(f"{f'{m * 1000:.0f} ms ({m / one:.2f}x)':>22}" for m in medians.values())
        print(f"{steps:>5}{cells}")
    print("(x: time relative to 1 thread; above 1 is slower)")


if __name__ == "__main__":
    main()
