"""``ccm serve``: a drawing page and a JSON endpoint that turns each sketch into an image.

Endpoints: ``GET /`` (the page), ``GET /api/info`` (model, size, defaults) and
``POST /api/generate`` (a :class:`GenerateRequest` as JSON -> the image as a PNG data URL).
Bad requests get a 4xx answer with a message that says what was expected; the server keeps
running. It binds to 127.0.0.1 unless told otherwise, and never reads a path a client names.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import CCMError, InputError

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_PROMPT_CHARS = 1000


class GenerateRequest(BaseModel):
    """The body of ``POST /api/generate``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    control: str | None = Field(None, description="a ready control map: PNG/JPEG as a data URL or bare base64")
    image: str | None = Field(None, description="an image to turn into the control map with the server's condition")
    mask: str | None = Field(None, description="with 'image' and an inpainting (4-channel) ControlNet: the region to "
                                               "generate, white on black")
    steps: int = Field(4, ge=1, le=50)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    guidance: float = Field(8.0, ge=0.0, le=30.0)
    control_scale: float = Field(1.0, ge=0.0, le=2.0)

    @model_validator(mode="after")
    def _one_source(self) -> GenerateRequest:
        if self.control is not None and self.image is not None:
            raise ValueError("send 'control' (a ready control map) or 'image' (to preprocess), not both")
        if self.mask is not None and self.image is None:
            raise ValueError("'mask' goes with 'image' (the picture to inpaint); a ready 'control' map holds its mask already")
        return self


def decode_image(data: str, *, field: str) -> Image.Image:
    """A PNG/JPEG from a ``data:image/...;base64,`` URL or bare base64, fully read (typed errors)."""
    payload = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{field}: expected a PNG or JPEG as a data URL or base64, got text that is not base64 ({exc})") from None
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{field}: expected a PNG or JPEG image, got {len(raw)} bytes that no image decoder reads ({exc})") from None
    return image


def encode_png(image: Image.Image) -> str:
    """``image`` as a ``data:image/png;base64,`` URL."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class GenerationService:
    """A loaded pipeline behind a lock: one generation at a time, requests in, data URLs out."""

    def __init__(self, pipe: Any, *, model: str, condition: str | None = None, condition_options: dict[str, Any] | None = None,
                 initial_prompt: str = "", initial_control: Image.Image | None = None, default_steps: int = 4,
                 initial_image: Image.Image | None = None, initial_mask: Image.Image | None = None):
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
        self._lock = threading.Lock()
        if initial_control is not None:
            self.size = (initial_control.height, initial_control.width)
        else:
            side = pipe.unet.config.sample_size * pipe.vae_scale_factor
            self.size = (side, side)
        pipe.set_progress_bar_config(disable=True)

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
            "steps": self.default_steps,
            "prompt": self.initial_prompt,
            "control": encode_png(self.initial_control) if self.initial_control is not None else None,
            "image": encode_png(self.initial_image) if self.initial_image is not None else None,
            "mask": encode_png(self.initial_mask) if self.initial_mask is not None else None,
        }

    def _control_map(self, request: GenerateRequest) -> Image.Image | None:
        if self.control_channels is None:
            if request.control is not None or request.image is not None:
                raise InputError("this model has no ControlNet: send a prompt without 'control' or 'image'")
            return None
        if request.control is None and request.image is None:
            raise InputError("this model has a ControlNet: send 'control' (a control map) or 'image' (to preprocess)")
        if request.image is not None:
            return self._preprocess(request)
        control = decode_image(request.control, field="control")
        # a canvas exports RGBA; a 3-channel ControlNet takes its colours, a 4-channel one (mask) all four
        return control.convert("RGBA" if self.control_channels == 4 else "RGB")

    def _preprocess(self, request: GenerateRequest) -> Image.Image:
        """``image`` through the server's condition; with ``mask``, through the inpainting (mask) condition."""
        from .. import get_condition

        image = decode_image(request.image, field="image").convert("RGB")
        if request.mask is None:
            if self.condition is None:
                raise InputError("'image' needs a condition to preprocess it, and the server has none: start it with "
                                 "--condition, or send a ready control map as 'control'")
            if self.condition == "mask":
                raise InputError("this server inpaints (condition 'mask'): send 'mask' (white = the region to generate) with 'image'")
            return get_condition(self.condition, **self.condition_options)(image, output_type="pil")[0]
        if self.control_channels != 4:
            raise InputError(f"'mask' needs an inpainting ControlNet (4 conditioning channels); this server's takes {self.control_channels}")
        options = self.condition_options if self.condition == "mask" else {}
        mask = decode_image(request.mask, field="mask").convert("L")
        return get_condition("mask", **options)(image, mask=mask, output_type="pil")[0]

    def generate(self, request: GenerateRequest) -> dict[str, Any]:
        """Run one request; raises :class:`CCMError` subclasses for input the pipeline refuses."""
        control = self._control_map(request)
        with self._lock:
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


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


class _Handler(BaseHTTPRequestHandler):
    service: GenerationService  # set on the subclass make_server builds
    verbose = False
    server_version = "ccm-serve"

    def log_message(self, format: str, *args: Any) -> None:
        if self.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _error(self, status: int, message: str, kind: str) -> None:
        self._json(status, {"error": message, "type": kind})

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            page = resources.files(__package__).joinpath("page.html").read_bytes()
            self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
        elif path == "/api/info":
            self._json(HTTPStatus.OK, self.service.info())
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such page {path!r}; the app is at / and the API at /api/info and /api/generate", "NotFound")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path != "/api/generate":
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint {path!r}; POST to /api/generate", "NotFound")
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(HTTPStatus.LENGTH_REQUIRED, "expected a Content-Length header with the body's size", "LengthRequired")
            return
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body may be at most {MAX_BODY_BYTES} bytes, got {length}", "TooLarge")
            return
        body = self.rfile.read(int(length))
        try:
            request = GenerateRequest.model_validate_json(body)
        except ValidationError as exc:
            self._error(HTTPStatus.BAD_REQUEST, _validation_message(exc), "ValidationError")
            return
        try:
            self._json(HTTPStatus.OK, self.service.generate(request))
        except CCMError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc), type(exc).__name__)
        except Exception as exc:  # a bug must not take the server down: report it, keep serving
            traceback.print_exc(file=sys.stderr)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}: {exc}", "InternalError")


def make_server(service: GenerationService, *, host: str = "127.0.0.1", port: int = 7860, verbose: bool = False) -> ThreadingHTTPServer:
    """An HTTP server for ``service`` (not started: call ``serve_forever``); port 0 picks a free one."""
    handler = type("Handler", (_Handler,), {"service": service, "verbose": verbose})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def server_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"
