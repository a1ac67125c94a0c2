"""``ccm serve``: a drawing page and a JSON endpoint that turns each sketch into an image.

Endpoints: ``GET /`` (the page), ``GET /api/info`` (model, size, defaults),
``POST /api/generate`` (a :class:`GenerateRequest` as JSON -> the image as a PNG data URL) and
``GET /api/stream`` (a WebSocket: frames in, images out; :mod:`.stream_session`).
Bad requests get a 4xx answer with a message that says what was expected; the server keeps
running. It binds to 127.0.0.1 unless told otherwise, and never reads a path a client names.

No request can take the server for itself. Each connection gets its own thread, up to a limit.
Each request must arrive within a read timeout. Bodies and image sizes are capped, and image
sizes are read from the header before any pixel is decoded. Generation runs one request at a
time, in arrival order, behind a bounded queue. Host and Origin checks (:mod:`.access`) keep
other web sites out.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import select
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import CCMError, ConditionOutputError, ImageTooLargeError, InputError, ServerBusyError
from ..utils.image_files import MAX_SIDE_LIMIT, open_image
from ..utils.validation_errors import validation_problems
from .access import AccessPolicy
from .work_queue import WorkQueue

MAX_PROMPT_CHARS = 1000
IMAGE_FORMATS = ("PNG", "JPEG")
MAX_SIZE_LIMIT = MAX_SIDE_LIMIT  # the largest --max-size
BODY_BYTES_FIXED = 64 * 1024  # the prompt and the JSON around the images
BODY_BYTES_PER_PIXEL = 24  # three images (control, or image and mask) as base64 (4/3) RGBA (4 bytes) PNGs, with 1.5x room
DEFAULT_MAX_QUEUE = 4
DEFAULT_READ_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 32
DRAIN_SECONDS = 1.0
DRAIN_BYTES = 1024 * 1024
FAVICON_SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" fill="#123"/>'
               b'<path d="M3 12 L8 3 L13 12" stroke="#fff" stroke-width="1.6" fill="none"/><circle cx="8" cy="10" r="2" fill="#4c8"/></svg>')


class GenerateRequest(BaseModel):
    """The body of ``POST /api/generate``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    control: str | None = Field(None, description="a ready control map: PNG/JPEG as a data URL or bare base64")
    image: str | None = Field(None, description="an image to turn into the control map with the server's condition")
    mask: str | None = Field(None, description="with 'image' and an inpainting (4-channel) ControlNet: the region to "
                                               "generate, white on black")
    # strict: JSON numbers only (true is not 1 step, "4" is not 4)
    steps: int = Field(4, ge=1, le=50, strict=True)
    seed: int = Field(0, ge=0, le=2**63 - 1, strict=True)
    guidance: float | None = Field(None, ge=0.0, le=30.0, strict=True, description="null: the model's recommended scale")
    control_scale: float = Field(1.0, ge=0.0, le=2.0, strict=True)

    @model_validator(mode="after")
    def _one_source(self) -> GenerateRequest:
        if self.control is not None and self.image is not None:
            raise ValueError("send 'control' (a ready control map) or 'image' (to preprocess), not both")
        if self.mask is not None and self.image is None:
            raise ValueError("'mask' goes with 'image' (the picture to inpaint); a ready 'control' map holds its mask already")
        return self


def max_body_bytes(max_side: int) -> int:
    """The largest request body for images of at most ``max_side`` pixels a side: three RGBA images as base64 PNGs, with room."""
    return BODY_BYTES_FIXED + BODY_BYTES_PER_PIXEL * max_side * max_side


def decode_image(data: str, *, field: str, max_side: int | None = None) -> Image.Image:
    """A PNG/JPEG from a ``data:image/...;base64,`` URL or bare base64, fully read (typed errors).

    With ``max_side``, the size in the image's header is checked before any pixel is decoded:
    a larger image raises :class:`ImageTooLargeError`, as does one PIL takes for a decompression bomb.
    """
    if data.startswith("data:") and "," not in data:
        raise InputError(f"{field}: expected a data URL of the form 'data:image/png;base64,<data>', got one with no ',' before the data")
    payload = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{field}: expected a PNG or JPEG as a data URL or base64, got text that is not base64 ({exc})") from None
    limit = f"this server takes images of at most {max_side}x{max_side} pixels" if max_side else "it is refused"
    return open_image(raw, what=field, max_side=max_side, formats=IMAGE_FORMATS, expected="a PNG or JPEG image",
                      limit=limit + (" (ccm serve --max-size raises the limit)" if max_side else ""))


