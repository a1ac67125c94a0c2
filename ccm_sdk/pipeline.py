"""CCMPipeline: text-to-image consistency models with spatial control, on diffusers models."""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from . import images as image_utils
from .errors import (
    ChannelMismatchError,
    ImageSizeError,
    IncompatibleModelsError,
    InputError,
    InputTypeError,
    MissingModelError,
    NonFiniteError,
    StepCountError,
    ValueRangeError,
)
from .interfaces import Adapter, Condition, Sampler, check_control_map
from .models.conditioning import Conditioning
from .models.controlnet import check_controlnet_fits
from .models.denoiser import ControlledDenoiser, ControlSpec, DenoiserStats
from .models.generation_defaults import GenerationDefaults, read_generation_defaults, write_generation_defaults
from .models.loading import check_component_folder, load_component, read_json, resolve_model_path
from .models.sdxl import MicroConditioning, check_sdxl_models, takes_text_time
from .registry import controlnets as controlnet_providers
from .registry import get_condition, get_sampler
from .schedule import NoiseSchedule, guidance_embedding

ControlNetSource = str | os.PathLike | ControlNetModel

GUIDANCE_SCALE_RANGE = (0.0, 100.0)  # usual values are 1..15; beyond 100 is a typo, not a setting
CONDITIONING_SCALE_RANGE = (-10.0, 10.0)  # usual values are 0..2; negative scales push away from the control
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class CCMOutput:
    """What a pipeline call returns."""

    images: Any  # list of PIL images, a [B,H,W,3] array, or a [B,3,H,W] tensor
    nfe: int  # network (UNet) evaluations per image
    timings: dict[str, float]  # seconds: encode_prompt, prepare, denoise, decode, total
    step_seconds: list[float] = field(default_factory=list)
    stats: DenoiserStats | None = None


@dataclass
class _Prompt:
    embeds: torch.Tensor
    negative: torch.Tensor | None
    timestep_cond: torch.Tensor | None
    pooled: torch.Tensor | None = None  # SDXL: text_encoder_2's pooled, projected embedding
    negative_pooled: torch.Tensor | None = None


