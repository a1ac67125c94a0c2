"""Units taken from the installed pack instead of trained again: ``ccm-world build --reuse-installed``.

A new version of the world's stack often leaves some units exactly as they were: the feature net
that FID is measured in and the map nets that score depth and pose do not depend on the text
encoder, the teacher or any ControlNet. When this build's unit has the same fingerprint (the same
spec and the same inputs, all the way down) as the unit the installed pack was made from, and the
pack keeps that unit in float32 (the product itself, not a float16 copy), the installed folder *is*
that unit's product: it is copied into the work dir with a done-marker that says where it came
from, and the unit is skipped. Keeping the same feature net also keeps FIDs comparable between the
two versions.

The installed pack's fingerprints come from the preset its manifest names, which must still
describe it (its pack fingerprint equal to the manifest's); otherwise nothing is reused.
"""

from __future__ import annotations

import json
import shutil
from typing import TYPE_CHECKING

from ccm_sdk.utils.atomic import atomic_folder

from .config import BuildError, load_preset
from .markers import DONE, write_marker

if TYPE_CHECKING:
    from .run import WorldBuild

REUSABLE_KINDS = ("feature-net", "map-net")  # units the pack may keep in float32, unchanged


def reuse_installed(build: WorldBuild) -> list[str]:
    """Copy every reusable unit of the installed pack into ``build``'s work dir; the names reused."""
    from .pack import MANIFEST, installed
    from .run import WorldBuild

    models = build.installed_dir
    file = models / MANIFEST
    if not file.is_file():
        raise BuildError(f"--reuse-installed: no installed pack in {build._relative(models)} (no {MANIFEST})")
    manifest = json.loads(file.read_text())
    try:
        source_preset = load_preset(manifest["preset"])
    except BuildError as exc:
        raise BuildError(f"--reuse-installed: the installed pack names the preset {manifest.get('preset')!r}, which does not load: {exc}") from None
    source = WorldBuild(source_preset, build.work_dir, models_dir=models, log=lambda m: None)  # for its fingerprints only
    if not installed(models, source.fingerprint(source.by_name["pack"])):
        raise BuildError(f"--reuse-installed: the preset {source_preset.name!r} no longer describes the models installed in "
                         f"{build._relative(models)} (another pack fingerprint, or files changed): nothing can be reused")  # fmt: skip
    reused = []
    for unit in build.units:
        entry = manifest["models"].get(unit.name)
        if unit.kind not in REUSABLE_KINDS or entry is None or unit.name not in source.by_name:
            continue
        if set(entry["dtypes"].values()) != {"float32"} or source.fingerprint(source.by_name[unit.name]) != build.fingerprint(unit):
            continue
        if build.state(unit) == "done":
            continue
        folder = build.folder(unit)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        with atomic_folder(folder / unit.product) as tmp:
            shutil.copytree(models / unit.name, tmp, dirs_exist_ok=True)
        write_marker(folder, DONE, {"unit": unit.name, "fingerprint": build.fingerprint(unit), "preset": build.preset.name,
                                    "seconds": 0.0, "reused_from": f"the installed pack of preset {source_preset.name!r}"})  # fmt: skip
        build.log(f"==> {unit.name}: reused from the installed pack ({build._relative(models / unit.name)}: same fingerprint, float32)")
        reused.append(unit.name)
    return reused