def encode_png(image: Image.Image) -> str:
    """``image`` as a ``data:image/png;base64,`` URL."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class GenerationService:
    """A loaded pipeline behind a bounded FIFO queue: requests in, data URLs out, one generation at a time.

    ``max_size`` caps the side of every input image (and so of the output, which follows the
    control map); by default it is the model's native size, or the starting control map's if
    larger. ``max_queue`` requests may wait behind the one generating; more get :class:`ServerBusyError`.
    """

    def __init__(self, pipe: Any, *, model: str, condition: str | None = None, condition_options: dict[str, Any] | None = None,
                 initial_prompt: str = "", initial_control: Image.Image | None = None, default_steps: int = 4,
                 initial_image: Image.Image | None = None, initial_mask: Image.Image | None = None,
                 max_size: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE):
        self.pipe = pipe
        self.model = model
        self.condition = condition
        self.condition_options = condition_options or {}
        self.initial_prompt = initial_prompt
        self.initial_control = initial_control
        if initial_image is None and initial_control is not None and initial_control.mode == "RGBA" and self.control_channels == 4:
            # a ready inpainting map: its colours are the picture (masked pixels 0), its alpha the mask
            initial_image, initial_mask = initial_control.convert("RGB"), initial_control.getchannel("A")
        self.initial_image, self.initial_mask = initial_image, initial_mask
        self.default_steps = default_steps
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.size = (initial_control.height, initial_control.width) if initial_control is not None else (native, native)
        self.max_size = self._check_max_size(max_size, native)
        self.max_body_bytes = max_body_bytes(self.max_size)
        self._queue = WorkQueue(max_queue)
        pipe.set_progress_bar_config(disable=True)

    def _check_max_size(self, max_size: int | None, native: int) -> int:
        smallest = max(native, *self.size)
        if max_size is None:
            return smallest
        if isinstance(max_size, bool) or not isinstance(max_size, int) or not smallest <= max_size <= MAX_SIZE_LIMIT:
            raise InputError(f"max_size: expected pixels a side from the drawing size {smallest} to {MAX_SIZE_LIMIT}, got {max_size!r}")
        return max_size

    @property
    def control_channels(self) -> int | None:
        nets = self.pipe.controlnets
        return int(nets[0].config.conditioning_channels) if nets else None

    def info(self) -> dict[str, Any]:
        """What the page needs: the model, the size to draw at and the starting prompt and map."""
        return {
            "model": self.model,
            "controlnets": len(self.pipe.controlnets),
            "control_channels": self.control_channels,
            "condition": self.condition,
            "size": list(self.size),
            "max_size": self.max_size,
            "steps": self.default_steps,
            "guidance": self.pipe.generation_defaults.guidance_scale,
            "prompt": self.initial_prompt,
            "control": encode_png(self.initial_control) if self.initial_control is not None else None,
            "image": encode_png(self.initial_image) if self.initial_image is not None else None,
            "mask": encode_png(self.initial_mask) if self.initial_mask is not None else None,
        }

    def _decode(self, data: str, field: str) -> Image.Image:
        return decode_image(data, field=field, max_side=self.max_size)

    def _inputs(self, request: GenerateRequest) -> dict[str, Image.Image]:
        """The request's images, decoded and checked (sizes included) before it joins the queue."""
        if self.control_channels is None:
            if request.control is not None or request.image is not None:
                raise InputError("this model has no ControlNet: send a prompt without 'control' or 'image'")
            return {}
        if request.control is None and request.image is None:
            raise InputError("this model has a ControlNet: send 'control' (a control map) or 'image' (to preprocess)")
        if request.control is not None:
            # a canvas exports RGBA; a 3-channel ControlNet takes its colours, a 4-channel one (mask) all four
            return {"control": self._decode(request.control, "control").convert("RGBA" if self.control_channels == 4 else "RGB")}
        if request.mask is None:
            if self.condition is None:
                raise InputError("'image' needs a condition to preprocess it, and the server has none: start it with "
                                 "--condition, or send a ready control map as 'control'")
            if self.condition == "mask":
                raise InputError("this server inpaints (condition 'mask'): send 'mask' (white = the region to generate) with 'image'")
            return {"image": self._decode(request.image, "image").convert("RGB")}
        if self.control_channels != 4:
            raise InputError(f"'mask' needs an inpainting ControlNet (4 conditioning channels); this server's takes {self.control_channels}")
        return {"image": self._decode(request.image, "image").convert("RGB"), "mask": self._decode(request.mask, "mask").convert("L")}

    def _control_map(self, inputs: dict[str, Image.Image]) -> Image.Image | None:
        """The control map: as sent, or ``image`` through the server's condition (with ``mask``, the inpainting one)."""
        from .. import get_condition

        if "image" not in inputs:
            return inputs.get("control")
        if "mask" not in inputs:
            control = get_condition(self.condition, **self.condition_options)(inputs["image"], output_type="pil")[0]
        else:
            options = self.condition_options if self.condition == "mask" else {}
            control = get_condition("mask", **options)(inputs["image"], mask=inputs["mask"], output_type="pil")[0]
        if max(control.size) > self.max_size:  # a condition that enlarges would lift the cap on the output
            raise ImageTooLargeError(f"the condition made a {control.width}x{control.height} control map; this server "
                                     f"generates at most {self.max_size}x{self.max_size} pixels")
        return control

    def _run(self, request: GenerateRequest, inputs: dict[str, Image.Image]) -> dict[str, Any]:
        control = self._control_map(inputs)
        output = self.pipe(
            request.prompt,
            control,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            controlnet_conditioning_scale=request.control_scale,
            generator=torch.Generator().manual_seed(request.seed),
        )
        return {
            "image": encode_png(output.images[0]),
            "control": encode_png(control) if control is not None else None,
            "nfe": output.nfe,
            "seconds": round(float(output.timings["total"]), 4),
        }

    def submit(self, request: GenerateRequest, *, wanted: Callable[[], bool] | None = None) -> Future:
        """Check and decode ``request`` now (raising :class:`CCMError` subclasses), queue the model work.

        Raises :class:`ServerBusyError` when the queue is full; the future's result is :meth:`generate`'s answer.
        ``wanted`` is asked when the request's turn comes: False (its client has gone) skips the work and
        cancels the future.
        """
        inputs = self._inputs(request)
        return self._queue.submit(self._run, request, inputs, wanted=wanted)

    def run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the generation queue's turn (``/api/stream`` frames share the model with requests)."""
        return self._queue.submit(fn, *args).result()

    def generate(self, request: GenerateRequest) -> dict[str, Any]:
        """Run one request in its turn; raises :class:`CCMError` subclasses for input the pipeline refuses."""
        return self.submit(request).result()

    def close(self) -> None:
        """Finish the queued requests and stop the worker; later requests get :class:`ServerBusyError`."""
        self._queue.close()


