"""Run an eval config: generate with every method, step count and condition; score FID, Fidelity, NFE, time.

For each condition the control maps c come from the first ``num_samples`` dataset items (the
condition run on the real image, or the dataset's own maps), and every method generates one
image per item from its caption and c, with the same seeded noise per item across methods, so
rows differ only by method. FID compares the generated images with those real images, in the
features of ``config.features``; with small N it is biased upwards (compare rows of one run).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable

import torch

from ..conditions.mask import MaskCondition, random_masks
from ..errors import ChannelMismatchError, EvalInterrupted, InputError
from ..interfaces import Condition
from ..registry import get_condition, get_sampler
from ..utils.stopping import StopSignals
from .colour import ColourTargets, colour_accuracy
from .config import ConditionConfig, EvalConfig, MethodConfig, check_factory_allowed, check_names, expand_methods
from .features import extract_features, load_extractor
from .fid import fid_from_features
from .fidelity import fidelity, fidelity_per_image, line_f1_per_image
from .limbs import LimbTargets, limb_accuracy
from .progress import EvalProgress
from .results import EvalResult, EvalRow
from .shape import ShapeTargets, shape_accuracy


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but CUDA is not available")
    return torch.device(name)


def build_dataset(config: EvalConfig):
    """The torch Dataset an eval config names."""
    source = config.dataset
    if source.name is not None:
        from ..registry import get_dataset

        return get_dataset(source.name, **source.options)
    if source.factory is not None:
        check_factory_allowed(source.factory)
        module_name, _, attribute = source.factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as exc:
            raise InputError(f"dataset.factory {source.factory!r} is not an importable 'module:callable': {exc}") from None
        return factory(**source.options)
    from ..datasets import ImageFolderDataset

    keys = [c.dataset_key for c in config.conditions if c.control == "dataset"]
    return ImageFolderDataset(source.path, control_keys=keys, resolution=source.resolution)


def _fit_channels(control: torch.Tensor, channels: int, what: str) -> torch.Tensor:
    if control.shape[1] == channels:
        return control
    if control.shape[1] == 1 and channels == 3:
        return control.expand(-1, 3, -1, -1)
    raise ChannelMismatchError(f"{what} has {control.shape[1]} channels, the condition makes {channels}")


def control_maps(spec: ConditionConfig, condition: Condition, images: torch.Tensor, items: list[dict], seed: int) -> torch.Tensor:
    """c for every real image: the condition's output, or the dataset's map under ``spec.dataset_key``."""
    if spec.control == "dataset":
        maps = []
        for index, item in enumerate(items):
            control = item.get("controls", {}).get(spec.dataset_key)
            if control is None:
                raise InputError(f"dataset item {index} has no control map {spec.dataset_key!r} for condition {spec.title!r}")
            maps.append(control)
        return _fit_channels(torch.stack(maps).float(), condition.channels, f"dataset control map {spec.dataset_key!r}")
    kwargs = {}
    if isinstance(condition, MaskCondition):
        kwargs["mask"] = random_masks(images.shape[0], *images.shape[-2:], seed=seed)
    return condition(images, **kwargs)


class _Pipelines:
    """Loads each model once and swaps ControlNets and adapters into it."""

    def __init__(self, device: torch.device):
        self.device, self._loaded = device, {}

    def get(self, method: MethodConfig, controlnet: str | None):
        from ..models.adapter import load_adapter
        from ..pipeline import CCMPipeline, load_controlnet

        key = (method.model, method.lora)
        if key not in self._loaded:
            self._loaded.clear()  # one model in memory at a time
            # loading puts models on the CPU; moving them there again would only warn
            pipe = CCMPipeline.from_pretrained(method.model, lora=method.lora, device=None if self.device.type == "cpu" else self.device)
            pipe.set_progress_bar_config(disable=True)
            self._loaded[key] = pipe
        pipe = self._loaded[key]
        pipe.set_adapter(None)
        pipe.set_controlnets([] if controlnet is None else [load_controlnet(controlnet)])
        pipe.set_adapter(None if method.adapter is None else load_adapter(method.adapter))
        return pipe


def _generate(pipe, method: MethodConfig, sampler, steps: int, captions: list[str], controls: torch.Tensor,
              config: EvalConfig, bar=None) -> tuple[torch.Tensor, int, float]:  # fmt: skip
    """All images for one (method, steps, condition): images, NFE per image, seconds per image.

    ``bar``: a tqdm bar advanced by the images of each batch as it is done.

    Seconds per image is the fastest batch's (of the full-size batches, when there are any), as
    timeit reports the best of its repeats: other work on the machine can only slow a batch down,
    so the fastest one is the closest to what the method costs.
    """
    images, nfe, per_image = [], 0, []
    for start in range(0, len(captions), config.batch_size):
        stop = min(start + config.batch_size, len(captions))
        generators = [torch.Generator().manual_seed(config.seed + i) for i in range(start, stop)]
        output = pipe(
            captions[start:stop], None if method.uncontrolled else controls[start:stop], height=controls.shape[-2], width=controls.shape[-1],
            num_inference_steps=steps, guidance_scale=method.guidance_scale,
            controlnet_conditioning_scale=method.controlnet_conditioning_scale, generator=generators, sampler=sampler,
            output_type="pt",
        )  # fmt: skip
        images.append(output.images.float().cpu())
        nfe = output.nfe
        per_image.append((stop - start == config.batch_size, output.timings["total"] / (stop - start)))
        if bar is not None:
            bar.update(stop - start)
    full = [seconds for whole, seconds in per_image if whole]
    return torch.cat(images), nfe, min(full or [seconds for _, seconds in per_image])


def _line_f1(condition: Condition, spec: ConditionConfig, images: torch.Tensor, controls: torch.Tensor) -> float:
    """The mean line F1 of ``images`` against ``controls`` where ``spec`` asks for it, else NaN."""
    if spec.line_f1 is None:
        return float("nan")
    options = spec.line_f1
    return float(line_f1_per_image(condition, images, controls, threshold=options.threshold, tolerance=options.tolerance).mean())


def _cell(pipe, method: MethodConfig, spec: ConditionConfig, steps: int, captions: list[str], controls: torch.Tensor,
          condition: Condition, extractor, real_features: torch.Tensor, config: EvalConfig,
          colours: list[ColourTargets] | None, show_progress: bool = False, shapes: list[ShapeTargets] | None = None,
          limbs: _Limbs | None = None) -> tuple[EvalRow, torch.Tensor]:  # fmt: skip
    """Generate and score one cell: its row and the generated images.

    ``show_progress``: a progress bar on stderr, images done of the cell's and the time left, then "scoring".
    """
    sampler = get_sampler(method.sampler, **method.sampler_options)
    with _cell_bar(f"{method.name} | {steps} steps | {spec.title}", len(captions), show_progress) as bar:
        if config.warmup:
            _generate(pipe, method, sampler, steps, captions[:1], controls[:1], config)
        generated, nfe, seconds = _generate(pipe, method, sampler, steps, captions, controls, config, bar)
        if bar is not None:
            bar.set_postfix_str("scoring")
        row = _score(method, spec, steps, generated, nfe, seconds, controls, condition, extractor, real_features, config, colours,
                     shapes, limbs)  # fmt: skip
        return row, generated


@contextlib.contextmanager
def _cell_bar(description: str, total: int, enabled: bool):
    """A tqdm bar of a cell's images (None when disabled), removed when the cell ends."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, unit="image", leave=False)
    try:
        yield bar
    finally:
        bar.close()


