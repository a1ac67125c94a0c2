"""Real-time generation from a stream of frames: :class:`StreamEngine`.

It is what :meth:`CCMPipeline.stream` and ``ccm serve``'s ``/api/stream`` run. The ideas are
those that make StreamDiffusion fast, each optional and measured in ``benchmarks/bench_stream.py``:

- the prompt is encoded once per stream (and again only when it changes);
- a similarity filter skips frames whose control map (and, in img2img, whose picture) has
  barely changed since the last generated frame: the mean absolute difference in [0, 1] is at
  most ``similarity_threshold``; a skipped frame gets the last image and runs no network;
- a latest-frame queue (:class:`LatestFrameQueue`) keeps only the newest frame of a live source,
  so a slow generation drops stale frames instead of building a backlog;
- frames can be generated ``batch_size`` at a time (one network call for several frames);
- a seed policy: ``"fixed"`` (one seed for the whole stream, so a still scene stays still) or
  ``"increment"`` (seed + frame index).
"""

from __future__ import annotations

import numbers
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import torch

from . import images as image_utils
from .errors import InputError, InputTypeError, ValueRangeError

if TYPE_CHECKING:  # the pipeline imports this module in CCMPipeline.stream
    from .models.denoiser import DenoiserStats
    from .pipeline import CCMPipeline, _Prompt

DEFAULT_SIMILARITY_THRESHOLD = 0.004  # a moved stroke of a 64x64 sketch is about 0.01; sensor noise through a condition, 0
SEED_POLICIES = ("fixed", "increment")
MAX_BATCH_SIZE = 64


@dataclass
class StreamOutput:
    """One output per input frame: :class:`~ccm_sdk.pipeline.CCMOutput`'s fields and where the frame came from."""

    images: Any  # one image: a list of one PIL image, a [1,H,W,3] array or a [1,3,H,W] tensor
    nfe: int  # network evaluations for this image (0 when skipped)
    timings: dict[str, float]  # seconds, of the pipeline call that made it (shared by a batch)
    step_seconds: list[float] = field(default_factory=list)
    stats: DenoiserStats | None = None
    frame: int = 0  # the input frame's index in the stream
    skipped: bool = False  # the filter kept the last image: no network ran for this frame (nfe 0)
    difference: float | None = None  # mean absolute difference to the last generated frame's inputs (None: first frame)
    seed: int = 0  # the seed the image was generated with
    latency: float = 0.0  # seconds from taking the frame to its output


@dataclass
class StreamStats:
    """Counts over a stream so far."""

    frames: int = 0  # frames processed (dropped ones not counted)
    generated: int = 0  # frames that ran the networks
    skipped: int = 0  # frames the similarity filter answered with the last image
    batches: int = 0  # pipeline calls
    nfe: int = 0  # network evaluations in all
    dropped: int = 0  # stale frames a latest-frame queue replaced before they were taken


