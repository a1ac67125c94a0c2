"""One ``/api/stream`` connection: frames in over a WebSocket, images out, through a :class:`StreamEngine`.

The protocol (docs/streaming.md has it in full):

- the client sends a text message ``{"type": "start", "prompt": ..., ...}`` (:class:`StreamSettings`),
  again whenever a setting changes; the server answers ``{"type": "ready", ...}``;
- each frame is a binary message: a 4-byte big-endian length, that many bytes of JSON
  (``{"id": <int>}``, echoed back), then a PNG or JPEG: the control map, or a picture the
  ``condition`` turns into one (and, with ``img2img``, the init image);
- for each frame the server sends a binary message in the same layout: JSON with ``id``,
  ``skipped``, ``nfe``, ``seconds`` (generation), ``server_ms`` (frame in to answer out) and
  the counters, then the PNG (empty when ``skipped``: the last image stands); a frame replaced
  by a newer one before its turn is answered ``{"id": ..., "dropped": true}`` with no image;
- errors are text messages ``{"type": "error", "error": ..., "kind": ...}``; the stream goes on.

Frames go through a latest-frame queue: a worker thread generates the newest frame, in the
generation queue's turn (so a stream and the page's requests share the model fairly).
"""

from __future__ import annotations

import io
import json
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import CCMError, InputError
from ..streaming import DEFAULT_SIMILARITY_THRESHOLD, LatestFrameQueue, StreamEngine
from ..utils.image_files import open_image
from ..utils.validation_errors import validation_problems
from .websocket import CLOSE_NORMAL, CLOSE_POLICY, HandshakeError, WebSocket, handshake_headers

IMAGE_FORMATS = ("PNG", "JPEG")
MAX_HEADER_BYTES = 1024
MAX_TEXT_BYTES = 64 * 1024
SERVER_CONDITIONS = ("canny", "sketch")  # offered to every stream, beside the server's own --condition
DEFAULT_IDLE_TIMEOUT = 120.0


class StreamSettings(BaseModel):
    """The ``start`` message: what every frame of the stream is generated with."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["start"] = "start"
    prompt: str = Field(min_length=1, max_length=1000)
    steps: int = Field(1, ge=1, le=8)
    guidance: float | None = Field(None, ge=0.0, le=30.0, description="null: the model's recommended scale")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    seed_policy: Literal["fixed", "increment"] = "fixed"
    control_scale: float = Field(1.0, ge=0.0, le=2.0)
    threshold: float | None = Field(DEFAULT_SIMILARITY_THRESHOLD, ge=0.0, le=1.0,
                                    description="skip frames whose inputs changed by at most this (mean absolute difference); null: off")
    condition: str | None = Field(None, description="turn each frame into the control map on the server: canny, sketch or the "
                                                    "server's --condition; null: frames are control maps")
    img2img: bool = Field(False, description="each frame is also the init image, noised to 'strength'")
    strength: float = Field(0.6, gt=0.0, le=1.0)


def pack(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """A binary message: 4-byte big-endian header length, the JSON header, the payload."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("!I", len(head)) + head + payload


