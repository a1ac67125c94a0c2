"""CCMPipeline against diffusers' ControlNet pipeline, side by side on the same tiny weights.

Prints, per resolution: ccm (exact path) / diffusers and ccm (opt-in fast path) / diffusers wall
time for 4-step controlled generation; each pipeline's time / the sum of the network forwards it
runs (its overhead); and the DM 50x2 / CM 4 time ratio beside the NFE ratio. Calls alternate
between the contenders so machine noise hits both alike; medians are reported.

    python benchmarks/bench_pipeline.py [--sizes 256 512] [--repeats 7] [--threads N] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import ControlNetModel, LCMScheduler, StableDiffusionControlNetPipeline

from ccm_sdk.pipeline import CCMPipeline
from ccm_sdk.testing import tiny


class ForwardTimer:
    """Sums the wall time of top-level forwards of the given modules (nested calls count once)."""

    def __init__(self, modules):
        self.modules, self.total, self._depth, self._start, self._handles = list(modules), 0.0, 0, 0.0, []

    def __enter__(self):
        for module in self.modules:
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post))
        return self

    def _pre(self, *_):
        if self._depth == 0:
            self._start = time.perf_counter()
        self._depth += 1

    def _post(self, *_):
        self._depth -= 1
        if self._depth == 0:
            self.total += time.perf_counter() - self._start

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


def _modules(unet, vae, text_encoder, controlnets):
    mods = [unet, vae.decoder, vae.post_quant_conv, text_encoder]
    for net in controlnets:
        mods += [net, net.controlnet_cond_embedding]
    return mods


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(contenders: dict, repeats: int) -> dict[str, float]:
    for fn in contenders.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(_timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _overhead(fn, modules, repeats: int) -> float:
    ratios = []
    for _ in range(repeats):
        with ForwardTimer(modules) as timer:
            total = _timed(fn)
        ratios.append(total / timer.total)
    return statistics.median(ratios)


def build_models(root: Path) -> dict[str, Path]:
    paths = {"lcm": tiny.save_tiny_pipeline(root / "lcm", lcm=True), "sd": tiny.save_tiny_pipeline(root / "sd", lcm=False)}
    paths["cn"] = tiny.save_tiny_controlnet(root / "cn", paths["lcm"])
    paths["sd_cn"] = tiny.save_tiny_controlnet(root / "sd_cn", paths["sd"])
    return paths


def diffusers_pipeline(model: Path, controlnet: Path, scheduler_cls):
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        model, controlnet=ControlNetModel.from_pretrained(controlnet), safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="fast path with torch.compile too (compiles for minutes on a CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device: cpu, torch {torch.__version__}, {torch.get_num_threads()} threads, tiny random weights (ccm_sdk.testing.tiny)")
    half = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()  # as enable_fast_path decides
    parts = ["bfloat16" if half else "float32 (no AMX / AVX512-BF16 on this CPU)", "channels_last", *(["torch.compile"] if args.compile else [])]
    print(f"fast path: {' + '.join(parts)} (opt-in{', ~1e-2 from exact' if half else ''})")

    with tempfile.TemporaryDirectory() as tmp:
        paths = build_models(Path(tmp))
        ours = CCMPipeline.from_pretrained(paths["lcm"], controlnet=paths["cn"])
        fast = CCMPipeline.from_pretrained(paths["lcm"], controlnet=paths["cn"]).enable_fast_path(compile=args.compile)
        ref = diffusers_pipeline(paths["lcm"], paths["cn"], LCMScheduler)
        for pipe in (ours, fast):
            pipe.set_progress_bar_config(disable=True)
        prompt, seed = "a red circle left of a blue square", 0

        print("\n4-step controlled generation (consistency sampling), median wall time")
        print(f"{'size':>6} {'ccm exact':>10} {'ccm fast':>10} {'diffusers':>10} {'exact/diff':>11} {'fast/diff':>10} {'max |exact-diff|':>17}")
        for size in args.sizes:
            image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
            run_ours = lambda p=ours: p(prompt, image, num_inference_steps=4, generator=torch.Generator().manual_seed(seed), output_type="pt")  # noqa: E731
            run_fast = lambda: fast(prompt, image, num_inference_steps=4, generator=torch.Generator().manual_seed(seed), output_type="pt")  # noqa: E731
            run_ref = lambda: ref(prompt, image=image, num_inference_steps=4, guidance_scale=8.0,  # noqa: E731
                                  generator=torch.Generator().manual_seed(seed), output_type="pt")
            diff = (run_ours().images - run_ref().images).abs().max().item()
            t = _interleaved({"exact": run_ours, "fast": run_fast, "diffusers": run_ref}, args.repeats)
            print(f"{size:>6} {t['exact']:>9.3f}s {t['fast']:>9.3f}s {t['diffusers']:>9.3f}s "
                  f"{t['exact'] / t['diffusers']:>10.3f}x {t['fast'] / t['diffusers']:>9.3f}x {diff:>17.2e}")

        print("\noverhead: pipeline wall time / sum of the network forwards it runs (1.00 = none)")
        size = args.sizes[0]
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        o = _overhead(lambda: ours(prompt, image, num_inference_steps=4, output_type="pt"),
                      _modules(ours.unet, ours.vae, ours.text_encoder, ours.controlnets), args.repeats)
        d = _overhead(lambda: ref(prompt, image=image, num_inference_steps=4, output_type="pt"),
                      _modules(ref.unet, ref.vae, ref.text_encoder, [ref.controlnet]), args.repeats)
        print(f"{size:>6} ccm {o:.3f}x   diffusers {d:.3f}x")

        print("\nDM's ControlNet + DM (DDIM 50 steps x 2 with CFG) vs CM's pipeline (4 steps), same sizes of network")
        dm = CCMPipeline.from_pretrained(paths["sd"], controlnet=paths["sd_cn"])
        dm.set_progress_bar_config(disable=True)
        out_dm = dm(prompt, image, num_inference_steps=50, guidance_scale=7.5, sampler="ddim", output_type="pt")
        out_cm = ours(prompt, image, num_inference_steps=4, output_type="pt")
        t = _interleaved({
            "dm": lambda: dm(prompt, image, num_inference_steps=50, guidance_scale=7.5, sampler="ddim", output_type="pt"),
            "cm": lambda: ours(prompt, image, num_inference_steps=4, output_type="pt"),
        }, max(3, args.repeats // 2))
        print(f"{size:>6} DM {t['dm']:.3f}s ({out_dm.nfe} NFE)  CM {t['cm']:.3f}s ({out_cm.nfe} NFE)  "
              f"time ratio {t['dm'] / t['cm']:.1f}x  NFE ratio {out_dm.nfe / out_cm.nfe:.1f}x  (paper: 26x time, 25x NFE)")


if __name__ == "__main__":
    main()