class LatestFrameQueue:
    """A one-slot queue between a live source and a slower consumer: a new frame replaces one not yet taken.

    :meth:`get` returns the newest frame; the ones it replaced are counted in :attr:`dropped`.
    After :meth:`close`, :meth:`get` still returns a frame left in the slot, then None.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._item: Any = None
        self._full = False
        self._closed = False
        self.dropped = 0
        self.received = 0

    def put(self, item: Any) -> bool:
        """Offer ``item``; True when it replaced a stale frame. Raises :class:`InputError` once closed."""
        with self._cond:
            if self._closed:
                raise InputError("the frame queue is closed and takes no more frames")
            replaced = self._full
            self.dropped += replaced
            self.received += 1
            self._item, self._full = item, True
            self._cond.notify()
            return replaced

    def get(self, timeout: float | None = None) -> Any:
        """The newest frame, waiting up to ``timeout`` seconds; None when closed and empty (or on timeout)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._full or self._closed, timeout):
                return None
            if not self._full:
                return None
            item, self._item, self._full = self._item, None, False
            return item

    def close(self) -> None:
        """No more frames: wakes a waiting :meth:`get`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


@dataclass
class _Frame:
    index: int
    control: torch.Tensor | None  # [1,C,H,W] on the pipeline's device, or None without a ControlNet
    image: torch.Tensor | None  # [1,3,H,W] init image (img2img), or None
    taken: float  # time.perf_counter() when the frame was taken
    seed: int
    difference: float | None = None
    source: int | None = None  # for a skipped frame: the index of the generated frame whose image it gets


@dataclass
class _Pending:
    frames: list[_Frame] = field(default_factory=list)  # in order, generated and skipped ones
    generated: list[_Frame] = field(default_factory=list)


class StreamEngine:
    """Generates one image per frame of a stream, with the prompt encoded once, a similarity filter,
    optional batching and a seed policy (see the module docstring).

    Frames are control maps (or, with ``condition``, images the condition turns into control maps,
    e.g. camera frames through ``"canny"``); with ``img2img=True`` each frame is also the init image,
    noised to ``strength``. A fixed init picture can be passed as ``image=`` instead. Other keyword
    arguments (``controlnet_conditioning_scale``, ``sampler``, ``height``...) go to every pipeline call.
    """

    def __init__(self, pipe: CCMPipeline, prompt: str, *, negative_prompt: str | None = None, num_inference_steps: int = 4,
                 guidance_scale: float | None = None, condition: Any = None, similarity_threshold: float | None = DEFAULT_SIMILARITY_THRESHOLD,
                 batch_size: int = 1, seed: int = 0, seed_policy: str = "fixed", img2img: bool = False, strength: float = 1.0,
                 output_type: str = "pil", **pipe_kwargs: Any):
        if not isinstance(prompt, str) or not prompt:
            raise InputTypeError(f"prompt: expected a non-empty str (one prompt per stream), got {prompt!r}")
        if similarity_threshold is not None:
            if isinstance(similarity_threshold, bool) or not isinstance(similarity_threshold, numbers.Real) or not 0 <= similarity_threshold <= 1:
                raise ValueRangeError(f"similarity_threshold: expected a mean absolute difference in [0, 1] or None (no filter), "
                                      f"got {similarity_threshold!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueRangeError(f"batch_size: expected frames per network call in 1..{MAX_BATCH_SIZE}, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueRangeError(f"seed: expected an int >= 0, got {seed!r}")
        if seed_policy not in SEED_POLICIES:
            raise InputError(f"seed_policy: expected one of {', '.join(map(repr, SEED_POLICIES))}, got {seed_policy!r}")
        for name in ("control_image", "generator", "latents", "num_images_per_prompt", "_prompt"):
            if name in pipe_kwargs:
                raise InputError(f"{name}: a stream sets it per frame; pass frames (and seed / seed_policy) instead")
        if img2img and "image" in pipe_kwargs:
            raise InputError("img2img=True takes each frame as the init image; pass a fixed picture as image= or img2img=True, not both")
        self.pipe = pipe
        self.negative_prompt = negative_prompt
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = pipe.generation_defaults.guidance_scale if guidance_scale is None else guidance_scale
        self.similarity_threshold = None if similarity_threshold is None else float(similarity_threshold)
        self.batch_size = batch_size
        self.seed, self.seed_policy = seed, seed_policy
        self.img2img, self.strength = img2img, strength
        self.output_type = output_type
        self.pipe_kwargs = pipe_kwargs
        self.condition = self._resolve_condition(condition)
        self.stats = StreamStats()
        self.prompt_encodings = 0
        self._frames_seen = 0
        self._last: _Frame | None = None  # the last generated frame: what the filter compares against
        self._last_output: StreamOutput | None = None
        self._prompt_states: dict[int, _Prompt] = {}
        self.set_prompt(prompt)

    @staticmethod
    def _resolve_condition(condition: Any) -> Any:
        if condition is None or not isinstance(condition, str):
            return condition
        from .registry import get_condition

        return get_condition(condition)

    # --- settings that may change during a stream ----------------------------------------

    def set_prompt(self, prompt: str, *, guidance_scale: float | None = None) -> None:
        """Encode a new prompt (once); the next frame is generated whatever the filter says."""
        if not isinstance(prompt, str) or not prompt:
            raise InputTypeError(f"prompt: expected a non-empty str, got {prompt!r}")
        if guidance_scale is not None:
            self.guidance_scale = pipe.generation_defaults.guidance_scale if guidance_scale is None else guidance_scale
        self.prompt = prompt
        do_cfg = self.guidance_scale > 1.0 and not self.pipe.is_lcm
        with torch.inference_mode():
            state = self.pipe.prepare_prompt(prompt, negative_prompt=self.negative_prompt, guidance_scale=self.guidance_scale,
                                             num_images_per_prompt=1, do_cfg=do_cfg)
        self.prompt_encodings += 1
        self._prompt_states = {1: state}
        self.invalidate()

    def invalidate(self) -> None:
        """Forget the last generated frame: the next frame runs the networks (after a settings change)."""
        self._last = None

    def _prompt_state(self, batch: int) -> _Prompt:
        """The encoded prompt for ``batch`` images: the one encoding repeated, no text encoder call."""
        if batch not in self._prompt_states:
            one = self._prompt_states[1]
            with torch.inference_mode():
                repeated = {f.name: None if getattr(one, f.name) is None else getattr(one, f.name).repeat_interleave(batch, dim=0)
                            for f in fields(one)}  # embeds, negative, timestep_cond and any pooled embeddings (SDXL)
                self._prompt_states[batch] = replace(one, **repeated)
        return self._prompt_states[batch]

    # --- frames ---------------------------------------------------------------------------

    def _take(self, frame: Any) -> _Frame:
        """A raw frame -> its control map (through the condition) and init image, as [1,C,H,W] tensors."""
        index = self._frames_seen
        self._frames_seen += 1
        taken = time.perf_counter()
        with torch.inference_mode():
            control = image = None
            if self.pipe.controlnets:
                if self.condition is not None:
                    control = self.condition(frame)
                else:
                    wanted = self.pipe.controlnets[0].config.conditioning_channels
                    if isinstance(frame, image_utils.Image.Image) and wanted == 3 and frame.mode != "RGB":
                        frame = frame.convert("RGB")  # as the pipeline converts PIL control images
                    control = image_utils.to_tensor(frame)
                if control.shape[0] != 1:
                    raise InputError(f"frame {index}: expected one image per frame, got a batch of {control.shape[0]}")
                control = control.to(device=self.pipe.device, dtype=self.pipe.dtype)
            if self.img2img:
                image = image_utils.to_rgb(image_utils.to_tensor(frame, channels=(1, 3, 4))).to(device=self.pipe.device, dtype=self.pipe.dtype)
        seed = self.seed if self.seed_policy == "fixed" else self.seed + index
        return _Frame(index, control, image, taken, seed)

    def _difference(self, frame: _Frame) -> float | None:
        """Mean absolute difference of the frame's inputs to the last generated frame's (the larger of
        control map and init image); None when there is nothing comparable."""
        last = self._last
        if last is None or last.seed != frame.seed:
            return None
        parts = []
        for mine, theirs in ((frame.control, last.control), (frame.image, last.image)):
            if mine is None:
                continue
            if theirs is None or mine.shape != theirs.shape:
                return None
            parts.append(float((mine - theirs).abs().mean()))
        return max(parts) if parts else 0.0

    def _filter(self, frame: _Frame) -> bool:
        """True when the frame is to be skipped; remembers it as the last generated one otherwise."""
        frame.difference = self._difference(frame)
        skip = self.similarity_threshold is not None and frame.difference is not None and frame.difference <= self.similarity_threshold
        if skip:
            frame.source = self._last.index
        else:
            self._last = frame
        return skip

    def _generate(self, frames: list[_Frame]) -> list[StreamOutput]:
        """One pipeline call for ``frames`` (a batch), one output each."""
        batch = len(frames)
        controls = torch.cat([f.control for f in frames]) if frames[0].control is not None else None
        kwargs = dict(self.pipe_kwargs)
        if self.img2img:
            kwargs["image"] = torch.cat([f.image for f in frames])
        if self.img2img or "image" in kwargs:
            kwargs["strength"] = self.strength
        generators = [torch.Generator(device=self.pipe.device).manual_seed(f.seed) for f in frames]
        progress, self.pipe.progress = self.pipe.progress, False
        try:
            output = self.pipe(self.prompt, controls, negative_prompt=self.negative_prompt, num_inference_steps=self.num_inference_steps,
                               guidance_scale=self.guidance_scale, generator=generators if batch > 1 else generators[0],
                               output_type=self.output_type, _prompt=self._prompt_state(batch), **kwargs)
        finally:
            self.pipe.progress = progress
        self.stats.batches += 1
        self.stats.generated += batch
        self.stats.nfe += output.nfe * batch
        done = time.perf_counter()
        return [StreamOutput(images=output.images[i : i + 1], nfe=output.nfe, timings=output.timings, step_seconds=output.step_seconds,
                             stats=output.stats, frame=f.index, skipped=False, difference=f.difference, seed=f.seed,
                             latency=done - f.taken)
                for i, f in enumerate(frames)]  # fmt: skip

    def _skipped(self, frame: _Frame, source: StreamOutput) -> StreamOutput:
        self.stats.skipped += 1
        return StreamOutput(images=source.images, nfe=0, timings={"total": time.perf_counter() - frame.taken}, frame=frame.index,
                            skipped=True, difference=frame.difference, seed=source.seed, latency=time.perf_counter() - frame.taken)

    def process(self, frame: Any) -> StreamOutput:
        """One frame now: the last image when the filter skips it, else a fresh one (batch of one)."""
        taken = self._take(frame)
        self.stats.frames += 1
        if self._filter(taken) and self._last_output is not None and self._last_output.frame == taken.source:
            return self._skipped(taken, self._last_output)
        self._last = taken  # also when a batched run() was left with its last batch ungenerated
        self._last_output = self._generate([taken])[0]
        return self._last_output

    def run(self, frames: Iterable[Any]) -> Iterator[StreamOutput]:
        """One output per frame, in order; with ``batch_size`` > 1, generated frames go ``batch_size`` per call
        (the outputs of a batch come once it is full, or at the end of the stream)."""
        pending = _Pending()
        for frame in frames:
            taken = self._take(frame)
            self.stats.frames += 1
            pending.frames.append(taken)
            if not self._filter(taken):
                pending.generated.append(taken)
            if len(pending.generated) >= self.batch_size:
                yield from self._flush(pending)
                pending = _Pending()
        if pending.frames:
            yield from self._flush(pending)

    def _flush(self, pending: _Pending) -> Iterator[StreamOutput]:
        made = {out.frame: out for out in self._generate(pending.generated)} if pending.generated else {}
        for frame in pending.frames:
            if frame.index in made:
                self._last_output = made[frame.index]
                yield made[frame.index]
            else:
                yield self._skipped(frame, made.get(frame.source) or self._last_output)

    def follow(self, source: Iterable[Any]) -> Iterator[StreamOutput]:
        """Real-time mode: a thread reads ``source`` (a camera, a socket) into a :class:`LatestFrameQueue`;
        each output is for the newest frame at the time, so frames that arrive during a generation are
        dropped (counted in ``stats.dropped``) instead of queuing up. The last frame is always processed."""
        frames = LatestFrameQueue()
        failure: list[BaseException] = []

        def read() -> None:
            try:
                for item in source:
                    frames.put(item)
            except BaseException as exc:  # handed to the consumer, which raises it
                failure.append(exc)
            finally:
                frames.close()

        reader = threading.Thread(target=read, name="ccm-stream-reader", daemon=True)
        reader.start()
        try:
            while (item := frames.get()) is not None:
                self.stats.dropped = frames.dropped
                yield self.process(item)
            self.stats.dropped = frames.dropped
            if failure:
                raise failure[0]
        finally:
            frames.close()