def unpack(message: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, payload) of a binary frame message; :class:`InputError` when it is malformed."""
    if len(message) < 4:
        raise InputError(f"a frame message starts with a 4-byte header length, got {len(message)} bytes")
    (length,) = struct.unpack("!I", message[:4])
    if length > MAX_HEADER_BYTES or 4 + length > len(message):
        raise InputError(f"a frame's JSON header may be at most {MAX_HEADER_BYTES} bytes and fit the message, got {length}")
    try:
        header = json.loads(message[4 : 4 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"a frame's header must be JSON, got {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("id"), int) or isinstance(header.get("id"), bool):
        raise InputError(f"a frame's header must be a JSON object with an integer 'id', got {header!r}")
    return header, message[4 + length :]


@dataclass
class _Received:
    id: int
    image: Image.Image
    arrived: float


class StreamSession:
    """Serves one WebSocket until it closes: settings and frames in, images out.

    ``service`` is the server's :class:`~ccm_sdk.app.server.GenerationService`: its pipeline,
    size cap, condition and generation queue.
    """

    def __init__(self, ws: WebSocket, service: Any, *, idle_timeout: float = DEFAULT_IDLE_TIMEOUT):
        self.ws = ws
        self.service = service
        self.idle_timeout = idle_timeout
        self.frames = LatestFrameQueue()
        self.engine: StreamEngine | None = None
        self.settings: StreamSettings | None = None
        self._lock = threading.Lock()
        self._waiting_id: int | None = None  # the frame in the queue's slot, not yet taken

    # --- the reading side (the connection's thread) -----------------------------------------

    def run(self) -> None:
        worker = threading.Thread(target=self._work, name="ccm-stream-worker", daemon=True)
        worker.start()
        try:
            while True:
                try:
                    message = self.ws.receive(timeout=self.idle_timeout)
                except TimeoutError:
                    self.ws.close(CLOSE_POLICY, f"no message for {self.idle_timeout:g} s")
                    break
                if message is None:
                    break
                try:
                    if message.is_text:
                        self._on_text(message.data)
                    else:
                        self._on_frame(message.data)
                except CCMError as exc:
                    self._send_error(str(exc), type(exc).__name__)
        finally:
            self.frames.close()
            worker.join(30)
            self.ws.close(CLOSE_NORMAL)

    def _on_text(self, text: str) -> None:
        if len(text.encode()) > MAX_TEXT_BYTES:
            raise InputError(f"a text message may be at most {MAX_TEXT_BYTES} bytes")
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"text messages must be JSON, got {exc}") from None
        kind = payload.get("type") if isinstance(payload, dict) else None
        if kind != "start":
            raise InputError(f"expected a text message of type 'start' (the stream's settings), got {kind!r}")
        try:
            settings = StreamSettings.model_validate(payload)
        except ValidationError as exc:
            raise InputError(validation_problems(exc, root="body")) from None
        engine = self._engine(settings)
        with self._lock:
            self.engine, self.settings = engine, settings
        self.ws.send(json.dumps({"type": "ready", "size": list(self.service.size), "max_size": self.service.max_size,
                                 "condition": settings.condition, "threshold": settings.threshold, "steps": settings.steps}))

    def _engine(self, settings: StreamSettings) -> StreamEngine:
        service = self.service
        if service.control_channels is None:
            raise InputError("this model has no ControlNet: a stream needs one (its frames are control maps)")
        if service.control_channels == 4:
            raise InputError("this server inpaints (a 4-channel ControlNet); streams take 3-channel control maps")
        condition = None
        if settings.condition is not None:
            offered = [*SERVER_CONDITIONS, *([service.condition] if service.condition not in (None, "mask", *SERVER_CONDITIONS) else [])]
            if settings.condition not in offered:
                raise InputError(f"condition: expected null or one of {', '.join(offered)}, got {settings.condition!r}")
            from ..registry import get_condition

            options = service.condition_options if settings.condition == service.condition else {}
            condition = get_condition(settings.condition, **options)
        elif settings.img2img:
            raise InputError("img2img needs a condition to make the control map from each picture: set 'condition' (e.g. sketch)")
        return StreamEngine(service.pipe, settings.prompt, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                            condition=condition, similarity_threshold=settings.threshold, seed=settings.seed,
                            seed_policy=settings.seed_policy, img2img=settings.img2img, strength=settings.strength,
                            controlnet_conditioning_scale=settings.control_scale, output_type="pil")

    def _on_frame(self, message: bytes) -> None:
        arrived = time.perf_counter()
        header, payload = unpack(message)
        if self.engine is None:
            raise InputError(f"frame {header['id']}: send the 'start' message (the stream's settings) before frames")
        limit = f"this server takes images of at most {self.service.max_size}x{self.service.max_size} pixels (ccm serve --max-size)"
        image = open_image(payload, what=f"frame {header['id']}", max_side=self.service.max_size, formats=IMAGE_FORMATS,
                           expected="a PNG or JPEG image", limit=limit).convert("RGB")
        with self._lock:
            replaced = self.frames.put(_Received(header["id"], image, arrived))
            stale, self._waiting_id = (self._waiting_id if replaced else None), header["id"]
        if stale is not None:  # tell the client, so that it stops waiting for that frame
            self.ws.send(pack({"id": stale, "dropped": True, "dropped_total": self.frames.dropped}))

    # --- the generating side (the worker thread) ----------------------------------------------

    def _work(self) -> None:
        while True:
            received = self.frames.get()
            if received is None:
                return
            with self._lock:
                if self._waiting_id == received.id:
                    self._waiting_id = None
            try:
                self._answer(received)
            except CCMError as exc:
                self._send_error(f"frame {received.id}: {exc}", type(exc).__name__)
            except ConnectionError:
                return

    def _answer(self, received: _Received) -> None:
        with self._lock:
            engine = self.engine
        output = self.service.run(engine.process, received.image)
        if output.skipped:
            payload = b""
        else:
            buffer = io.BytesIO()
            output.images[0].save(buffer, format="PNG", compress_level=1)
            payload = buffer.getvalue()
        stats = engine.stats
        header = {"id": received.id, "frame": output.frame, "skipped": output.skipped, "nfe": output.nfe, "seed": output.seed,
                  "seconds": round(float(output.timings.get("total", 0.0)), 4),
                  "difference": None if output.difference is None else round(output.difference, 5),
                  "server_ms": round((time.perf_counter() - received.arrived) * 1000, 2),
                  "generated": stats.generated, "skipped_total": stats.skipped, "dropped_total": self.frames.dropped}
        self.ws.send(pack(header, payload))

    def _send_error(self, message: str, kind: str) -> None:
        try:
            self.ws.send(json.dumps({"type": "error", "error": message, "kind": kind}))
        except (ConnectionError, OSError):
            pass



def serve_websocket(handler: Any, service: Any, *, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
    """Answer ``handler``'s request (a ``ccm serve`` handler, its Host and Origin checked) with the WebSocket
    handshake and serve the stream on that connection until it closes; a bad handshake gets a 4xx."""
    try:
        headers = handshake_headers(handler.command, handler.headers)
    except HandshakeError as exc:
        handler._error(exc.status, str(exc), type(exc).__name__)
        return
    handler.close_connection = True
    # written raw: http.server would answer HTTP/1.0, and a browser takes a 101 only as HTTP/1.1
    lines = ["HTTP/1.1 101 Switching Protocols", *(f"{name}: {value}" for name, value in headers.items())]
    handler.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
    handler.wfile.flush()

    def set_deadline(seconds: float | None) -> None:
        handler._reader.deadline = time.monotonic() + (idle_timeout if seconds is None else seconds)

    ws = WebSocket(handler.connection, handler.rfile, max_message_bytes=service.max_body_bytes, set_deadline=set_deadline)
    StreamSession(ws, service, idle_timeout=idle_timeout).run()
