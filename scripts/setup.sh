#!/usr/bin/env bash
# Creates .venv and installs ccm-sdk, its first-party plugins and the test tools. Idempotent:
# skips the install when nothing it depends on changed since the last run.
#
# torch comes from the package index pip uses. From PyPI, Linux x86_64 gets the CUDA build (with its
# nvidia-* wheels, several GB) and macOS and Windows a CPU build. To choose, name one of
# PyTorch's own indexes:
#   CCM_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup.sh     # CPU only
#   CCM_TORCH_INDEX=https://download.pytorch.org/whl/cu126 bash scripts/setup.sh   # CUDA 12.6
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${CCM_VENV:-.venv}
TORCH_INDEX=${CCM_TORCH_INDEX:-}
stamp_inputs() { { cat pyproject.toml plugins/*/pyproject.toml scripts/setup.sh 2>/dev/null; echo "$TORCH_INDEX"; } | sha256sum | cut -d' ' -f1; }
if [ -f "$VENV/.ccm-setup-stamp" ] && [ "$(cat "$VENV/.ccm-setup-stamp")" = "$(stamp_inputs)" ]; then
  exit 0
fi
echo "ccm-sdk: setting up $VENV (first run takes a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch 2.13.0 first, from CCM_TORCH_INDEX when it is set (see above), so the install below keeps it.
if [ -n "$TORCH_INDEX" ]; then
  $PIP install --index-url "$TORCH_INDEX" "torch==2.13.0"
else
  $PIP install "torch==2.13.0"
fi
$PIP install "setuptools>=68" wheel
$PIP install -e ".[dev]"   # dev: pytest, and triton for the kernels' interpreter tests (a GPU user needs only .[gpu])
for plugin in plugins/*/; do
  [ -f "$plugin/pyproject.toml" ] && $PIP install --no-deps -e "$plugin"
done
stamp_inputs > "$VENV/.ccm-setup-stamp"
