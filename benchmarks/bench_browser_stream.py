"""Camera to screen in a real browser, and the server's overhead, on the world model (world:lcm + sketch ControlNet).

1. End to end in headless Chromium (the system's, driven by Playwright, with its fake camera):
   ``ccm serve``'s page in camera mode, edges made in the browser, frames over ``/api/stream``.
   For 1 and 4 steps, with two frames in flight (the page's default) and with one ("lowest
   latency"): new images shown per second, median latency from capture to the image on
   screen, the server's part (frame in to answer out) and the generation's (the pipeline call).
   Goals: 24 fps at 1 step, 10 at 4.
2. Server overhead: one frame at a time from a Python WebSocket client, round trip against the
   same frames generated in-process (``StreamEngine.process``, no filter), side by side; and the
   same against ``POST /api/generate`` (a PNG data URL per request). Goal: at most 1.2x.

    python benchmarks/bench_browser_stream.py [--seconds 8] [--frames 30] [--threads 1] [--screenshot docs/images/page.png]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ccm_sdk.app.server import GenerationService, make_server, server_url
from ccm_sdk.app.stream_session import pack, unpack
from ccm_sdk.pipeline import CCMPipeline
from ccm_sdk.streaming import StreamEngine
from ccm_sdk.testing import browser
from ccm_sdk.testing.websocket_client import WebSocketClient

ROOT = Path(__file__).resolve().parents[1]
SKETCH = ROOT / "examples/world-sketch.png"
PROMPT = "a large blue diamond below a medium yellow triangle on a green background"
MODEL, CONTROLNET = "world:lcm", "world:cm-controlnet-sketch"


def _png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def in_browser(url: str, steps_list: list[int], seconds: float, screenshot: str | None) -> dict[tuple[int, bool], dict[str, float]]:
    """Per step count, with two frames in flight and with one: fps shown, latency capture-to-screen, server and
    generation milliseconds (medians)."""
    results = {}
    with browser.chromium_page() as page:
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent.length > 0")
        for steps, one_at_a_time in [(steps, one) for steps in steps_list for one in (False, True)]:
            page.check("#mode-draw")
            page.select_option("#steps", str(steps))
            page.evaluate(f"document.getElementById('one-at-a-time').checked = {'true' if one_at_a_time else 'false'}")  # hidden in draw mode
            page.check("#mode-camera")
            page.wait_for_function("globalThis.ccmStream.displayed >= 3", timeout=60_000)
            time.sleep(1.0)  # warm
            start = page.evaluate("({shown: ccmStream.displayed, lat: ccmStream.latencies.length, server: ccmStream.server.length, "
                                  "gen: ccmStream.generation.length, dropped: ccmStream.dropped, skipped: ccmStream.skipped})")
            t0 = time.perf_counter()
            time.sleep(seconds)
            end = page.evaluate("({shown: ccmStream.displayed, lat: ccmStream.latencies.slice(%d), server: ccmStream.server.slice(%d), "
                                "gen: ccmStream.generation.slice(%d), dropped: ccmStream.dropped, skipped: ccmStream.skipped})"
                                % (start["lat"], start["server"], start["gen"]))
            elapsed = time.perf_counter() - t0
            results[(steps, one_at_a_time)] = {"fps": (end["shown"] - start["shown"]) / elapsed, "latency_ms": statistics.median(end["lat"]),
                              "server_ms": statistics.median(end["server"]), "generation_ms": statistics.median(end["gen"]),
                              "dropped": end["dropped"] - start["dropped"], "skipped": end["skipped"] - start["skipped"]}
            if screenshot and steps == steps_list[0] and not one_at_a_time:
                page.wait_for_function("document.getElementById('figures').textContent.includes('fps')")
                page.screenshot(path=screenshot)
        page.check("#mode-draw")
    return results


def overhead(url: str, pipe: CCMPipeline, frames: list[np.ndarray], steps: int) -> dict[str, float]:
    """Median seconds per frame: in-process, over /api/stream (one in flight), over POST /api/generate; interleaved."""
    engine = StreamEngine(pipe, PROMPT, num_inference_steps=steps, similarity_threshold=None)
    pngs = [_png(f) for f in frames]
    ws_url = url.replace("http://", "ws://") + "api/stream"
    times: dict[str, list[float]] = {"in-process": [], "stream": [], "http": []}
    with WebSocketClient(ws_url) as client:
        client.send(json.dumps({"type": "start", "prompt": PROMPT, "steps": steps, "threshold": None}))
        assert json.loads(client.receive())["type"] == "ready"
        for i, (frame, png) in enumerate(zip(frames, pngs)):
            t0 = time.perf_counter()
            engine.process(Image.fromarray(frame))  # as the server does: decoded image in, PIL image out
            times["in-process"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.send(pack({"id": i}, png))
            header, _ = unpack(client.receive())
            assert not header["skipped"]
            times["stream"].append(time.perf_counter() - t0)
            body = json.dumps({"prompt": PROMPT, "control": "data:image/png;base64," + base64.b64encode(png).decode(), "steps": steps})
            request = urllib.request.Request(url + "api/generate", data=body.encode(), headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            urllib.request.urlopen(request, timeout=60).read()
            times["http"].append(time.perf_counter() - t0)
    return {name: statistics.median(values[2:]) for name, values in times.items()}  # the first two warm up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time in the browser per step count (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=30, help="frames for the overhead comparison (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4], help="step counts (default: 1 4)")
    parser.add_argument("--screenshot", help="save the page in camera mode at the first step count here (e.g. docs/images/page.png)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reason = browser.missing()
    if reason is not None:
        raise SystemExit(f"bench_browser_stream: {reason}")

    pipe = CCMPipeline.from_pretrained(MODEL, controlnet=CONTROLNET)
    pipe.set_progress_bar_config(disable=True)
    sketch = np.asarray(Image.open(SKETCH).convert("RGB"))
    service = GenerationService(pipe, model=f"{MODEL} + {CONTROLNET}", initial_prompt=PROMPT, initial_control=Image.fromarray(sketch),
                                default_steps=args.steps[0])
    server = make_server(service, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = server_url(server)
    try:
        print(f"{MODEL} + {CONTROLNET}, {sketch.shape[1]}x{sketch.shape[0]}, {args.threads} torch thread(s), "
              f"Chromium {browser.find_chromium()} with its fake camera, edges made in the browser")
        shown = in_browser(url, args.steps, args.seconds, args.screenshot)
        print(f"\nend to end in the browser ({args.seconds:g} s per step count; medians):")
        print("  steps  in flight     fps   latency capture->screen   server (in->out)   generation   goal")
        for (steps, one), r in shown.items():
            goal = {1: 24, 4: 10}.get(steps)
            print(f"  {steps:5d}  {1 if one else 2:9d}  {r['fps']:6.1f}   {r['latency_ms']:10.1f} ms   {r['server_ms']:14.1f} ms"
                  f"   {r['generation_ms']:7.1f} ms   {f'{goal} fps' if goal else ''}  ({r['dropped']} dropped, {r['skipped']} skipped)")
        moving = [np.roll(sketch, i % 16, axis=1) for i in range(args.frames)]
        print(f"\nserver overhead, one frame at a time ({args.frames} frames, medians; in-process = StreamEngine.process):")
        print("  steps   in-process   /api/stream   ratio    POST /api/generate   ratio")
        for steps in args.steps:
            t = overhead(url, pipe, moving, steps)
            print(f"  {steps:5d}   {t['in-process'] * 1000:7.1f} ms   {t['stream'] * 1000:8.1f} ms   {t['stream'] / t['in-process']:5.2f}x"
                  f"   {t['http'] * 1000:12.1f} ms   {t['http'] / t['in-process']:5.2f}x")
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