def client_gone(sock: socket.socket) -> bool:
    """Whether the client of ``sock`` has closed or reset the connection, without blocking or consuming data.

    A readable socket whose peek reads nothing has reached end of file: the client closed its side
    (a client that half-closes after sending its request counts as gone too). Bytes waiting (a next
    request) mean it is still there.
    """
    if sock.fileno() < 0:  # closed on this side
        return True
    try:
        if hasattr(select, "poll"):  # select.select cannot take descriptors past FD_SETSIZE
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            readable = bool(poller.poll(0))
        else:
            readable = bool(select.select([sock], [], [], 0)[0])
        # readable: a peek returns at once (the socket's own timeout would otherwise make recv wait)
        return readable and sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError, TimeoutError, ValueError):  # cannot tell: keep the request
        return False
    except OSError:  # reset by the client
        return True


class _DeadlineReader(io.RawIOBase):
    """A socket's input that raises :class:`TimeoutError` once ``deadline`` (``time.monotonic()``) has passed.

    A per-read socket timeout alone lets a client that sends one byte every few seconds hold a
    connection forever; a deadline per request bounds the request line, headers and body together.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline = float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive before the read timeout")
        self.sock.settimeout(remaining)
        return self.sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    service: GenerationService  # these four are set on the subclass make_server builds
    policy: AccessPolicy
    read_timeout = DEFAULT_READ_TIMEOUT
    verbose = False
    server_version = "ccm-serve"
    default_request_version = "HTTP/1.0"  # not http.server's 0.9, whose error answers have no status line

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced by one with a deadline; the socket stays open
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._reader.deadline = time.monotonic() + self.read_timeout
        self._body_pending = False
        self._cors_origin: str | None = None
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:
        if self.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str, extra_headers: dict[str, str] | None = None) -> None:
        self.connection.settimeout(self.read_timeout)  # a client that does not read its answer is dropped too
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self._send_cors_headers()
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        if self._body_pending:
            self._drain_unread_body()

    def _send_cors_headers(self) -> None:
        if self._cors_origin is not None:
            self.send_header("Access-Control-Allow-Origin", self._cors_origin)
            self.send_header("Vary", "Origin")

    def _drain_unread_body(self) -> None:
        """After answering without reading the body: stop writing and read what still comes for a moment.

        Closing a socket with unread input resets the connection, and the client may then lose
        the answer before reading it; a short, bounded drain (as web servers' lingering close) avoids that.
        """
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            end, drained = time.monotonic() + min(DRAIN_SECONDS, self.read_timeout), 0
            while drained < DRAIN_BYTES and (left := end - time.monotonic()) > 0:
                self.connection.settimeout(left)
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass

    def _json(self, status: int, payload: dict[str, Any], extra_headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", extra_headers)

    def _error(self, status: int, message: str, kind: str, extra_headers: dict[str, str] | None = None) -> None:
        self._json(status, {"error": message, "type": kind}, extra_headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, too many headers, an unknown method) as JSON too."""
        self.close_connection = True
        short, long = self.responses.get(code, ("Error", ""))
        self.log_error("code %d, message %s", code, message or short)
        self._error(code, f"{message or short}: {explain or long}", short.title().replace(" ", ""))

    def _guard(self) -> bool:
        """The Host and Origin checks every request passes; False once it has been answered 403."""
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1 or not self.policy.host_allowed(hosts[0]):
            got = repr(hosts[0]) if len(hosts) == 1 else f"{len(hosts)} Host headers"
            self._error(HTTPStatus.FORBIDDEN, f"expected one Host header naming this server ({self.policy.hosts_text()}), "
                        f"got {got}; start ccm serve with --allow-host NAME to answer to another name", "ForbiddenHost")
            return False
        origins = self.headers.get_all("Origin") or []
        if len(origins) > 1:  # no browser sends two; which one a check read would be a guess
            self._error(HTTPStatus.FORBIDDEN, f"expected at most one Origin header, got {len(origins)}", "ForbiddenOrigin")
            return False
        origin = origins[0] if origins else None
        if origin is not None:
            if not self.policy.origin_allowed(origin):
                self._error(HTTPStatus.FORBIDDEN, f"requests from pages at {origin!r} are refused: expected no Origin or this "
                            f"server's own (e.g. {self.policy.own_origins()[0]}); start ccm serve with --allow-origin ORIGIN "
                            "to let a site call it", "ForbiddenOrigin")
                return False
            if self.policy.is_foreign_allowed(origin):
                self._cors_origin = origin
        return True

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._guard():
            return
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            page = resources.files(__package__).joinpath("page.html").read_bytes()
            self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
        elif path == "/api/info":
            self._json(HTTPStatus.OK, self.service.info())
        elif path == "/api/stream":
            from .stream_session import serve_websocket

            serve_websocket(self, self.service)
        elif path == "/favicon.ico":
            self._send(HTTPStatus.OK, FAVICON_SVG, "image/svg+xml")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such page {path!r}; the app is at / and the API at /api/info, /api/generate "
                        "and /api/stream (WebSocket)", "NotFound")

    def do_OPTIONS(self) -> None:  # noqa: N802
        """A CORS preflight: answered for the origins ``--allow-origin`` lets in, with no CORS headers for others."""
        if not self._guard():
            return
        self.connection.settimeout(self.read_timeout)
        self.send_response(HTTPStatus.NO_CONTENT)
        self.send_header("Allow", "GET, POST, OPTIONS")
        if self._cors_origin is not None:
            self._send_cors_headers()
            self.send_header("Access-Control-Allow-Methods", "GET, POST")
            self.send_header("Access-Control-Allow-Headers", "Content-Type")
            self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:  # noqa: N802
        self._body_pending = self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers
        if not self._guard():
            return
        path = self.path.split("?", 1)[0]
        if path != "/api/generate":
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint {path!r}; POST to /api/generate", "NotFound")
            return
        content_type = self.headers.get("Content-Type")
        if content_type is None or content_type.split(";", 1)[0].strip().lower() != "application/json":
            got = f"{content_type!r}" if content_type is not None else "none"
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"expected Content-Type: application/json, got {got}", "UnsupportedMediaType")
            return
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1:
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, f"expected one Content-Length header, got {len(lengths)}", "BadContentLength")
            return
        length = lengths[0] if lengths else None
        if "Transfer-Encoding" in self.headers or length is None or not (length.isascii() and length.isdigit()):
            self._error(HTTPStatus.LENGTH_REQUIRED, "expected a Content-Length header with the body's size (chunked bodies are not read)",
                        "LengthRequired")
            return
        limit = self.service.max_body_bytes
        if int(length) > limit:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body may be at most {limit} bytes, got {length} "
                        "(ccm serve --max-size raises the limit with the image size)", "TooLarge")
            return
        body = self._read_body(int(length))
        if body is None:
            return
        try:
            request = GenerateRequest.model_validate_json(body)
        except ValidationError as exc:
            self._error(HTTPStatus.BAD_REQUEST, validation_problems(exc, root="body"), "ValidationError")
            return
        self._generate(request)

    def _read_body(self, length: int) -> bytes | None:
        """The body, or None once the client has been answered (408 when it stalls, 400 when it stops short)."""
        self._body_pending = False  # read, or not worth waiting for any longer
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_TIMEOUT, f"expected a body of {length} bytes within the server's read timeout of "
                        f"{self.read_timeout:g} s (ccm serve --read-timeout), got less", "RequestTimeout")
            return None
        if len(body) < length:
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, f"expected a body of {length} bytes (Content-Length), got {len(body)} before "
                        "the client closed its side", "IncompleteBody")
            return None
        return body

    def _generate(self, request: GenerateRequest) -> None:
        try:
            answer = self.service.submit(request, wanted=lambda: not client_gone(self.connection)).result()
        except CancelledError:  # the client left before its turn: nobody to answer
            self.close_connection = True
            return
        except ServerBusyError as exc:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc), type(exc).__name__, {"Retry-After": "1"})
        except ImageTooLargeError as exc:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(exc), type(exc).__name__)
        except ConditionOutputError as exc:  # the server's condition plugin is at fault, not the request
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc), type(exc).__name__)
        except CCMError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc), type(exc).__name__)
        except Exception as exc:  # a bug must not take the server down: report it, keep serving
            traceback.print_exc(file=sys.stderr)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}: {exc}", "InternalError")
        else:
            self._json(HTTPStatus.OK, answer)


