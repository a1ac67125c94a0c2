"""Streaming against a plain loop of pipe() calls, on the world model (world:lcm + its sketch ControlNet).

For 1 and 4 steps, in one run, prints frames per second (median of interleaved rounds) and median latency per frame of:
a plain loop of ``pipe(...)`` calls; ``pipe.stream`` without the filter; with the similarity
filter on a static clip (a still sketch whose condition flickers a few pixels, as a camera's
does) and on a moving one (the sketch sliding a pixel a frame); and batches of 4. Also how many
network calls the filter saves on each clip (plain-loop NFE / stream NFE).

    python benchmarks/bench_stream.py [--frames 40] [--repeats 3] [--threads 1] [--steps 1 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ccm_sdk.pipeline import CCMPipeline

ROOT = Path(__file__).resolve().parents[1]
SKETCH = ROOT / "examples/world-sketch.png"
PROMPT = "a large blue diamond below a medium yellow triangle on a green background"
MODEL, CONTROLNET = "world:lcm", "world:cm-controlnet-sketch"


def static_clip(sketch: np.ndarray, frames: int, *, flicker: int = 6, seed: int = 0) -> list[np.ndarray]:
    """The same sketch each frame, with ``flicker`` pixels toggled (a condition's noise on a still camera)."""
    rng = np.random.default_rng(seed)
    clip = []
    for _ in range(frames):
        frame = sketch.copy()
        ys, xs = rng.integers(0, sketch.shape[0], flicker), rng.integers(0, sketch.shape[1], flicker)
        frame[ys, xs] = 255 - frame[ys, xs]
        clip.append(frame)
    return clip


def moving_clip(sketch: np.ndarray, frames: int) -> list[np.ndarray]:
    """The sketch sliding one pixel a frame, to the right and back."""
    period = 2 * 16
    return [np.roll(sketch, min(i % period, period - i % period), axis=1) for i in range(frames)]


def plain_loop(pipe: CCMPipeline, clip: list[np.ndarray], steps: int) -> tuple[float, list[float], int]:
    """(seconds, latency per frame, NFE) of one pipe() call per frame."""
    latencies, nfe = [], 0
    start = time.perf_counter()
    for frame in clip:
        t0 = time.perf_counter()
        out = pipe(PROMPT, frame, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
        latencies.append(time.perf_counter() - t0)
        nfe += out.nfe
    return time.perf_counter() - start, latencies, nfe


def streamed(pipe: CCMPipeline, clip: list[np.ndarray], steps: int, **options) -> tuple[float, list[float], int]:
    """(seconds, latency per frame, NFE) of ``pipe.stream`` over the clip."""
    start = time.perf_counter()
    outs = list(pipe.stream(clip, PROMPT, num_inference_steps=steps, **options))
    return time.perf_counter() - start, [o.latency for o in outs], sum(o.nfe for o in outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40, help="frames per clip (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4], help="step counts (default: 1 4)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = CCMPipeline.from_pretrained(MODEL, controlnet=CONTROLNET)
    pipe.set_progress_bar_config(disable=True)
    sketch = np.asarray(Image.open(SKETCH).convert("RGB"))
    clips = {"static": static_clip(sketch, args.frames), "moving": moving_clip(sketch, args.frames)}
    flicker = float(np.abs(clips["static"][1].astype(np.float32) - clips["static"][0]).mean() / 255)
    print(f"{MODEL} + {CONTROLNET}, {sketch.shape[1]}x{sketch.shape[0]}, {args.frames} frames a clip, {args.threads} torch thread(s); "
          f"static clip flicker: mean abs difference {flicker:.4f} between frames")
    for _ in range(3):
        pipe(PROMPT, sketch, num_inference_steps=1)  # warm-up

    for steps in args.steps:
        contenders = {
            "plain loop of pipe() (moving)": lambda clip=clips["moving"]: plain_loop(pipe, clip, steps),
            "stream, no filter (moving)": lambda clip=clips["moving"]: streamed(pipe, clip, steps, similarity_threshold=None),
            "stream, filter (moving)": lambda clip=clips["moving"]: streamed(pipe, clip, steps),
            "stream, filter (static)": lambda clip=clips["static"]: streamed(pipe, clip, steps),
            "stream, no filter, batch 4 (moving)": lambda clip=clips["moving"]: streamed(pipe, clip, steps, similarity_threshold=None,
                                                                                         batch_size=4),
            "plain loop of pipe() (static)": lambda clip=clips["static"]: plain_loop(pipe, clip, steps),
        }
        runs: dict[str, list[tuple[float, list[float], int]]] = {name: [] for name in contenders}
        names = list(contenders)
        for r in range(args.repeats):  # interleaved, each round in another order, so machine noise hits all alike
            for name in names[r % len(names):] + names[: r % len(names)]:
                runs[name].append(contenders[name]())
        results = {name: (statistics.median(s for s, _, _ in done), [x for _, lat, _ in done for x in lat], done[0][2])
                   for name, done in runs.items()}  # fmt: skip
        base_seconds = results["plain loop of pipe() (moving)"][0]
        print(f"\n{steps} step(s), median of {args.repeats}:            fps   latency median   vs plain loop   NFE")
        for name, (seconds, latencies, nfe) in results.items():
            fps = args.frames / seconds
            print(f"  {name:<38} {fps:6.1f}   {statistics.median(latencies) * 1000:7.1f} ms   {base_seconds / seconds:9.2f}x   {nfe:5d}")
        for clip in ("static", "moving"):
            plain_nfe, stream_nfe = results[f"plain loop of pipe() ({clip})"][2], results[f"stream, filter ({clip})"][2]
            print(f"  network calls saved by the filter on the {clip} clip: {plain_nfe} -> {stream_nfe} "
                  f"({plain_nfe / max(stream_nfe, 1):.1f}x fewer)")


if __name__ == "__main__":
    main()
