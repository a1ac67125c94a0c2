#!/usr/bin/env bash
# The main job: set up if needed, then generate a controlled image.
# With the embedded world models installed (plugins/ccm-world/ccm_world/models, made by
# `ccm-world build`: the LCM and a sketch ControlNet), the sketch examples/world-sketch.png (a diamond below a triangle) becomes a
# picture in the colours the prompt asks for: outputs/world.png, its control map and a grid.
# Without them, a tiny model with untrained weights shows the pipeline on examples/astronaut.png.
# Extra arguments go to `ccm generate` and override these defaults (e.g. --prompt "...").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
models=plugins/ccm-world/ccm_world/models
if [ -f $models/lcm/model_index.json ] && { [ -f $models/cm-controlnet-sketch/config.json ] || [ -f $models/dm-controlnet-sketch/config.json ]; }; then
  exec .venv/bin/ccm generate --condition sketch --control examples/world-sketch.png \
    --prompt "a large blue diamond below a medium yellow triangle on a green background" \
    --out outputs/world.png "$@"
fi
exec .venv/bin/ccm generate --prompt "an astronaut in a white suit" --condition canny \
  --image examples/astronaut.png --out outputs/astronaut.png "$@"
