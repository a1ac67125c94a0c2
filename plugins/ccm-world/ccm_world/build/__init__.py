"""The world's build tool, apart from the runtime plugin: it rebuilds the world's whole model stack
with the SDK's own trainers, stage by stage, and packs the models into ``ccm_world/models``.

    ccm-world build [--preset full|tiny|FILE] [--stage NAME | --until NAME] [--work-dir outputs/world]
    python -m ccm_world.build [same options]

Modules: ``cli`` (the ``ccm-world`` command), ``run`` (:class:`~ccm_world.build.run.WorldBuild`:
stages, resume, measuring), ``config`` (the preset schema; the presets ship in ``presets/``),
``stages`` (what each stage trains), ``markers`` (started/done markers), ``archive`` (carrying
progress to another machine), ``data_cache`` (scenes rendered and encoded once), ``pack``
(float16, size limit, install), ``noise_levels`` (``ccm-world noise-levels``). See docs/world.md.
"""

from __future__ import annotations

from .cli import cli, main

__all__ = ["cli", "main"]
