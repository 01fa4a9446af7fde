"""Image sources (PIL, bytes, path, data:/http(s)/file:// URL) -> RGB PIL image, with size and time limits.

No torch here: this runs on the HTTP side. Every failure is a client error: `InvalidRequestError` (400) for
bad input and `PayloadTooLargeError` (413) for input over the byte or pixel limit. Callers fill `param`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import time
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from stepserve.errors import InvalidRequestError, PayloadTooLargeError

MiB = 1024 * 1024
DEFAULT_MAX_BYTES = 20 * MiB
DEFAULT_MAX_PIXELS = 64 * MiB

ImageSource = Image.Image | bytes | bytearray | memoryview | Path | str


def load_image(source: ImageSource, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
               timeout: float = 10.0, allowed_local_path: str | None = None, param: str | None = None) -> Image.Image:
    """Load `source` into an RGB image with EXIF orientation applied.

    `allowed_local_path`: local files (plain paths, `Path`, file:// URLs) are read only if they resolve inside
    this directory; None refuses all local files (the server default), "/" allows any (the offline API).
    """
    return load_image_and_bytes(source, max_bytes=max_bytes, max_pixels=max_pixels, timeout=timeout,
                                allowed_local_path=allowed_local_path, param=param)[0]


def load_image_and_bytes(source: ImageSource, *, max_bytes: int = DEFAULT_MAX_BYTES,
                         max_pixels: int = DEFAULT_MAX_PIXELS, timeout: float = 10.0,
                         allowed_local_path: str | None = None,
                         param: str | None = None) -> tuple[Image.Image, bytes | None]:
    """`load_image`, and the encoded bytes the image was decoded from (None for a PIL image source)."""
    if isinstance(source, str) and is_http_url(source):
        data: bytes | Image.Image = _fetch_sync(source, max_bytes, timeout, param)
    else:
        data = _read_not_http(source, max_bytes, max_pixels, allowed_local_path, param)
    return _decoded(data, max_pixels, param)


async def load_image_async(source: ImageSource, *, max_bytes: int = DEFAULT_MAX_BYTES,
                           max_pixels: int = DEFAULT_MAX_PIXELS, timeout: float = 10.0,
                           allowed_local_path: str | None = None, param: str | None = None) -> Image.Image:
    """`load_image` for the event loop: http(s) is fetched without blocking, decoding runs in a thread."""
    if isinstance(source, str) and is_http_url(source):
        data = await fetch_image_bytes(source, max_bytes, timeout, param)
        return await asyncio.to_thread(_decode, data, max_pixels, param)
    data = await asyncio.to_thread(_read_not_http, source, max_bytes, max_pixels, allowed_local_path, param)
    return (await asyncio.to_thread(_decoded, data, max_pixels, param))[0]


def is_http_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


async def fetch_image_bytes(url: str, max_bytes: int, timeout: float, param: str | None) -> bytes:
    """The body of an http(s) image URL without blocking the event loop; over `timeout` s is a 400."""
    try:
        return await asyncio.wait_for(_fetch_async(url, max_bytes, timeout, param), timeout)
    except asyncio.TimeoutError:
        raise _timeout_error(url, timeout, param) from None


def _read_not_http(source: ImageSource, max_bytes: int, max_pixels: int, allowed_local_path: str | None,
                   param: str | None) -> bytes | Image.Image:
    """The encoded bytes of a non-http source, or the PIL image it is."""
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, param)
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        _check_bytes(len(source), max_bytes, param)
        return bytes(source)
    if isinstance(source, Path):
        return _read_local(source, max_bytes, allowed_local_path, param)
    if isinstance(source, str):
        if source.startswith("data:"):
            return _parse_data_url(source, max_bytes, param)
        if source.startswith("file://"):
            return _read_local(Path(unquote(urlparse(source).path)), max_bytes, allowed_local_path, param)
        if "://" in source:
            raise InvalidRequestError(f"unsupported image URL scheme in {_short(source)!r}; use http(s), data: or "
                                      "file://", param)
        return _read_local(Path(source), max_bytes, allowed_local_path, param)
    raise InvalidRequestError(f"unsupported image source type {type(source).__name__}", param)


def _decoded(data: bytes | Image.Image, max_pixels: int, param: str | None) -> tuple[Image.Image, bytes | None]:
    if isinstance(data, Image.Image):
        return _to_rgb(data, param, owned=False), None
    return _decode(data, max_pixels, param), data


def _parse_data_url(url: str, max_bytes: int, param: str | None) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise InvalidRequestError("image data: URL must have the form data:<mime>;base64,<data>", param)
    # Reject by the encoded length first so an oversized payload is never decoded.
    _check_bytes(len(payload) * 3 // 4, max_bytes, param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequestError(f"image data: URL has invalid base64 ({e})", param) from None


def _read_local(path: Path, max_bytes: int, allowed_local_path: str | None, param: str | None) -> bytes:
    if allowed_local_path is None:
        raise InvalidRequestError("local image files are not allowed (the server was started without "
                                  "--allowed-local-media-path)", param)
    # realpath follows symlinks and '..', so a link inside the allowed dir cannot point outside it.
    resolved = os.path.realpath(path)
    root = os.path.realpath(allowed_local_path)
    if os.path.commonpath([resolved, root]) != root:
        raise InvalidRequestError(f"local image path {str(path)!r} is outside the allowed directory", param)
    try:
        size = os.path.getsize(resolved)
        _check_bytes(size, max_bytes, param)
        with open(resolved, "rb") as f:
            return f.read()
    except OSError as e:
        raise InvalidRequestError(f"cannot read local image {str(path)!r}: {e.strerror}", param) from None


def _fetch_sync(url: str, max_bytes: int, timeout: float, param: str | None) -> bytes:
    # httpx timeouts bound each network operation; the deadline bounds the whole download.
    deadline = time.monotonic() + timeout
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as client, client.stream("GET", url) as r:
            body = _Body(url, r, max_bytes, param)
            for chunk in r.iter_bytes():
                body.add(chunk)
                if time.monotonic() > deadline:
                    raise httpx.TimeoutException("total time exceeded")
            return body.data()
    except httpx.TimeoutException:
        raise _timeout_error(url, timeout, param) from None
    except httpx.HTTPError as e:
        raise InvalidRequestError(f"cannot fetch image URL {_short(url)!r}: {e}", param) from None


async def _fetch_async(url: str, max_bytes: int, timeout: float, param: str | None) -> bytes:
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True) as client:
            async with client.stream("GET", url) as r:
                body = _Body(url, r, max_bytes, param)
                async for chunk in r.aiter_bytes():
                    body.add(chunk)
                return body.data()
    except httpx.TimeoutException:
        raise _timeout_error(url, timeout, param) from None
    except httpx.HTTPError as e:
        raise InvalidRequestError(f"cannot fetch image URL {_short(url)!r}: {e}", param) from None


class _Body:
    """Collects a streamed response body, failing as soon as the byte limit is crossed."""

    def __init__(self, url: str, response: httpx.Response, max_bytes: int, param: str | None):
        if response.status_code >= 400:
            raise InvalidRequestError(f"fetching image URL {_short(url)!r} returned HTTP {response.status_code}",
                                      param)
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit():
            _check_bytes(int(declared), max_bytes, param)
        self.chunks: list[bytes] = []
        self.size = 0
        self.max_bytes = max_bytes
        self.param = param

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        _check_bytes(self.size, self.max_bytes, self.param)
        self.chunks.append(chunk)

    def data(self) -> bytes:
        return b"".join(self.chunks)


def _decode(data: bytes, max_pixels: int, param: str | None) -> Image.Image:
    try:
        # PIL warns above Image.MAX_IMAGE_PIXELS; our own limit is checked below from the header, before the
        # pixels are decoded, so the warning is noise. Its hard error (2x that) still becomes a 413.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise PayloadTooLargeError(f"image is too large: {e}", param) from None
    except UnidentifiedImageError:  # its text names only our BytesIO
        raise InvalidRequestError(f"cannot decode image: {len(data)} bytes in no image format known to PIL",
                                  param) from None
    except (OSError, ValueError) as e:
        raise InvalidRequestError(f"cannot decode image: {e}", param) from None
    _check_pixels(img.size, max_pixels, param)
    return _to_rgb(img, param, owned=True)


def _to_rgb(img: Image.Image, param: str | None, owned: bool) -> Image.Image:
    # Same as the reference loader (transformers `load_image`): EXIF transpose, then `.convert("RGB")`, which
    # DROPS alpha (transparent pixels keep their stored colour) rather than compositing on white.
    # A caller's PIL image is never modified; one we decoded ourselves is transposed in place (no copy).
    try:
        if owned:
            ImageOps.exif_transpose(img, in_place=True)
        else:
            img = ImageOps.exif_transpose(img)
        return img if img.mode == "RGB" else img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for truncated/corrupt data on load
        raise InvalidRequestError(f"cannot decode image: {e}", param) from None


def _check_bytes(n: int, max_bytes: int, param: str | None) -> None:
    if n > max_bytes:
        raise PayloadTooLargeError(f"image is larger than the {max_bytes}-byte limit", param)


def _check_pixels(size: tuple[int, int], max_pixels: int, param: str | None) -> None:
    w, h = size
    if w * h > max_pixels:
        raise PayloadTooLargeError(f"image of {w}x{h} pixels exceeds the {max_pixels}-pixel limit", param)


def _timeout_error(url: str, timeout: float, param: str | None) -> InvalidRequestError:
    return InvalidRequestError(f"timed out after {timeout:g}s fetching image URL {_short(url)!r}", param)


def _short(s: str, n: int = 200) -> str:
    return s if len(s) <= n else s[:n] + "..."
