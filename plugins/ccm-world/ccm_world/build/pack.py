"""Packing the built models into ``ccm_world/models``: hub layout, float16 where outputs hold, a size limit.

Each weight component is tried in float16 (weights rounded to float16, computed in float32, as
the SDK loads them): the images it makes are compared with the float32 ones on a few seeded
world scenes, and it is stored in float16 only if the mean absolute difference stays within
``pack.fp16_tolerance``. The feature and map nets stay float32 (FID and Fidelity read them directly,
and they are small). The packed folder is staged, checked against ``pack.max_megabytes``, loaded
back, and swapped into place in one rename, so a failed pack never touches the installed one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ccm_sdk.utils.atomic import atomic_folder
from ccm_sdk.utils.digest import file_sha256

from .config import BuildError, PackSizeError, Preset
from .stages import MAP_NETS, Log, world_data

MANIFEST = "manifest.json"
PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder")


@dataclass
class PackedModel:
    """One folder of the pack and how its weights are stored."""

    name: str
    kind: str  # "pipeline", "controlnet", "adapter", "feature-net" or "map-net"
    source: Path
    condition: str | None = None
    dtypes: dict[str, str] = field(default_factory=dict)  # component ("model" for single-model folders) -> dtype
    fp16_difference: dict[str, float] = field(default_factory=dict)  # component -> mean |image(fp16) - image(fp32)|


def pack_plan(preset: Preset, work_dir: Path) -> list[PackedModel]:
    """What goes into the pack, from which unit outputs."""
    models = [
        PackedModel("lcm", "pipeline", work_dir / "lcm" / "lcm"),
        PackedModel("teacher", "pipeline", work_dir / "teacher" / "model"),
    ]
    for group, stage in (("dm", preset.dm_controlnets), ("cm", preset.cm_controlnets)):
        for c in stage.conditions:
            models.append(PackedModel(f"{group}-controlnet-{c}", "controlnet", work_dir / f"{group}-controlnet-{c}" / "controlnet", c))
    models.append(PackedModel("adapter", "adapter", work_dir / "adapter" / "adapter"))
    models.append(PackedModel("feature-net", "feature-net", work_dir / "feature-net" / "feature-net"))
    for name in MAP_NETS:
        if getattr(preset, name.replace("-", "_")) is not None:
            models.append(PackedModel(name, "map-net", work_dir / name / name))
    return models


# --- the float16 output check ----------------------------------------------------------


class OutputCheck:
    """Images from the built models on seeded held-out scenes, with one component rounded to float16."""

    def __init__(self, preset: Preset, work_dir: Path):
        from ccm_sdk.pipeline import CCMPipeline

        self.pack = preset.pack
        conditions = tuple(dict.fromkeys([*preset.dm_controlnets.conditions, *preset.cm_controlnets.conditions]))
        data = world_data(preset, conditions, seed_offset=1, length=self.pack.check_samples)
        items = [data[i] for i in range(len(data))]
        self.captions = [item["caption"] for item in items]
        self.controls = {c: torch.stack([item["controls"][c] for item in items]) for c in conditions}
        self.lcm = CCMPipeline.from_pretrained(work_dir / "lcm" / "lcm")
        self.teacher = CCMPipeline.from_pretrained(work_dir / "teacher" / "model")
        for pipe in (self.lcm, self.teacher):
            pipe.set_progress_bar_config(disable=True)

    def images(self, pipe, control: torch.Tensor | None = None) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(i) for i in range(len(self.captions))]
        teacher = pipe is self.teacher
        output = pipe(
            self.captions, control, num_inference_steps=self.pack.dm_check_steps if teacher else self.pack.check_steps,
            guidance_scale=7.5 if teacher else 8.0, sampler="ddim" if teacher else "consistency", generator=generators,
            output_type="pt",
        )  # fmt: skip
        return output.images.float()

    @staticmethod
    @torch.no_grad()
    def difference(module: torch.nn.Module, make: Callable[[], torch.Tensor], reference: torch.Tensor) -> float:
        """Mean |make() - reference| with ``module``'s floating weights rounded to float16 (restored after)."""
        saved = {k: v.clone() for k, v in module.state_dict().items()}
        for tensor in module.state_dict().values():  # these share storage with the parameters
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
        try:
            return float((make() - reference).abs().mean())
        finally:
            module.load_state_dict(saved)

    def measure(self, model: PackedModel, preset: Preset, work_dir: Path) -> dict[str, float]:
        from ccm_sdk.models.adapter import load_adapter
        from ccm_sdk.pipeline import load_controlnet

        if model.kind == "pipeline":
            pipe = self.lcm if model.name == "lcm" else self.teacher
            reference = self.images(pipe)
            return {c: self.difference(getattr(pipe, c), lambda: self.images(pipe), reference) for c in PIPELINE_COMPONENTS}
        if model.kind in ("feature-net", "map-net"):  # measuring instruments: kept exact
            return {}
        pipe = self.lcm
        condition = model.condition or preset.adapter.conditions[0]
        control = self.controls[condition]
        try:
            if model.kind == "controlnet":
                pipe.set_controlnets([load_controlnet(str(model.source))])
                module = pipe.controlnets[0]
            else:
                pipe.set_controlnets([load_controlnet(str(work_dir / f"dm-controlnet-{condition}" / "controlnet"))])
                pipe.set_adapter(load_adapter(model.source))
                module = pipe.adapter
            reference = self.images(pipe, control)
            return {"model": self.difference(module, lambda: self.images(pipe, control), reference)}
        finally:
            pipe.set_adapter(None)
            pipe.set_controlnets([])


