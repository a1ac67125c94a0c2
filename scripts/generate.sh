#!/usr/bin/env bash
# The main job: set up if needed, then generate a controlled image from the example photo.
# Extra arguments go to `ccm generate` and override these defaults (e.g. --condition sketch).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ccm generate --prompt "an astronaut in a white suit" --condition canny \
  --image examples/astronaut.png --out outputs/astronaut.png "$@"