def _score(method: MethodConfig, spec: ConditionConfig, steps: int, generated: torch.Tensor, nfe: int, seconds: float,
           controls: torch.Tensor, condition: Condition, extractor, real_features: torch.Tensor, config: EvalConfig,
           colours: list[ColourTargets] | None, shapes: list[ShapeTargets] | None = None, limbs: _Limbs | None = None) -> EvalRow:  # fmt: skip
    """One cell's row: FID, Fidelity, line F1 and colour, shape and limb accuracy of ``generated``."""
    fid = fid_from_features(extract_features(extractor, generated, batch_size=config.features.batch_size), real_features)
    values = fidelity_per_image(condition, generated, controls)
    scored = values[~torch.isnan(values)]
    score = float(scored.mean()) if scored.numel() else float("nan")
    sem = float(scored.std() / scored.numel() ** 0.5) if scored.numel() > 1 else float("nan")
    lines = _line_f1(condition, spec, generated, controls)
    colour = float("nan") if colours is None else colour_accuracy(generated, colours)
    shape = float("nan") if shapes is None else shape_accuracy(generated, shapes)
    limb = float("nan") if limbs is None else limbs.accuracy(generated, config.batch_size)
    return EvalRow(method.name, method.sampler, steps, spec.title, nfe, seconds, fid, score, config.num_samples, sem, lines, colour,
                   shape, limb)  # fmt: skip


