"""CCMPipeline against diffusers' SDXL ControlNet pipeline, side by side on the same tiny SDXL weights.

Prints, per resolution: ccm / diffusers wall time for 4-step controlled generation with an
SDXL-architecture LCM (w-embedding guidance) and for the DDIM+CFG baseline on a plain SDXL
model, the largest pixel difference, and each pipeline's time / the sum of the network forwards
it runs (its overhead). Calls alternate between the contenders so machine noise hits both alike;
medians are reported.

    python benchmarks/bench_sdxl.py [--sizes 128 256] [--repeats 5] [--ddim-steps 10] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from bench_pipeline import _interleaved, _overhead
from diffusers import ControlNetModel, DDIMScheduler, LCMScheduler, StableDiffusionXLControlNetPipeline

from ccm_sdk.pipeline import CCMPipeline
from ccm_sdk.testing import tiny


def _modules(unet, vae, text_encoders, controlnets):
    mods = [unet, vae.decoder, vae.post_quant_conv, *text_encoders]
    for net in controlnets:
        mods += [net, net.controlnet_cond_embedding]
    return mods


def build_models(root: Path) -> dict[str, Path]:
    paths = {"lcm": tiny.save_tiny_sdxl_pipeline(root / "lcm-sdxl", lcm=True), "sd": tiny.save_tiny_sdxl_pipeline(root / "sdxl", lcm=False)}
    paths["cn"] = tiny.save_tiny_controlnet(root / "cn", paths["lcm"])
    paths["sd_cn"] = tiny.save_tiny_controlnet(root / "sd_cn", paths["sd"])
    return paths


def diffusers_pipeline(model: Path, controlnet: Path, scheduler_cls) -> StableDiffusionXLControlNetPipeline:
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(model, controlnet=ControlNetModel.from_pretrained(controlnet), add_watermarker=False)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(model: Path, controlnet: Path) -> CCMPipeline:
    pipe = CCMPipeline.from_pretrained(model, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ddim-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device: cpu, torch {torch.__version__}, {torch.get_num_threads()} threads, tiny random SDXL-architecture weights "
          "(ccm_sdk.testing.tiny.save_tiny_sdxl_pipeline), float32, exact path")
    prompt, seed = "a red circle left of a blue square", 0
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_models(Path(tmp))
        runs = {
            "LCM 4 steps": (_ours(paths["lcm"], paths["cn"]), diffusers_pipeline(paths["lcm"], paths["cn"], LCMScheduler),
                            dict(num_inference_steps=4, guidance_scale=8.0), {}),
            f"DDIM {args.ddim_steps}x2 CFG": (_ours(paths["sd"], paths["sd_cn"]), diffusers_pipeline(paths["sd"], paths["sd_cn"], DDIMScheduler),
                                              dict(num_inference_steps=args.ddim_steps, guidance_scale=7.5, negative_prompt="blurry"),
                                              dict(sampler="ddim")),
        }  # fmt: skip
        print("\nmedian wall time per controlled generation")
        print(f"{'run':>16} {'size':>5} {'ccm':>9} {'diffusers':>10} {'ccm/diff':>9} {'max |ccm-diff|':>15}")
        for name, (ours, ref, kwargs, ours_only) in runs.items():
            for size in args.sizes:
                image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
                run_ours = lambda: ours(prompt, image, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs, **ours_only)  # noqa: E731
                run_ref = lambda: ref(prompt, image=image, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs)  # noqa: E731
                diff = (run_ours().images - run_ref().images).abs().max().item()
                t = _interleaved({"ccm": run_ours, "diffusers": run_ref}, args.repeats)
                print(f"{name:>16} {size:>5} {t['ccm']:>8.3f}s {t['diffusers']:>9.3f}s {t['ccm'] / t['diffusers']:>8.3f}x {diff:>15.2e}")

        print("\noverhead: pipeline wall time / sum of the network forwards it runs (1.00 = none)")
        ours, ref, kwargs, _ = runs["LCM 4 steps"]
        size = args.sizes[0]
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        o = _overhead(lambda: ours(prompt, image, output_type="pt", **kwargs),
                      _modules(ours.unet, ours.vae, [ours.text_encoder, ours.text_encoder_2], ours.controlnets), args.repeats)
        d = _overhead(lambda: ref(prompt, image=image, output_type="pt", **kwargs),
                      _modules(ref.unet, ref.vae, [ref.text_encoder, ref.text_encoder_2], [ref.controlnet]), args.repeats)
        print(f"{'LCM 4 steps':>16} {size:>5} ccm {o:.3f}x   diffusers {d:.3f}x")


if __name__ == "__main__":
    main()