class CCMServer(ThreadingHTTPServer):
    """A thread per connection (a slow client holds only its own), at most ``max_connections`` at once.

    Connections beyond the limit get a 503 at once. Closing the server closes the service's queue.
    """

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: socketserver's 5 drops connections (a 1 s client retry) under a burst

    def __init__(self, address: tuple[str, int], handler: type[_Handler], *, service: GenerationService, max_connections: int):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.service = service
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        body = json.dumps({"error": f"the server is busy: {self.max_connections} connections are open already; "
                                    "try again in a moment", "type": "ServerBusyError"}).encode()
        head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Retry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(0.1)  # the accepting thread must not wait on this client
            request.sendall(head + body)
        except OSError:
            pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that went away or stalled: nothing to report
        super().handle_error(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        self.service.close()


def make_server(service: GenerationService, *, host: str = "127.0.0.1", port: int = 7860, verbose: bool = False,
                allow_hosts: tuple[str, ...] | list[str] = (), allow_origins: tuple[str, ...] | list[str] = (),
                read_timeout: float = DEFAULT_READ_TIMEOUT, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> CCMServer:
    """An HTTP server for ``service`` (not started: call ``serve_forever``); port 0 picks a free one.

    It answers only requests whose Host names it (loopback names and ``host``, on its port, plus
    ``allow_hosts``) and whose Origin, if any, is its own or in ``allow_origins``; a client has
    ``read_timeout`` seconds to send each request.
    """
    if isinstance(read_timeout, bool) or not isinstance(read_timeout, (int, float)) or not 0 < read_timeout <= 3600:
        raise InputError(f"read_timeout: expected seconds in (0, 3600], got {read_timeout!r}")
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
        raise InputError(f"max_connections: expected at least 1, got {max_connections!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InputError(f"port: expected 0 (any free one) to 65535, got {port!r}")
    policy = AccessPolicy.for_address(host, port, allow_hosts=allow_hosts, allow_origins=allow_origins)  # checks them before binding
    handler = type("Handler", (_Handler,), {"service": service, "policy": policy, "verbose": verbose, "read_timeout": float(read_timeout)})
    try:
        server = CCMServer((host, port), handler, service=service, max_connections=max_connections)
    except OSError as exc:  # an unknown host name, an address not on this machine, a port in use or not allowed
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    handler.policy = dataclasses.replace(policy, port=server.server_address[1])  # the port bound when asked for 0
    return server


def server_url(server: ThreadingHTTPServer) -> str:
    """The address to open: a wildcard bind (0.0.0.0, ::) is reached through the loopback address."""
    host, port = server.server_address[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