def _colour_targets(dataset, count: int) -> list[ColourTargets] | None:
    """The dataset's colour targets for its first ``count`` items, when it has them (``colour_targets``)."""
    method = getattr(dataset, "colour_targets", None)
    return None if method is None else [method(i) for i in range(count)]


def _shape_targets(dataset, count: int) -> list[ShapeTargets] | None:
    """The dataset's shape targets for its first ``count`` items, when it has them (``shape_targets``)."""
    method = getattr(dataset, "shape_targets", None)
    return None if method is None else [method(i) for i in range(count)]


class _Limbs:
    """The dataset's limb targets for its first items and the pose estimator they name (``limb_targets``)."""

    def __init__(self, targets: list[LimbTargets]):
        detectors = sorted({t.detector for t in targets})
        if len(detectors) != 1:
            raise InputError(f"expected the dataset's limb targets to name one detector condition, got {detectors}")
        self.targets, self.detector = targets, get_condition(detectors[0])

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, batch_size: int) -> float:
        """Share of the limbs the detector finds in ``images`` [N, 3, H, W] (one per target)."""
        maps = torch.cat([self.detector(images[i : i + batch_size]).float().cpu() for i in range(0, images.shape[0], batch_size)])
        return limb_accuracy(maps, self.targets)


def _limb_targets(dataset, count: int) -> _Limbs | None:
    """The dataset's limb targets for its first ``count`` items with their detector, when it has them (``limb_targets``)."""
    method = getattr(dataset, "limb_targets", None)
    return None if method is None else _Limbs([method(i) for i in range(count)])


def _fid_floor(dataset, config: EvalConfig, extractor, real_features: torch.Tensor) -> float:
    """FID of real images num_samples .. 2 num_samples - 1 against the first num_samples (NaN if too few)."""
    n = config.num_samples
    if len(dataset) < 2 * n:
        return float("nan")
    second = torch.stack([dataset[i]["image"] for i in range(n, 2 * n)]).float()
    return fid_from_features(extract_features(extractor, second, batch_size=config.features.batch_size), real_features)