# --- staging, size, install ------------------------------------------------------------


def to_float16(folder: Path) -> None:
    """Rewrite every safetensors file under ``folder`` with its floating tensors in float16."""
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(tensors, str(file), metadata=metadata)


def strip_source_paths(folder: Path) -> None:
    """Drop ``_name_or_path`` (the build machine's folders) from every config file."""
    for file in sorted(folder.rglob("config.json")):
        config = json.loads(file.read_text())
        if config.pop("_name_or_path", None) is not None:
            file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """relative path -> bytes and sha256 of every file but the manifest."""
    table = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST):
        table[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return table


def check_size(folder: Path, max_megabytes: float) -> int:
    """The folder's bytes; PackSizeError naming the largest models when over the limit."""
    total = folder_bytes(folder)
    if total > max_megabytes * 1e6:
        sizes = sorted(((folder_bytes(p), p.name) for p in folder.iterdir() if p.is_dir()), reverse=True)
        largest = ", ".join(f"{name} {size / 1e6:.1f} MB" for size, name in sizes[:5])
        raise PackSizeError(
            f"the packed world models take {total / 1e6:.2f} MB, over the limit of {max_megabytes:g} MB "
            f"(pack.max_megabytes); largest: {largest}. Make the models smaller in the preset (or store more of them in float16)"
        )
    return total


def stage_pack(
    preset: Preset,
    work_dir: Path,
    staging: Path,
    fingerprint: str,
    log: Log,
    *,
    only: set[str] | None = None,
    previews: dict[str, tuple[int, Path]] | None = None,
) -> dict[str, Any]:
    """Write the pack into ``staging`` (replaced), with its manifest; check its size and that it loads.

    ``only``: pack just these models of the plan (a partial pack of what is built so far); the
    manifest lists the others as missing. ``previews``: model name -> (step, folder) of models
    taken from an unfinished stage's checkpoint instead of its product (listed in the manifest).
    """
    # 1. which components keep their outputs in float16
    previews = previews or {}
    planned = pack_plan(preset, work_dir)
    models = [m for m in planned if only is None or m.name in only or m.name in previews]
    for model in models:
        if model.name in previews:
            model.source = previews[model.name][1]
    check = OutputCheck(preset, work_dir) if preset.pack.fp16 else None
    for model in models:
        if check is not None:
            model.fp16_difference = check.measure(model, preset, work_dir)
        for component, difference in (model.fp16_difference or {"model": None}).items():
            half = check is not None and difference is not None and difference <= preset.pack.fp16_tolerance
            model.dtypes[component] = "float16" if half else "float32"
        if model.kind == "pipeline":  # tokenizer and scheduler carry no weights
            model.dtypes = {c: model.dtypes.get(c, "float32") for c in PIPELINE_COMPONENTS}
        shown = ", ".join(f"{c} {d}" + (f" ({model.fp16_difference[c]:.2e})" if c in model.fp16_difference else "")
                          for c, d in model.dtypes.items())  # fmt: skip
        log(f"    {model.name}: {shown}")
    # 2. the folders
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for model in models:
        target = staging / model.name
        shutil.copytree(model.source, target)
        for component, dtype in model.dtypes.items():
            if dtype == "float16":
                to_float16(target if component == "model" else target / component)
        strip_source_paths(target)
    # 3. the manifest, then the size limit (the manifest counts)
    entries = {
        m.name: {"kind": m.kind, "source": m.source.relative_to(work_dir).as_posix(), "dtypes": m.dtypes,
                 "fp16_difference": m.fp16_difference, "bytes": folder_bytes(staging / m.name)}
        for m in models
    }  # fmt: skip
    manifest = {"preset": preset.name, "fingerprint": fingerprint, "max_megabytes": preset.pack.max_megabytes,
                "fp16_tolerance": preset.pack.fp16_tolerance, "models": entries, "files": file_table(staging)}  # fmt: skip
    if only is not None:
        manifest["partial"] = True
        manifest["missing"] = [m.name for m in planned if m.name not in only and m.name not in previews]
    if previews:
        manifest["previews"] = {name: {"step": step} for name, (step, _) in previews.items()}
    manifest["total_bytes"] = sum(f["bytes"] for f in manifest["files"].values())
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    total = check_size(staging, preset.pack.max_megabytes)
    log(f"    pack size {total / 1e6:.2f} MB of at most {preset.pack.max_megabytes:g} MB")
    # 4. every folder loads with the SDK's loaders
    for model in models:
        load_model(model.kind, staging / model.name)
    return {"bytes": total, "models": len(models)}


def load_model(kind: str, source: str | os.PathLike):
    """Load a packed model the way users will (float32, offline)."""
    from ccm_sdk.eval.feature_net import SmallFeatureNet
    from ccm_sdk.models.adapter import load_adapter
    from ccm_sdk.pipeline import CCMPipeline, load_controlnet

    if kind == "pipeline":
        return CCMPipeline.from_pretrained(source)
    if kind == "controlnet":
        return load_controlnet(str(source))
    if kind == "adapter":
        return load_adapter(source)
    from ccm_sdk.models.loading import resolve_model_path

    if kind == "map-net":
        from ..map_net import WorldMapNet

        return WorldMapNet.from_pretrained(resolve_model_path(source, what="map net"))
    if kind != "feature-net":
        raise BuildError(f"unknown packed model kind {kind!r}")
    return SmallFeatureNet.from_pretrained(resolve_model_path(source, what="feature net"))  # a folder or "world:<name>"


def installed(models_dir: Path, fingerprint: str) -> bool:
    """True when ``models_dir`` holds exactly the pack of this fingerprint, every file intact."""
    file = models_dir / MANIFEST
    if not file.is_file():
        return False
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError:
        return False
    return manifest.get("fingerprint") == fingerprint and file_table(models_dir) == manifest.get("files")


def install(staging: Path, models_dir: Path) -> None:
    """Replace ``models_dir`` by a copy of ``staging`` in one rename."""
    with atomic_folder(models_dir) as tmp:
        shutil.copytree(staging, tmp, dirs_exist_ok=True)


def verify_installed(preset: Preset, models_dir: Path, log: Log) -> None:
    """Load every installed model (as ``world:<name>`` when it is the plugin's folder) and generate once."""
    import ccm_world

    from ccm_sdk.pipeline import CCMPipeline

    manifest = json.loads((models_dir / MANIFEST).read_text())
    by_name = models_dir.resolve() == Path(ccm_world.MODELS_DIR).resolve()
    ref = (lambda name: f"world:{name}") if by_name else (lambda name: str(models_dir / name))
    for name, entry in manifest["models"].items():
        load_model(entry["kind"], ref(name))
    # generate with the first ControlNet for the LCM there is (a partial pack may lack some)
    candidates = [f"cm-controlnet-{c}" for c in preset.cm_controlnets.conditions]
    candidates += [f"dm-controlnet-{c}" for c in preset.dm_controlnets.conditions]
    found = [name for name in candidates if name in manifest["models"]]
    if not found:
        log(f"    loaded {len(manifest['models'])} models; no ControlNet packed yet to generate with")
        return
    net = found[0]
    condition = net.split("-controlnet-", 1)[1]
    pipe = CCMPipeline.from_pretrained(ref("lcm"), controlnet=ref(net))
    pipe.set_progress_bar_config(disable=True)
    item = world_data(preset, (condition,), seed_offset=1, length=1)[0]
    image = pipe(item["caption"], item["controls"][condition][None], num_inference_steps=preset.pack.check_steps,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    if not torch.isfinite(image).all():
        raise BuildError(f"the packed LCM with {net} generated non-finite values")
    log(f"    loaded {len(manifest['models'])} models{' as world:<name>' if by_name else ''}; generated with lcm + {net}")