class CCMPipeline:
    """Consistency-model generation with ControlNets, an optional adapter, and pluggable samplers."""

    model_index_name = "model_index.json"

    def __init__(
        self,
        *,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler_config: dict[str, Any],
        controlnets: Sequence[ControlNetModel] = (),
        adapter: Adapter | None = None,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        force_zeros_for_empty_prompt: bool = True,
        generation_defaults: GenerationDefaults | None = None,
    ):
        """``text_encoder_2``/``tokenizer_2`` make an SDXL pipeline (its UNet must take
        ``addition_embed_type="text_time"``); ``force_zeros_for_empty_prompt`` is SDXL's rule that
        guidance without a negative prompt uses zero embeddings, as in diffusers.
        ``generation_defaults``: what a call leaves unset (the model folder's ``ccm_defaults.json``,
        e.g. the guidance scale an LCM was distilled for; models/generation_defaults.py)."""
        if generation_defaults is not None and not isinstance(generation_defaults, GenerationDefaults):
            raise InputTypeError(f"generation_defaults: expected a GenerationDefaults or None, got {_describe(generation_defaults)}")
        self.generation_defaults = generation_defaults or GenerationDefaults()
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        _check_family(unet, text_encoder, text_encoder_2, tokenizer_2)
        self.schedule = NoiseSchedule.from_scheduler_config(scheduler_config)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.controlnets: list[ControlNetModel] = []
        for net in controlnets:
            self.add_controlnet(net)
        self.adapter = None
        if adapter is not None:
            self.set_adapter(adapter)
        self.progress = True
        self.set_vae_channels_last(self.device.type == "cpu")
        if text_encoder_2 is None and text_encoder.config.hidden_size != unet.config.cross_attention_dim:
            raise IncompatibleModelsError(
                f"text encoder hidden size {text_encoder.config.hidden_size} does not match the UNet's "
                f"cross_attention_dim {unet.config.cross_attention_dim}"
            )
        if vae.config.latent_channels != unet.config.in_channels:
            raise IncompatibleModelsError(
                f"VAE latent channels {vae.config.latent_channels} do not match the UNet's in_channels {unet.config.in_channels}"
            )

    # --- components ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        # conv_in's weight, not ModelMixin.device: that walks every module (~1 ms a call)
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def is_lcm(self) -> bool:
        """True when the UNet takes the guidance-scale embedding (a distilled LCM)."""
        return self.unet.config.get("time_cond_proj_dim") is not None

    @property
    def is_sdxl(self) -> bool:
        """True for an SDXL-family model (two text encoders, size/crop micro-conditioning)."""
        return self.text_encoder_2 is not None

    def add_controlnet(self, controlnet: ControlNetModel) -> None:
        check_controlnet_fits(self.unet, controlnet, vae_scale_factor=self.vae_scale_factor, label=f"ControlNet {len(self.controlnets)}")
        if controlnet.device != self.device or controlnet.dtype != self.dtype:
            controlnet = controlnet.to(device=self.device, dtype=self.dtype)
        self.controlnets.append(controlnet.eval())

    def set_controlnets(self, controlnets: Sequence[ControlNetModel]) -> None:
        """Replace every ControlNet (each is checked against the UNet and the adapter)."""
        previous, self.controlnets = self.controlnets, []
        try:
            for net in controlnets:
                self.add_controlnet(net)
                if self.adapter is not None:
                    self.adapter.check_compatible(net)
        except Exception:
            self.controlnets = previous
            raise

    def set_adapter(self, adapter: Adapter | None) -> None:
        """Install (or remove, with None) the adapter applied to every ControlNet's residuals."""
        if adapter is not None:
            if not isinstance(adapter, Adapter):
                raise InputTypeError(f"expected an ccm_sdk Adapter, got {type(adapter).__name__}")
            for net in self.controlnets:
                adapter.check_compatible(net)
            adapter = adapter.to(device=self.device, dtype=self.dtype).eval()
        self.adapter = adapter

    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            mods["text_encoder_2"] = self.text_encoder_2
        mods.update({f"controlnet_{i}": net for i, net in enumerate(self.controlnets)})
        if self.adapter is not None:
            mods["adapter"] = self.adapter
        return mods

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CCMPipeline:
        for module in self.modules().values():
            module.to(device=device, dtype=dtype)
        return self

    def set_vae_channels_last(self, enabled: bool = True) -> CCMPipeline:
        """Run the VAE in channels-last memory format (on by default on a CPU).

        Its convolutions at full image size are the costliest part of a decode; channels-last runs
        them 1.1-1.7x faster on CPUs (``benchmarks/bench_pipeline.py``). Images then differ from the
        contiguous layout, and from diffusers, by rounding (about 1e-5); ``False`` restores
        bit-identical output.
        """
        self.vae.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self.vae_channels_last = enabled
        return self

    def enable_fast_path(self, *, dtype: torch.dtype | None = None, channels_last: bool = True, compile: bool = False) -> CCMPipeline:
        """Opt in to speed over bit-exactness: half precision where the hardware runs it fast
        (float16 on CUDA, bfloat16 on CPUs with AMX or AVX512-BF16), channels-last memory
        format, and optionally ``torch.compile`` of the networks. Outputs then differ from the
        exact float32 path by about 1e-2."""
        if dtype is None:
            if self.device.type == "cuda":
                dtype = torch.float16
            elif torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported():
                dtype = torch.bfloat16
        if dtype is not None:
            self.to(dtype=dtype)
        if channels_last:
            for module in self.modules().values():
                module.to(memory_format=torch.channels_last)
        if compile:
            self.unet = torch.compile(self.unet)
            self.vae.decoder = torch.compile(self.vae.decoder)
            self.controlnets = [torch.compile(net) for net in self.controlnets]
        return self

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self.progress = not disable

    # --- loading and saving -------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        *,
        controlnet: ControlNetSource | Sequence[ControlNetSource] | None = None,
        adapter: str | os.PathLike | Adapter | None = None,
        lora: str | os.PathLike | None = None,
        unet: str | os.PathLike | UNet2DConditionModel | None = None,
        torch_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        local_files_only: bool | None = None,
        revision: str | None = None,
        strict: bool = True,
    ) -> CCMPipeline:
        """Load a diffusers-layout model (folder or hub id), its ControlNet(s), adapter and LoRA.

        The family comes from the folder: Stable Diffusion 1.x/2.x (one text encoder), or SDXL
        (``text_encoder_2`` and ``tokenizer_2`` listed in ``model_index.json`` and a UNet with
        ``addition_embed_type="text_time"``); a layout that mixes them raises
        :class:`~ccm_sdk.errors.IncompatibleModelsError`. ``unet`` replaces the model's UNet
        (a folder, hub id or model, e.g. a distilled LCM UNet published on its own).
        ``lora`` is a LoRA file or folder (e.g. LCM-LoRA) loaded into the UNet with diffusers'
        LoRA loader (peft). With ``local_files_only`` (default: ``HF_HUB_OFFLINE``) the hub
        is never contacted. Loading is strict: a tensor the weights lack raises
        :class:`~ccm_sdk.errors.MissingWeightsError`, and a key of a diffusers ``config.json``
        (UNet, VAE, ControlNet) the model class does not take raises
        :class:`~ccm_sdk.errors.UnknownConfigKeyError`; ``strict=False`` turns the latter into a
        warning, for configs written by other diffusers versions.
        """
        # 1. find the folder and read its index
        root = resolve_model_path(source, local_files_only=local_files_only, revision=revision)
        if not root.is_dir():
            raise MissingModelError(f"expected a model folder with {cls.model_index_name}, got the file {str(root)!r}")
        index = read_json(root / cls.model_index_name, what=f"model {str(source)!r}")
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if name not in index or index[name] in (None, [None, None]):
                raise MissingModelError(f"model {str(source)!r}: model_index.json lists no {name!r} component")
        what = f"model {str(source)!r}"
        sdxl = _detect_sdxl(root, index, what=what, unet_given=unet is not None)
        # 2. load the components
        kw = dict(torch_dtype=torch_dtype, strict=strict)
        if unet is None:
            unet = load_component(UNet2DConditionModel, root / "unet", what=f"{what}, unet", **kw)
        elif isinstance(unet, UNet2DConditionModel):
            unet = unet.to(dtype=torch_dtype)
        else:
            unet_dir = resolve_model_path(unet, local_files_only=local_files_only, what="UNet")
            unet = load_component(UNet2DConditionModel, unet_dir, what=f"UNet {str(unet_dir)!r}", **kw)
        vae = load_component(AutoencoderKL, root / "vae", what=f"{what}, vae", **kw)
        text_encoder = load_component(CLIPTextModel, root / "text_encoder", what=f"{what}, text_encoder", **kw)
        tokenizer = _load_tokenizer(root / "tokenizer", what=f"{what}, tokenizer")
        sdxl_parts: dict[str, Any] = {}
        if sdxl:
            sdxl_parts = dict(
                text_encoder_2=load_component(CLIPTextModelWithProjection, root / "text_encoder_2", what=f"{what}, text_encoder_2", **kw),
                tokenizer_2=_load_tokenizer(root / "tokenizer_2", what=f"{what}, tokenizer_2"),
                force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
            )
        scheduler_config = read_json(root / "scheduler" / "scheduler_config.json", what=f"{what}, scheduler")
        pipe = cls(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler_config=scheduler_config,
                   generation_defaults=read_generation_defaults(root), **sdxl_parts)  # fmt: skip
        if device is not None:
            pipe.to(device)
        # 3. optional LoRA, ControlNets and adapter
        if lora is not None:
            pipe.load_lora(lora, local_files_only=local_files_only)
        sources = [] if controlnet is None else list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
        for item in sources:
            pipe.add_controlnet(load_controlnet(item, torch_dtype=torch_dtype, local_files_only=local_files_only, strict=strict))
        if adapter is not None:
            from .models.adapter import load_adapter

            pipe.set_adapter(adapter if isinstance(adapter, Adapter) else load_adapter(adapter, local_files_only=local_files_only))
        return pipe

    def load_lora(self, source: str | os.PathLike, *, adapter_name: str = "lcm", local_files_only: bool | None = None) -> None:
        """Load LoRA weights (diffusers, kohya or peft layout) into the UNet through diffusers' loader."""
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        path = resolve_model_path(source, local_files_only=local_files_only, what="LoRA")
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise MissingModelError(f"LoRA folder {str(path)!r} holds no .safetensors file")
            path = files[0]
        from .models.loading import check_safetensors

        check_safetensors(path)
        state_dict, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
        if not state_dict or not all("lora" in key for key in state_dict):
            raise IncompatibleModelsError(f"{str(path)!r} is not a LoRA checkpoint (every key should name a lora layer)")
        try:
            StableDiffusionLoraLoaderMixin.load_lora_into_unet(
                state_dict, network_alphas=alphas, unet=self.unet, adapter_name=adapter_name, metadata=metadata
            )
        except Exception as exc:
            raise IncompatibleModelsError(f"LoRA {str(path)!r} does not fit this UNet: {exc}") from exc

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the model in diffusers/hub layout (loadable by diffusers too); ControlNets and
        adapter go to ``controlnet_<i>/`` and ``adapter/``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        import diffusers

        index: dict[str, Any] = {
            "_class_name": "LatentConsistencyModelPipeline" if self.is_lcm else "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "LCMScheduler"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        if not self.is_lcm:
            index["image_encoder"] = [None, None]
        if self.is_sdxl:  # diffusers' SDXL pipeline takes no safety checker and zeroes empty negative prompts
            for name in ("safety_checker", "requires_safety_checker"):
                del index[name]
            index.update(_class_name="StableDiffusionXLPipeline", image_encoder=[None, None],
                         text_encoder_2=["transformers", "CLIPTextModelWithProjection"], tokenizer_2=["transformers", "CLIPTokenizer"],
                         force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)  # fmt: skip
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")[: 4 if self.is_sdxl else 3]:
            getattr(self, name).save_pretrained(path / name, safe_serialization=True)
        self.tokenizer.save_pretrained(path / "tokenizer")
        if self.is_sdxl:
            self.tokenizer_2.save_pretrained(path / "tokenizer_2")
        (path / "scheduler").mkdir(exist_ok=True)
        scheduler_config = {"_class_name": "LCMScheduler", "_diffusers_version": diffusers.__version__, **self.schedule.scheduler_config}
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2, sort_keys=True))
        for i, net in enumerate(self.controlnets):
            net.save_pretrained(path / f"controlnet_{i}", safe_serialization=True)
        if self.adapter is not None:
            self.adapter.save_pretrained(path / "adapter")
        write_generation_defaults(path, self.generation_defaults)
        (path / self.model_index_name).write_text(json.dumps(index, indent=2))
        return path

    # --- the call -----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(
        self, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] | None = None, do_cfg: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CLIP hidden states of the prompts (and of the negative prompts when ``do_cfg``); for SDXL
        both encoders' penultimate hidden states side by side."""
        embeds, negative, _, _ = self._encode_prompts(prompt, negative_prompt=negative_prompt, do_cfg=do_cfg)
        return embeds, negative

    def _encode_prompts(self, prompt, *, negative_prompt, do_cfg: bool):
        """(embeds, negative embeds, pooled, negative pooled); the pooled ones are None but for SDXL,
        and the negatives None without ``do_cfg``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds, pooled = self._encode_text(prompts, max_length=self.tokenizer.model_max_length)
        if not do_cfg:
            return embeds, None, pooled, None
        if self.is_sdxl and negative_prompt is None and self.force_zeros_for_empty_prompt:
            return embeds, torch.zeros_like(embeds), pooled, torch.zeros_like(pooled)  # as diffusers' SDXL pipelines do
        negatives = [""] * len(prompts) if negative_prompt is None else [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise InputError(f"expected {len(prompts)} negative prompts (one per prompt), got {len(negatives)}")
        negative, negative_pooled = self._encode_text(negatives, max_length=embeds.shape[1])
        return embeds, negative, pooled, negative_pooled

    def _encode_text(self, texts: list[str], *, max_length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, pooled embedding or None). SDXL: the penultimate hidden states of both
        encoders concatenated, and text_encoder_2's projected pooled output, as diffusers computes them."""
        if not self.is_sdxl:
            input_ids, attention_mask = self._tokenize(tuple(texts), max_length)
            mask = attention_mask.to(self.device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
            hidden = self.text_encoder(input_ids.to(self.device), attention_mask=mask)[0]
            return hidden.to(device=self.device), None
        states, pooled = [], None
        for which, encoder in enumerate((self.text_encoder, self.text_encoder_2)):
            input_ids, _ = self._tokenize(tuple(texts), max_length, which=which)
            output = encoder(input_ids.to(self.device), output_hidden_states=True)
            if pooled is None and output[0].ndim == 2:
                pooled = output[0]  # the projected text embedding of the encoder with a projection
            states.append(output.hidden_states[-2])
        hidden = torch.cat(states, dim=-1).to(device=self.device, dtype=self.text_encoder_2.dtype)
        return hidden, pooled.to(device=self.device)

    def _tokenize(self, texts: tuple[str, ...], max_length: int, which: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask from tokenizer ``which`` (1: SDXL's ``tokenizer_2``); the last few
        prompts are remembered (interactive use repeats them)."""
        key = (texts, max_length, which)
        cache = self.__dict__.setdefault("_token_cache", {})
        if key not in cache:
            tokenizer = self.tokenizer_2 if which else self.tokenizer
            tokens = tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
            if len(cache) >= 32:
                cache.pop(next(iter(cache)))
            cache[key] = (tokens.input_ids, tokens.attention_mask)
        return cache[key]

    def prepare_prompt(
        self, prompt, *, negative_prompt=None, guidance_scale: float, num_images_per_prompt: int, do_cfg: bool
    ) -> _Prompt:
        with torch.no_grad():
            encoded = self._encode_prompts(prompt, negative_prompt=negative_prompt, do_cfg=do_cfg)
        embeds, negative, pooled, negative_pooled = (
            None if v is None else v.repeat_interleave(num_images_per_prompt, dim=0) for v in encoded
        )
        timestep_cond = self._guidance_condition(guidance_scale, embeds.shape[0], embeds.dtype) if self.is_lcm else None
        return _Prompt(embeds, negative, timestep_cond, pooled, negative_pooled)

    def _guidance_condition(self, guidance_scale: float, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The w-embedding ``timestep_cond``; remembered under inference mode, where it cannot reach autograd."""
        dim = self.unet.config.time_cond_proj_dim
        key = (float(guidance_scale), batch, dim, dtype, self.device)
        cache = self.__dict__.setdefault("_guidance_cache", {})
        cached = cache.get(key) if torch.is_inference_mode_enabled() else None
        if cached is not None:
            return cached
        w = torch.tensor(guidance_scale - 1).repeat(batch)
        embedding = guidance_embedding(w, dim).to(self.device, dtype)
        if torch.is_inference_mode_enabled():
            if len(cache) >= 32:
                cache.pop(next(iter(cache)))
            cache[key] = embedding
        return embedding

    def prepare_control_image(self, image, controlnet: ControlNetModel, *, height: int | None, width: int | None, batch: int, index: int = 0) -> torch.Tensor:
        """Check one control image against its ControlNet and the output size; batch it."""
        expected = controlnet.config.conditioning_channels
        if isinstance(image, image_utils.Image.Image) and expected == 3 and image.mode != "RGB":
            image = image.convert("RGB")  # PIL images are converted as diffusers does; arrays and tensors are not
        tensor = image_utils.to_tensor(image)
        if tensor.shape[1] != expected:
            raise ChannelMismatchError(
                f"control image {index} has {tensor.shape[1]} channels but ControlNet {index} takes {expected}"
            )
        image_utils.check_image_tensor(tensor, name=f"control image {index}")
        h, w = tensor.shape[-2:]
        if (height is not None and h != height) or (width is not None and w != width):
            raise ImageSizeError(f"control image {index} is {h}x{w} but the output is {height}x{width}; resize it or pass matching height/width")
        if tensor.shape[0] not in (1, batch):
            raise InputError(f"control image {index} has batch {tensor.shape[0]}, expected 1 or {batch}")
        if tensor.shape[0] == 1 and batch > 1:
            tensor = tensor.repeat_interleave(batch, dim=0)
        return tensor.to(device=self.device, dtype=self.dtype)

    def check_inputs(
        self,
        *,
        prompt: Any,
        sampler: Sampler,
        num_inference_steps: Any,
        guidance_scale: Any,
        num_images_per_prompt: Any,
        height: Any,
        width: Any,
        strength: Any,
        has_init_image: bool,
        control_count: int,
        controlnet_conditioning_scale: Any,
        control_guidance_start: Any,
        control_guidance_end: Any,
        generator: Any,
        output_type: Any,
        negative_prompt: Any = None,
        batch: int | None = None,
    ) -> int:
        """Raise a typed error naming the first argument that does not fit, before any model runs;
        return the number of images.

        ``height``/``width`` may be None (then they come from the control image and are checked
        again); ``batch`` is the number of images when it is known other than from ``prompt``.
        """
        # 1. what to make: the prompt(s) and how many images of each
        if not (isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt))):
            raise InputTypeError(f"prompt: expected a str or a non-empty list of str, got {_describe(prompt)}")
        if not (negative_prompt is None or isinstance(negative_prompt, str)
                or (isinstance(negative_prompt, (list, tuple)) and all(isinstance(p, str) for p in negative_prompt))):
            raise InputTypeError(f"negative_prompt: expected None, a str or a list of str, got {_describe(negative_prompt)}")
        prompts = 1 if isinstance(prompt, str) else len(prompt)
        if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) != prompts:  # also where guidance leaves it unused
            raise InputError(f"expected {prompts} negative prompts (one per prompt), got {len(negative_prompt)}")
        count = _integer("num_images_per_prompt", num_images_per_prompt, low=1)
        batch = batch if batch is not None else (1 if isinstance(prompt, str) else len(prompt)) * count
        # 2. how: the sampler's steps, guidance, strength, output type
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral) or not (
            sampler.min_steps <= num_inference_steps <= sampler.max_steps
        ):
            raise StepCountError(
                f"expected {sampler.min_steps}..{sampler.max_steps} steps for the {sampler.name!r} sampler, got {num_inference_steps!r}"
            )
        _real("guidance_scale", guidance_scale, *GUIDANCE_SCALE_RANGE)
        _real("strength", strength, 0.0, 1.0, low_open=True)
        if strength != 1.0 and not has_init_image:
            raise InputError(f"strength: {strength} < 1 needs an init image (img2img); pass image=...")
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type: expected one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}")
        # 3. the output size, when given
        self._check_size(height, width)
        # 4. the ControlNets: one control image, scale and guidance window each
        if control_count != len(self.controlnets):
            raise InputError(f"expected {len(self.controlnets)} control image(s), one per ControlNet, got {control_count}")
        per_controlnet = {}
        for name, value, (low, high) in (("controlnet_conditioning_scale", controlnet_conditioning_scale, CONDITIONING_SCALE_RANGE),
                                         ("control_guidance_start", control_guidance_start, (0.0, 1.0)),
                                         ("control_guidance_end", control_guidance_end, (0.0, 1.0))):  # fmt: skip
            if not isinstance(value, (list, tuple)):
                _real(name, value, low, high)
            elif len(value) != len(self.controlnets):
                raise InputError(f"expected {len(self.controlnets)} values of {name} (one per ControlNet), got {len(value)}")
            else:
                for i, item in enumerate(value):
                    _real(f"{name}[{i}]", item, low, high)
            per_controlnet[name] = self._per_controlnet(value)
        for s, e in zip(per_controlnet["control_guidance_start"], per_controlnet["control_guidance_end"]):
            if not s < e:
                raise InputError(f"expected 0 <= control_guidance_start < control_guidance_end <= 1, got {s} and {e}")
        # 5. randomness: one generator, or one per image
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch:
                raise InputError(f"generator: expected {batch} generators (one per image), got {len(generator)}")
            bad = next((g for g in generator if not isinstance(g, torch.Generator)), None)
            if bad is not None:
                raise InputTypeError(f"generator: expected a list of torch.Generator, got one {_describe(bad)}")
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise InputTypeError(f"generator: expected a torch.Generator or a list of them, got {_describe(generator)}")
        return batch

    def _check_size(self, height: Any, width: Any) -> None:
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise InputTypeError(f"{name}: expected an int (pixels), got {_describe(value)}")
            if value < factor or value % factor:
                raise ImageSizeError(f"{name}: expected a positive multiple of the VAE factor {factor}, got {value}")

    def __call__(
        self,
        prompt: str | Sequence[str],
        control_image: Any = None,
        *,
        condition: str | Condition | Sequence[str | Condition] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 4,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        controlnet_conditioning_scale: float | Sequence[float] = 1.0,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        image: Any = None,
        strength: float = 1.0,
        sampler: str | Sampler = "consistency",
        output_type: str = "pil",
        callback: Callable[[dict[str, Any]], Any] | None = None,
        micro_conditioning: MicroConditioning | dict[str, Any] | None = None,
        _prompt: _Prompt | None = None,
    ) -> CCMOutput:
        """Generate images; see the README for the arguments. ``image``+``strength`` is img2img.
        ``micro_conditioning`` (SDXL only) sets the size/crop conditioning; see docs/sdxl.md.
        ``guidance_scale`` None: the model's recommended scale (``generation_defaults``, 8.0 unless
        its folder says otherwise)."""
        if guidance_scale is None:
            guidance_scale = self.generation_defaults.guidance_scale
        with torch.inference_mode():
            watch = _Stopwatch()
            sampler = get_sampler(sampler) if isinstance(sampler, str) else sampler
            if not isinstance(sampler, Sampler):
                raise InputTypeError(f"sampler: expected a sampler name (str) or a Sampler, got {_describe(sampler)}")
            if callback is not None and not callable(callback):
                raise InputTypeError(f"callback: expected None or a callable taking the step's dict, got {_describe(callback)}")
            # 1. checks of the arguments themselves, before any condition or network runs
            controls = self._control_list(control_image)
            batch = self.check_inputs(prompt=prompt, sampler=sampler, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                      num_images_per_prompt=num_images_per_prompt, height=height, width=width, strength=strength,
                                      has_init_image=image is not None, control_count=len(controls),
                                      controlnet_conditioning_scale=controlnet_conditioning_scale,
                                      control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
                                      generator=generator, output_type=output_type, negative_prompt=negative_prompt,
                                      batch=None if _prompt is None else _prompt.embeds.shape[0])  # fmt: skip
            if isinstance(generator, tuple):
                generator = list(generator)  # the samplers and randn_tensor take a list
            scales, starts, ends = (self._per_controlnet(v) for v in (controlnet_conditioning_scale, control_guidance_start, control_guidance_end))
            micro = self._micro_conditioning(micro_conditioning)
            # 2. controls: one control map per ControlNet, made from raw images when a condition is named; the output size
            controls = self._control_maps(controls, condition)
            height, width = self._output_size(controls, height, width)
            self._check_size(height, width)
            self._check_memory(batch, height, width)
            with watch("prepare"):  # the images' checks, still before any network runs
                specs = self._control_specs(controls, scales, starts, ends, height=height, width=width, batch=batch)
                self._check_latents(latents, batch=batch, height=height, width=width)
                if image is not None and tuple(_image_size(image)) != (height, width):
                    size = _image_size(image)
                    raise ImageSizeError(f"init image is {size[0]}x{size[1]} but the output is {height}x{width}")
            # 3. prompt
            with watch("encode_prompt"):
                prompt_state = _prompt or self.prepare_prompt(prompt, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                                                              num_images_per_prompt=num_images_per_prompt,
                                                              do_cfg=guidance_scale > 1.0 and not self.is_lcm)  # fmt: skip
            with watch("prepare"):
                # 4. timesteps and latents
                timesteps = sampler.timesteps(self.schedule, num_inference_steps, strength)
                latents = self._initial_latents(latents, generator=generator, image=image, timesteps=timesteps, batch=batch,
                                                height=height, width=width)  # fmt: skip
                # 5. denoiser
                denoiser = self._denoiser(prompt_state, guidance_scale=guidance_scale, controls=specs, timesteps=timesteps,
                                          size=(height, width), micro=micro)  # fmt: skip
            # 6. sample
            latents, step_seconds = self._sample(sampler, denoiser, latents, timesteps, generator=generator, callback=callback, watch=watch)
            # 7. decode
            with watch("decode"):
                images = latents if output_type == "latent" else self.decode_latents(latents, output_type=output_type)
            return CCMOutput(images=images, nfe=denoiser.stats.nfe, timings=watch.timings(), step_seconds=step_seconds, stats=denoiser.stats)

    def _micro_conditioning(self, value: Any) -> MicroConditioning | None:
        """Step 1: SDXL's size/crop conditioning, checked (None for the Stable Diffusion family)."""
        if not self.is_sdxl:
            if value is not None:
                raise InputError("micro_conditioning applies to SDXL models only; this model is Stable Diffusion 1.x/2.x")
            return None
        return MicroConditioning.coerce(value)

    def _control_list(self, control_image) -> list[Any]:
        """The control images as a list, one per ControlNet (a list is a batch when there is one ControlNet)."""
        several = isinstance(control_image, (list, tuple)) and len(self.controlnets) > 1
        return [] if control_image is None else list(control_image) if several else [control_image]

    def _control_maps(self, controls: list[Any], condition) -> list[Any]:
        """Step 2: the control images through their conditions when given."""
        if condition is None:
            return controls
        conds = list(condition) if isinstance(condition, (list, tuple)) else [condition]
        if len(conds) != len(controls):
            raise InputError(f"expected one condition per control image ({len(controls)}), got {len(conds)}")
        bad = next((c for c in conds if not (isinstance(c, str) or callable(c))), None)
        if bad is not None:
            raise InputTypeError(f"condition: expected a condition name (str), a Condition or a callable, got {_describe(bad)}")
        maps = []
        for c, img in zip(conds, controls):
            cond = get_condition(c) if isinstance(c, str) else c
            control = cond(img)
            # Condition.__call__ checks its map already; this catches subclasses that replace __call__
            maps.append(check_control_map(control, condition=cond) if isinstance(cond, Condition) else control)
        return maps

    def _per_controlnet(self, value: Any) -> list[Any]:
        """A per-ControlNet argument as a list: a single value applies to every ControlNet."""
        return list(value) if isinstance(value, (list, tuple)) else [value] * len(self.controlnets)

    def _output_size(self, controls: list[Any], height: int | None, width: int | None) -> tuple[int, int]:
        """Step 2: the output size: as given, else the first control image's, else the UNet's sample size."""
        if controls and (height is None or width is None):
            size = _image_size(controls[0])
            height, width = size[0] if height is None else height, size[1] if width is None else width
        default = self.unet.config.sample_size * self.vae_scale_factor
        return default if height is None else height, default if width is None else width

    def _control_specs(self, controls: list[Any], scales, starts, ends, *, height: int, width: int, batch: int) -> list[ControlSpec]:
        """Step 4: each ControlNet with its checked, batched control image and its scale and guidance window."""
        return [
            ControlSpec(net, self.prepare_control_image(img, net, height=height, width=width, batch=batch, index=i), s, a, b)
            for i, (net, img, s, a, b) in enumerate(zip(self.controlnets, controls, scales, starts, ends))
        ]

    def _initial_latents(self, latents: torch.Tensor | None, *, generator, image, timesteps, batch: int, height: int, width: int) -> torch.Tensor:
        """Step 4: the starting latents: drawn, or the given ones checked; noised onto the init image for img2img."""
        if isinstance(generator, tuple):
            generator = list(generator)  # randn_tensor takes a list
        if latents is None:
            latents = randn_tensor(self._latent_shape(batch, height, width), generator=generator, device=self.device, dtype=self.dtype)
        else:
            self._check_latents(latents, batch=batch, height=height, width=width)
            latents = latents.to(device=self.device, dtype=self.dtype)
        if image is not None:
            latents = self.schedule.add_noise(self.encode_image(image, height=height, width=width, batch=batch), latents, int(timesteps[0]))
        return latents

    def _check_memory(self, batch: int, height: int, width: int) -> None:
        """Step 2: refuse a batch whose float32 latents and decoded images alone exceed the device's memory
        (it could only fail later, in an allocation deep inside torch)."""
        total = _device_memory(self.device)
        per_image = 4 * (math.prod(self._latent_shape(1, height, width)) + 3 * height * width)
        if total is not None and batch * per_image > total:
            raise ValueRangeError(
                f"a batch of {batch} images of {height}x{width} needs at least {batch * per_image / 2**30:.1f} GiB for its latents "
                f"and images alone, more than this {self.device.type} device's {total / 2**30:.1f} GiB; lower num_images_per_prompt "
                "or the size, or generate in several calls"
            )

    def _latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        return batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    def _check_latents(self, latents: Any, *, batch: int, height: int, width: int) -> None:
        if latents is None:
            return
        if not isinstance(latents, torch.Tensor):
            raise InputTypeError(f"latents: expected a torch.Tensor or None, got {_describe(latents)}")
        latent_shape = self._latent_shape(batch, height, width)
        if tuple(latents.shape) != latent_shape:
            raise InputError(f"expected latents of shape {latent_shape}, got {tuple(latents.shape)}")
        if not torch.isfinite(latents).all():
            raise NonFiniteError("latents contain NaN or infinite values")

    def _denoiser(self, prompt: _Prompt, *, guidance_scale: float, controls: list[ControlSpec], timesteps,
                  size: tuple[int, int] | None = None, micro: MicroConditioning | None = None) -> ControlledDenoiser:  # fmt: skip
        """Step 5: the network the sampler calls, for this prompt, guidance and these controls
        (for SDXL also the output ``size`` (height, width) and its micro-conditioning)."""
        positive, negative = self._conditioning(prompt, size=size, micro=micro)
        return ControlledDenoiser(
            self.unet,
            prompt_embeds=positive,
            negative_embeds=negative,
            guidance_scale=guidance_scale,
            timestep_cond=prompt.timestep_cond,
            controls=controls,
            adapter=self.adapter,
            timesteps=[int(t) for t in timesteps],
        )

    def _conditioning(self, prompt: _Prompt, *, size: tuple[int, int] | None, micro: MicroConditioning | None):
        """The (positive, negative) text conditioning of the UNet: the hidden states, and for SDXL the
        pooled embeddings and time ids as ``added_cond_kwargs``, as diffusers' SDXL pipelines build them."""
        if not self.is_sdxl:
            return prompt.embeds, prompt.negative
        if size is None:
            raise InputError("an SDXL model needs the output size (height, width) for its time ids")
        time_ids, negative_time_ids = (micro or MicroConditioning()).time_ids(*size)
        batch, dtype = prompt.embeds.shape[0], prompt.embeds.dtype

        def added(pooled: torch.Tensor, ids: list[int]) -> dict[str, torch.Tensor]:
            return {"text_embeds": pooled, "time_ids": torch.tensor([ids], dtype=dtype, device=self.device).repeat(batch, 1)}

        positive = Conditioning(prompt.embeds, added(prompt.pooled, time_ids))
        if prompt.negative is None:
            return positive, None
        return positive, Conditioning(prompt.negative, added(prompt.negative_pooled, negative_time_ids))

    def _sample(self, sampler: Sampler, denoiser: ControlledDenoiser, latents: torch.Tensor, timesteps, *, generator, callback,
                watch: _Stopwatch) -> tuple[torch.Tensor, list[float]]:  # fmt: skip
        """Step 6: run the sampler with progress and per-step timing; (final latents, seconds per step)."""
        step_seconds: list[float] = []
        progress = _progress(len(timesteps), enabled=self.progress)
        last = [time.perf_counter()]

        def on_step(info: dict[str, Any]) -> None:
            now = time.perf_counter()
            step_seconds.append(now - last[0])
            last[0] = now
            progress.update(1)
            if callback is not None:
                callback(info)

        with watch("denoise"):
            with denoiser.session():
                latents = sampler.sample(denoiser, latents, timesteps, schedule=self.schedule, callback=on_step, generator=generator)
            progress.close()
        if not torch.isfinite(latents).all():
            raise NonFiniteError("sampling produced NaN or infinite latents (check the model weights and dtype)")
        return latents, step_seconds

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, *, output_type: str = "pil"):
        """Latents -> images in [0, 1] as PIL list, numpy array or tensor."""
        if output_type not in ("pil", "np", "pt"):
            raise InputError(f"expected output_type 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        scaled = latents / self.vae.config.scaling_factor
        shift = self.vae.config.get("shift_factor")
        with self._vae_upcast() as vae_dtype:
            decoded = self.vae.decode((scaled + shift if shift else scaled).to(vae_dtype), return_dict=False)[0]
        # in place on the decoder's fresh output: the same values as (x / 2 + 0.5).clamp(0, 1), two allocations fewer
        return image_utils.from_tensor(decoded.div(2).add_(0.5).clamp_(0, 1).float(), output_type)

    @torch.no_grad()
    def encode_image(self, image, *, height: int, width: int, batch: int) -> torch.Tensor:
        """Init image -> VAE latents (the posterior mean, so edits are deterministic)."""
        tensor = image_utils.to_rgb(image_utils.to_tensor(image, channels=(1, 3, 4)))
        if tuple(tensor.shape[-2:]) != (height, width):
            raise ImageSizeError(f"init image is {tensor.shape[-2]}x{tensor.shape[-1]} but the output is {height}x{width}")
        if tensor.shape[0] not in (1, batch):
            raise InputError(f"init image has batch {tensor.shape[0]}, expected 1 or {batch}")
        with self._vae_upcast() as vae_dtype:
            tensor = tensor.to(device=self.device, dtype=vae_dtype) * 2 - 1
            latents = self.vae.encode(tensor).latent_dist.mode().to(self.dtype)
        shift = self.vae.config.get("shift_factor") or 0.0
        latents = (latents - shift) * self.vae.config.scaling_factor
        return latents.expand(batch, -1, -1, -1) if latents.shape[0] == 1 else latents

    @contextlib.contextmanager
    def _vae_upcast(self) -> Iterator[torch.dtype]:
        """Run the VAE in float32 for SDXL in float16 when its config asks (``force_upcast``), as diffusers'
        SDXL pipelines do: the SDXL VAE overflows in float16. Yields the dtype the VAE's inputs take."""
        dtype = self.vae.decoder.conv_in.weight.dtype
        if not (self.is_sdxl and dtype == torch.float16 and self.vae.config.get("force_upcast", False)):
            yield dtype
            return
        self.vae.to(dtype=torch.float32)
        try:
            yield torch.float32
        finally:
            self.vae.to(dtype=dtype)

    def stream(self, frames: Iterable[Any], prompt: str, *, seed: int = 0, similarity_threshold: float | None = 0.004,
               batch_size: int = 1, seed_policy: str = "fixed", realtime: bool = False, **kwargs: Any) -> Iterator[Any]:
        """Generate one output per control frame, for real-time use (a :class:`ccm_sdk.streaming.StreamEngine`).

        The prompt is encoded once; with the default ``seed_policy="fixed"`` every frame restarts the
        same seeded random stream, so consecutive frames stay coherent. Frames whose control map
        differs from the last generated one by at most ``similarity_threshold`` (mean absolute
        difference in [0, 1]; None turns the filter off) get the last image without running the
        networks (``output.skipped``). ``batch_size`` frames share one network call. With
        ``realtime=True`` the frames are read on a thread and stale ones are dropped while a frame
        generates (a live camera). Other keyword arguments are :class:`~ccm_sdk.streaming.StreamEngine`'s
        and the pipeline call's (``num_inference_steps``, ``condition``, ``img2img``, ``output_type``...).
        Yields :class:`~ccm_sdk.streaming.StreamOutput` objects.
        """
        from .streaming import StreamEngine

        if realtime and batch_size != 1:
            raise InputError(f"realtime=True generates the newest frame each time; it takes batch_size=1, got {batch_size!r}")
        engine = StreamEngine(self, prompt, seed=seed, similarity_threshold=similarity_threshold, batch_size=batch_size,
                              seed_policy=seed_policy, **kwargs)
        return engine.follow(frames) if realtime else engine.run(frames)


def load_controlnet(
    source: ControlNetSource, *, torch_dtype: torch.dtype = torch.float32, local_files_only: bool | None = None, strict: bool = True
) -> ControlNetModel:
    """A ControlNetModel instance, a folder / hub id, or ``"provider:argument"`` for a registered provider.

    ``strict`` applies to folders and hub ids (see :meth:`CCMPipeline.from_pretrained`); a
    registered provider loads as it does.
    """
    if isinstance(source, ControlNetModel):
        return source
    if isinstance(source, torch.nn.Module):
        raise InputTypeError(f"expected a diffusers ControlNetModel, got {type(source).__name__}")
    text = str(source)
    provider, sep, argument = text.partition(":")
    if sep and provider in controlnet_providers and not Path(text).exists():
        return controlnet_providers.get(provider)(argument, torch_dtype=torch_dtype, local_files_only=local_files_only)
    # a folder, a hub id, or "name:argument" of a plugin's model source
    return controlnet_providers.get("diffusers")(text, torch_dtype=torch_dtype, local_files_only=local_files_only, strict=strict)


def _detect_sdxl(root: Path, index: dict[str, Any], *, what: str, unet_given: bool) -> bool:
    """Whether the folder is an SDXL layout; a typed error when its index and its UNet disagree."""
    listed = [name for name in ("text_encoder_2", "tokenizer_2") if index.get(name) not in (None, [None, None])]
    if len(listed) == 1:
        missing = ({"text_encoder_2", "tokenizer_2"} - set(listed)).pop()
        raise MissingModelError(f"{what}: model_index.json lists {listed[0]!r} but no {missing!r}; an SDXL model needs both")
    if unet_given:
        return bool(listed)
    unet_config = read_json(root / "unet" / "config.json", what=f"{what}, unet")
    embed_type = unet_config.get("addition_embed_type")
    if listed and not takes_text_time(unet_config):
        raise IncompatibleModelsError(
            f"{what} has text_encoder_2 and tokenizer_2 (the SDXL layout) but its UNet's addition_embed_type is {embed_type!r}; "
            "expected 'text_time', the SDXL UNet that takes the pooled text embedding and size/crop time ids"
        )
    if not listed and takes_text_time(unet_config):
        raise IncompatibleModelsError(
            f"{what}: the UNet takes SDXL's added conditions (addition_embed_type 'text_time') but model_index.json lists no "
            "text_encoder_2/tokenizer_2; expected the SDXL layout (models without a first text encoder, such as the SDXL refiner, "
            "are not supported)"
        )
    return bool(listed)


def _load_tokenizer(folder: Path, *, what: str) -> CLIPTokenizer:
    check_component_folder(folder, what=what, config_name="tokenizer_config.json", weights=False)
    try:
        return CLIPTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise MissingModelError(f"{what}: cannot load {str(folder)!r}: {exc}") from exc


def _check_family(unet: UNet2DConditionModel, text_encoder, text_encoder_2, tokenizer_2) -> None:
    """Raise IncompatibleModelsError unless the text encoders fit the UNet's family
    (Stable Diffusion: one encoder; SDXL: two, and a UNet with ``addition_embed_type="text_time"``)."""
    if (text_encoder_2 is None) != (tokenizer_2 is None):
        raise IncompatibleModelsError("an SDXL pipeline takes text_encoder_2 and tokenizer_2 together; got only one of them")
    sdxl_unet = takes_text_time(unet.config)
    if text_encoder_2 is None and sdxl_unet:
        raise IncompatibleModelsError("the UNet takes SDXL's added conditions (addition_embed_type 'text_time'); expected text_encoder_2 and tokenizer_2")
    if text_encoder_2 is not None and not sdxl_unet:
        raise IncompatibleModelsError(
            f"text_encoder_2 was given (SDXL) but the UNet's addition_embed_type is {unet.config.get('addition_embed_type')!r}, expected 'text_time'"
        )
    if text_encoder_2 is not None:
        check_sdxl_models(unet, text_encoder, text_encoder_2)


def _describe(value: Any) -> str:
    """A received value for an error message: its type, and its repr when short."""
    text = repr(value)
    return f"{type(value).__name__} {text}" if len(text) <= 60 else type(value).__name__


def _device_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (physical RAM for the CPU), or None where it cannot be read."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError, RuntimeError):
        pass
    return None


def _integer(name: str, value: Any, *, low: int) -> int:
    """``value`` as an int (not a bool) of at least ``low``, or a typed error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{name}: expected an int >= {low}, got {_describe(value)}")
    if value < low:
        raise ValueRangeError(f"{name}: expected an int >= {low}, got {value}")
    return int(value)


def _real(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a finite float in [low, high] (or (low, high]), or a typed error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{name}: expected a real number, got {_describe(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise NonFiniteError(f"{name}: expected a finite number, got {number}")
    if not low <= number <= high or (low_open and number == low):
        raise ValueRangeError(f"{name}: expected a number in {'(' if low_open else '['}{low:g}, {high:g}], got {number:g}")
    return number


def _image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image, array or tensor without converting it."""
    if isinstance(image, image_utils.Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor):
        return tuple(image.shape[-2:])
    if hasattr(image, "shape") and len(image.shape) >= 2:
        return tuple(image.shape[-3:-1]) if len(image.shape) >= 3 else tuple(image.shape)
    return tuple(image_utils.to_tensor(image).shape[-2:])


class _Stopwatch:
    """Seconds per named phase of one call (``with watch(name): ...``), and the total since it was made."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        begin = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - begin

    def timings(self) -> dict[str, float]:
        return {**self.seconds, "total": time.perf_counter() - self.start}


class _NoProgress:
    """Stands in for a tqdm bar when progress is off: updates are ignored."""

    def update(self, n: int = 1) -> None:
        """Ignore the update."""

    def close(self) -> None:
        """Nothing to close."""


def _progress(total: int, *, enabled: bool):
    if not enabled or total < 2:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="step", leave=False)
