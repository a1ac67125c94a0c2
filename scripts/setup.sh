#!/usr/bin/env bash
# Creates .venv and installs ccm-sdk, its first-party plugins and the test tools. Idempotent:
# skips the install when nothing it depends on changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${CCM_VENV:-.venv}
stamp_inputs() { cat pyproject.toml plugins/*/pyproject.toml scripts/setup.sh 2>/dev/null | sha256sum | cut -d' ' -f1; }
if [ -f "$VENV/.ccm-setup-stamp" ] && [ "$(cat "$VENV/.ccm-setup-stamp")" = "$(stamp_inputs)" ]; then
  exit 0
fi
echo "ccm-sdk: setting up $VENV (first run takes a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# The CPU wheel of torch 2.13.0 first: an unpinned torch would pull a multi-GB CUDA build.
$PIP install "torch==2.13.0" "setuptools>=68" wheel
$PIP install -e ".[dev,triton]"
for plugin in plugins/*/; do
  [ -f "$plugin/pyproject.toml" ] && $PIP install --no-deps -e "$plugin"
done
stamp_inputs > "$VENV/.ccm-setup-stamp"
