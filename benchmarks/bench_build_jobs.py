"""Training throughput of one two-thread process against two one-thread processes side by side: why
``ccm-world build --jobs 2`` exists.

    python benchmarks/bench_build_jobs.py [--steps 20] [--repeats 2] [--batch 32]

Each process trains the world's sketch ControlNet on its frozen teacher UNet (the shapes of a
``dm-controlnet-*`` build stage: batch 32 of 16x16x8 latents, AdamW on the ControlNet), from random
latents and caption states so that no data loading enters the figure. After a warm-up step the
processes start together at a barrier and time ``--steps`` steps. Printed per layout: seconds per
step of each process and steps per second of the machine, with the ratio to one process on all
threads. The layouts take turns within each repeat so that machine noise hits both alike. Needs
the cores otherwise idle, like every benchmark here.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time


def _train(threads: int, steps: int, batch: int, barrier, results) -> None:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    import ccm_world

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(ccm_world.world_model("teacher") / "unet", torch_dtype=torch.float32).requires_grad_(False)
    controlnet = ControlNetModel.from_pretrained(ccm_world.world_model("dm-controlnet-sketch"), torch_dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-4)
    size = unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, size, size)
    states = torch.randn(batch, 24, unet.config.cross_attention_dim)
    control = torch.rand(batch, 3, size * 4, size * 4)

    def step() -> None:
        t = torch.randint(0, 1000, (batch,))
        down, mid = controlnet(latents, t, states, controlnet_cond=control, return_dict=False)
        out = unet(latents, t, states, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    barrier.wait()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    results.put(time.perf_counter() - start)


def run_layout(processes: int, threads: int, steps: int, batch: int) -> list[float]:
    """Seconds for ``steps`` steps in each of ``processes`` processes started together."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    workers = [ctx.Process(target=_train, args=(threads, steps, batch, barrier, results)) for _ in range(processes)]
    for w in workers:
        w.start()
    seconds = [results.get() for _ in workers]
    for w in workers:
        w.join()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="threads of the one-process layout")
    args = parser.parse_args()
    layouts = {f"1 process x {args.cores} threads": (1, args.cores), f"{args.cores} processes x 1 thread": (args.cores, 1)}
    per_step: dict[str, list[float]] = {name: [] for name in layouts}
    for repeat in range(args.repeats):
        for name, (processes, threads) in layouts.items():
            seconds = run_layout(processes, threads, args.steps, args.batch)
            per_step[name].append(statistics.median(seconds) / args.steps)
            print(f"repeat {repeat + 1}: {name}: {', '.join(f'{s / args.steps:.3f}' for s in seconds)} s/step")
    print(f"\nWorld ControlNet training, batch {args.batch}, {args.steps} timed steps, median of {args.repeats} repeats:")
    print(f"  {'layout':<28} {'s/step (each)':>13} {'steps/s (machine)':>18} {'ratio':>6}")
    base = None
    for name, (processes, _) in layouts.items():
        seconds = statistics.median(per_step[name])
        throughput = processes / seconds
        base = base or throughput
        print(f"  {name:<28} {seconds:>13.3f} {throughput:>18.3f} {throughput / base:>6.2f}")


if __name__ == "__main__":
    main()
