#!/usr/bin/env bash
# Chromium for the browser tests (tests/app/test_browser.py) and benchmarks/bench_browser_stream.py:
# the Debian package, installed only when no Chromium is on the PATH. Playwright for Python (the
# `dev` extra) drives it through its executable path; no browser is downloaded by Playwright.
set -euo pipefail
for name in chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null 2>&1; then
    echo "setup-browser: using $(command -v "$name")"
    exit 0
  fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-browser: no Chromium on the PATH and no apt-get to install it; install Chromium, or set CCM_CHROMIUM to its path" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "setup-browser: installing Chromium needs root (or sudo)" >&2
    exit 1
  fi
  SUDO="sudo"
fi
echo "setup-browser: installing Debian's chromium package"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium
command -v chromium
