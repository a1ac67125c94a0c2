"""Reading images that come from outside (files, request bodies) without trusting them.

The size in the image's header is checked before any pixel is decoded, PIL's decompression-bomb
warning is an error, and every failure is a typed error that names the input: used by
``ccm serve`` for request bodies and by the ``ccm`` commands for ``--image``/``--control``/``--mask``.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import ImageTooLargeError, InputError

MAX_SIDE_LIMIT = 4096  # a 4096x4096 image is what PIL decodes without a bomb warning, with room
_BOMB_CHECK = threading.Lock()
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def _open_header(source: bytes | Path, formats: tuple[str, ...] | None) -> Image.Image:
    """Reads the header only; PIL's decompression-bomb warning becomes an error (the lock keeps the warning filter to one thread)."""
    with _BOMB_CHECK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=formats)


def open_image(
    source: bytes | str | os.PathLike,
    *,
    what: str,
    max_side: int | None = None,
    formats: tuple[str, ...] | None = None,
    expected: str = "an image",
    limit: str | None = None,
) -> Image.Image:
    """The image in ``source`` (bytes, or a file's path), fully read.

    With ``max_side``, a larger image raises :class:`ImageTooLargeError` before its pixels are
    decoded, as does one PIL takes for a decompression bomb; ``limit`` says what the caller takes
    (and how to change it). Anything else that is not a readable image raises :class:`InputError`
    naming ``what``: a missing, empty or truncated file, a directory, another kind of file.
    """
    if limit is None:
        limit = f"at most {max_side}x{max_side} pixels are taken" if max_side else "it is refused"
    if isinstance(source, bytes):
        data: bytes | Path = source
        got = f"{len(source)} bytes"
    else:
        data = Path(source)
        if data.is_dir():
            raise InputError(f"{what}: expected {expected} file, got the directory {str(data)!r}")
        if not data.is_file():
            raise InputError(f"{what}: expected {expected} file, got {str(data)!r}, which does not exist")
        got = f"the file {str(data)!r} ({data.stat().st_size} bytes)"
        if data.stat().st_size == 0:
            raise InputError(f"{what}: expected {expected}, got the empty file {str(data)!r} (0 bytes)")
    try:
        image = _open_header(data, formats)
    except _BOMB_ERRORS as exc:
        raise ImageTooLargeError(f"{what}: the image is too large to decode ({exc}); {limit}") from None
    except _DECODE_ERRORS as exc:
        raise InputError(f"{what}: expected {expected}, got {got} that no image decoder reads ({exc})") from None
    if max_side is not None and max(image.size) > max_side:
        image.close()
        raise ImageTooLargeError(f"{what}: the image is {image.width}x{image.height} pixels; {limit}")
    try:
        image.load()
    except _BOMB_ERRORS as exc:
        raise ImageTooLargeError(f"{what}: the image is too large to decode ({exc}); {limit}") from None
    except _DECODE_ERRORS as exc:
        raise InputError(f"{what}: expected {expected}, got {got} that do not decode ({exc})") from None
    return image
