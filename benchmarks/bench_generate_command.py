"""Where the README's main command spends its time: start-up imports against generation.

    .venv/bin/python benchmarks/bench_generate_command.py [--repeats 5]

Runs, interleaved in each repeat so machine noise hits all of them alike, fresh processes that
(1) start Python, (2) import torch, (3) import the diffusers and transformers classes every
diffusers program loads (UNet, VAE, ControlNet, CLIP text model), (4) import ccm_sdk.pipeline, and
(5) run `ccm generate` on the embedded world model (the README's main command without its set-up
check). Prints the median wall time of each, the generation time `ccm generate` reports, and
each share of the whole command; then the round trip of one request to a `ccm serve` that keeps
the same model loaded (what a stroke on its drawing page costs).
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIFFUSERS_CLASSES = (
    "from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel; "
    "from transformers import CLIPTextModel, CLIPTokenizer"
)
REPORTED = re.compile(r"\((\d+) network evaluations?, ([0-9.]+) s")
SKETCH = ROOT / "examples/world-sketch.png"
PROMPT = "a large blue diamond below a medium yellow triangle on a green background"


def generate_command(out: Path) -> list[str]:
    ccm = Path(sys.executable).with_name("ccm")
    return [
        str(ccm), "generate", "--condition", "sketch", "--control", str(SKETCH), "--prompt", PROMPT,
        "--out", str(out),
    ]  # fmt: skip


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout + proc.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_round_trips(repeats: int) -> list[float]:
    """Seconds per ``POST /api/generate`` to a ``ccm serve`` started once (after one warm-up)."""
    port = free_port()
    ccm = Path(sys.executable).with_name("ccm")
    cmd = [str(ccm), "serve", "--control", str(SKETCH), "--prompt", PROMPT, "--port", str(port)]
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall the server
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/info", timeout=5).read()
                break
            except (urllib.error.URLError, ConnectionError):
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit(f"ccm serve did not come up:\n{log.read()[-2000:]}")
                time.sleep(0.2)
        control = "data:image/png;base64," + base64.b64encode(SKETCH.read_bytes()).decode()
        body = json.dumps({"prompt": PROMPT, "control": control, "steps": 4, "seed": 0}).encode()
        request = urllib.request.Request(f"{url}/generate", data=body, headers={"Content-Type": "application/json"})
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            urllib.request.urlopen(request, timeout=60).read()
            times.append(time.perf_counter() - start)
        return times[1:]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        contenders = {
            "python start": [py, "-c", "pass"],
            "import torch": [py, "-c", "import torch"],
            "import diffusers + transformers classes": [py, "-c", DIFFUSERS_CLASSES],
            "import ccm_sdk.pipeline": [py, "-c", "import ccm_sdk.pipeline"],
            "ccm generate (world:lcm, 4 steps)": generate_command(Path(tmp) / "world.png"),
        }
        walls: dict[str, list[float]] = {name: [] for name in contenders}
        generation: list[float] = []
        timed(contenders["ccm generate (world:lcm, 4 steps)"])  # warm the file cache once
        for _ in range(args.repeats):
            for name, cmd in contenders.items():
                elapsed, output = timed(cmd)
                walls[name].append(elapsed)
                if cmd[0].endswith("ccm"):
                    match = REPORTED.search(output)
                    if match is None:
                        raise SystemExit(f"no generation time in ccm generate's output:\n{output[-2000:]}")
                    generation.append(float(match.group(2)))

    whole = statistics.median(walls["ccm generate (world:lcm, 4 steps)"])
    print(f"median of {args.repeats} fresh processes each (s), and share of the whole command:")
    for name, values in walls.items():
        median = statistics.median(values)
        print(f"  {name:<42} {median:6.2f} s   {median / whole:6.1%}")
    gen = statistics.median(generation)
    print(f"  {'generation, as ccm generate reports it':<42} {gen:6.2f} s   {gen / whole:6.1%}")
    trip = statistics.median(serve_round_trips(args.repeats))
    print(f"  {'ccm serve, one POST /api/generate':<42} {trip:6.2f} s   {trip / whole:6.1%}")


if __name__ == "__main__":
    main()