def run_evaluation(
    config: EvalConfig,
    *,
    methods: list[str] | None = None,
    log: Callable[[str], None] | None = print,
    progress: str | os.PathLike | None = None,
    resume: bool = False,
    show_progress: bool | None = None,
) -> EvalResult:
    """Evaluate ``config`` (optionally only the named ``methods``) and return the rows.

    With ``progress`` (a folder), each finished cell (method, step count, condition) is kept there,
    and SIGTERM, SIGUSR1 or a :func:`~ccm_sdk.utils.stopping.time_limit` stop the run between two
    cells with :class:`EvalInterrupted`; ``resume=True`` reuses the cells kept there whose settings
    are unchanged (else they are cleared first). Without it nothing is written.

    ``show_progress``: a progress bar inside each cell (images done, time left) on stderr; default:
    when there is a ``log``.
    """
    say = log or (lambda message: None)
    if show_progress is None:
        show_progress = log is not None
    kept = None if progress is None else EvalProgress(progress, config)
    if kept is not None and not resume:
        kept.clear()
    # 1. methods, names and device
    method_configs = expand_methods(config, methods)
    check_names(config, method_configs)
    device = resolve_device(config.device)
    # 2. real images, captions and control maps
    dataset = build_dataset(config)
    if len(dataset) < config.num_samples:
        raise InputError(f"the dataset holds {len(dataset)} samples, fewer than num_samples={config.num_samples}")
    items = [dataset[i] for i in range(config.num_samples)]
    images = torch.stack([item["image"] for item in items]).float()
    captions = [item["caption"] for item in items]
    conditions = {spec.title: get_condition(spec.name, **spec.options) for spec in config.conditions}
    controls = {spec.title: control_maps(spec, conditions[spec.title], images, items, config.seed) for spec in config.conditions}
    real_fidelity = {title: fidelity(conditions[title], images, controls[title]) for title in conditions}
    flat = images.mean(dim=(2, 3), keepdim=True).expand_as(images).contiguous()
    flat_fidelity = {title: fidelity(conditions[title], flat, controls[title]) for title in conditions}
    real_line_f1 = {spec.title: _line_f1(conditions[spec.title], spec, images, controls[spec.title]) for spec in config.conditions
                    if spec.line_f1 is not None}  # fmt: skip
    # 3. features of the real images
    colours = _colour_targets(dataset, config.num_samples)
    real_colour = float("nan") if colours is None else colour_accuracy(images, colours)
    shapes, limbs = _shape_targets(dataset, config.num_samples), _limb_targets(dataset, config.num_samples)
    real_shape = float("nan") if shapes is None else shape_accuracy(images, shapes)
    real_limb = float("nan") if limbs is None else limbs.accuracy(images, config.batch_size)
    extractor = load_extractor(config.features, device=device)
    real_features = extract_features(extractor, images, batch_size=config.features.batch_size)
    floor = _fid_floor(dataset, config, extractor, real_features) if config.fid_floor else float("nan")
    show = min(config.show, config.num_samples)
    result = EvalResult(config, [], real_fidelity, images[:show], {t: c[:show] for t, c in controls.items()},
                        feature_extractor=getattr(extractor, "name", type(extractor).__name__), flat_fidelity=flat_fidelity,
                        real_line_f1=real_line_f1, real_colour_accuracy=real_colour, fid_floor=floor,
                        real_shape_accuracy=real_shape, real_limb_accuracy=real_limb)  # fmt: skip
    # 4. every method x condition x step count (a cell), kept as it is done when there is a progress folder
    pipelines = _Pipelines(device)
    cells = [(method, spec, steps) for method in method_configs for spec in config.conditions for steps in method.steps]
    with contextlib.ExitStack() as stack:
        stop = None if kept is None else stack.enter_context(StopSignals())
        for done, (method, spec, steps) in enumerate(cells, start=1):
            found = None if kept is None else kept.load(method, steps, spec)
            if found is not None:
                row, shown = found
                note = " (kept from an earlier run)"
            else:
                row, generated = _cell(pipelines.get(method, None if method.uncontrolled else method.controlnets[spec.title]), method, spec, steps, captions,
                                       controls[spec.title], conditions[spec.title], extractor, real_features, config, colours,
                                       show_progress, shapes, limbs)  # fmt: skip
                shown, note = generated[:show], ""
                if kept is not None:
                    kept.save(row, shown, method, spec)
            result.rows.append(row)
            result.samples[(method.name, steps, spec.title)] = shown
            say(f"{method.name} | {steps} steps | {spec.title}: FID {row.fid:.3f}, Fidelity {row.fidelity:.4f}, "
                f"{row.nfe} NFE, {row.seconds_per_image:.3f} s/image{note}")  # fmt: skip
            if stop is not None and done < len(cells) and stop.requested():
                raise EvalInterrupted(
                    f"the evaluation was stopped by {stop.name} after {done} of {len(cells)} cells; they are kept in "
                    f"{str(kept.folder)!r}, and a run with resume (ccm eval --resume) goes on from there"
                )
    # 5. the correlation analyses
    for analysis in config.correlation:
        from ..pipeline import CCMPipeline
        from .analysis import correlation_analysis

        pipe = CCMPipeline.from_pretrained(analysis.model, device=None if device.type == "cpu" else device)
        count = min(analysis.num_samples, config.num_samples)
        result.correlations.append(
            correlation_analysis(
                pipe, analysis.controlnet_a, analysis.controlnet_b, images=images[:count].to(device),
                captions=captions[:count], controls=controls[analysis.condition][:count], timesteps=analysis.timesteps,
                seed=config.seed, label_a=analysis.label_a, label_b=analysis.label_b,
            )
        )  # fmt: skip
        say(f"correlation {analysis.label_a} vs {analysis.label_b}: cosine per depth {result.correlations[-1].cosine_mean}")
    return result
