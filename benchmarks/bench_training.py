"""Time per training step: consistency-training a ControlNet (CT) against the epsilon-loss
ControlNet step (DM, as diffusers' train_controlnet.py does it), measured side by side.

    python benchmarks/bench_training.py                    # CUDA when available, else CPU
    python benchmarks/bench_training.py --quick --threads 1

Both are the SDK's own trainer steps (``Trainer.training_step``: VAE and text encoding, the loss,
backward, clipping, AdamW) on the same tiny models from ``ccm_sdk.testing.tiny``: the DM step on
the tiny diffusion model, the CT step on the tiny LCM, whose UNet is the same plus the
w-embedding projection; same ControlNet architecture, batch, resolution and data (precomputed
control maps). Steps alternate between the two, so background load hits both alike; times are
medians. CT adds one ControlNet + UNet forward pass without gradients to a step that otherwise
costs about three forward passes (one forward, a backward of about two), hence the goal of at
most 1.4x.

Peak memory is the most memory a step allocates above what was held before it: on CUDA from
``torch.cuda.max_memory_allocated``; on CPU estimated with the PyTorch profiler's memory events
(tracemalloc does not see tensor storage), replayed in order.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ccm_sdk.datasets import collate
from ccm_sdk.testing import tiny
from ccm_sdk.training import get_trainer
from ccm_sdk.training.config import load_config
from ccm_sdk.training.core import seed_everything


class Squares(torch.utils.data.Dataset):
    """Coloured squares with their outlines as control maps, made in memory."""

    def __init__(self, count: int, size: int):
        self.count, self.size = count, size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        generator = torch.Generator().manual_seed(i)
        image = torch.full((3, self.size, self.size), 0.1)
        side = self.size // 2
        y, x = (int(v) for v in torch.randint(0, self.size - side, (2,), generator=generator))
        image[:, y : y + side, x : x + side] = torch.rand(3, 1, 1, generator=generator)
        control = torch.zeros(3, self.size, self.size)
        control[:, y : y + side, x : x + side] = 1.0
        control[:, y + 1 : y + side - 1, x + 1 : x + side - 1] = 0.0
        return {"image": image, "caption": f"a square number {i}", "control": control}


def make_step(trainer_name: str, model: Path, out: Path, args: argparse.Namespace):
    """A zero-argument function running one optimizer step of ``trainer_name``."""
    overrides = [
        ("output_dir", str(out / trainer_name)), ("model", str(model)),
        ("conditioning_embedding_out_channels", list(tiny.CONTROL_EMBED_CHANNELS)),
        ("train.batch_size", args.batch_size), ("train.lr", 1e-5), ("train.mixed_precision", args.mixed_precision),
        ("train.device", args.device), ("log.progress", False),
    ]  # fmt: skip
    trainer = get_trainer(trainer_name)(load_config(trainer_name, None, overrides), dataset=Squares(args.batch_size, args.resolution))
    trainer.setup()
    optimizer, scheduler = trainer.prepare_optimizer()
    seed_everything(0)
    batch = collate([trainer.dataset[i] for i in range(args.batch_size)])

    def step() -> None:
        trainer.training_step([batch], optimizer, scheduler, step=1)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()

    return step


def peak_bytes(step, device: torch.device) -> int:
    """Most bytes held above the level before the step, at any moment of one step."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    held = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels (latents are 1/8)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="10 timed steps")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = 10 if args.quick else args.steps

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1. the same tiny models for both: a diffusion model and its LCM-shaped twin
        sd = tiny.save_tiny_pipeline(tmp / "sd", lcm=False)
        lcm = tiny.save_tiny_pipeline(tmp / "lcm", lcm=True)
        methods = {
            "DM ControlNet, epsilon loss": make_step("dm_controlnet", sd, tmp, args),
            "CM ControlNet, CT loss": make_step("ct_controlnet", lcm, tmp, args),
        }
        device = torch.device("cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())) else "cpu")
        # 2. warm up, then alternate the methods step by step
        for step in methods.values():
            for _ in range(args.warmup):
                step()
        times: dict[str, list[float]] = {name: [] for name in methods}
        names = list(methods)
        for round_index in range(steps):
            for name in names if round_index % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                methods[name]()
                times[name].append(time.perf_counter() - start)
        peaks = {name: peak_bytes(step, device) for name, step in methods.items()}

    # 3. report
    where = f"{device.type}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
    print(f"training step, {where}, batch {args.batch_size}, {args.resolution}x{args.resolution} px, "
          f"mixed precision {args.mixed_precision}, median of {steps} steps")  # fmt: skip
    print(f"{'method':<30} {'ms/step':>9} {'peak MiB':>9}")
    for name in methods:
        print(f"{name:<30} {1e3 * statistics.median(times[name]):>9.1f} {peaks[name] / 2**20:>9.1f}")
    dm, ct = (statistics.median(times[n]) for n in names)
    print(f"CT / DM time per step: {ct / dm:.2f}x (goal: at most 1.4x)")
    print(f"CT / DM peak memory:   {peaks[names[1]] / max(1, peaks[names[0]]):.2f}x")


if __name__ == "__main__":
    main()
