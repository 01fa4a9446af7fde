"""Image loading: sources, limits, modes, and the http(s) fetch against a local server."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from stepserve.errors import InvalidRequestError, PayloadTooLargeError
from stepserve.multimodal.image_io import load_image, load_image_and_bytes, load_image_async


def png(w: int = 40, h: int = 30, mode: str = "RGB", color=(200, 100, 50)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_data_url():
    img = load_image(data_url(png(40, 30)))
    assert img.mode == "RGB" and img.size == (40, 30) and img.getpixel((0, 0)) == (200, 100, 50)


def test_the_encoded_bytes_come_with_the_image(tmp_path):
    data = png(40, 30)
    (tmp_path / "a.png").write_bytes(data)
    for source in (data_url(data), data, bytearray(data), tmp_path / "a.png", f"file://{tmp_path}/a.png"):
        img, encoded = load_image_and_bytes(source, allowed_local_path=str(tmp_path))
        assert encoded == data and img.size == (40, 30)
    pil = Image.new("RGB", (5, 4))
    img, encoded = load_image_and_bytes(pil)
    assert encoded is None and img.size == (5, 4)


@pytest.mark.parametrize("url,match", [
    ("data:image/png;base64,@@@not-base64", "invalid base64"),
    ("data:image/png;base64,iVBORw0KGgo", "invalid base64"),  # truncated padding
    ("data:image/png,rawbytes", "data:<mime>;base64"),
])
def test_broken_data_url(url, match):
    with pytest.raises(InvalidRequestError, match=match) as e:
        load_image(url, param="messages[0].content[1].image_url")
    assert e.value.param == "messages[0].content[1].image_url" and e.value.status_code == 400


def test_not_an_image():
    with pytest.raises(InvalidRequestError, match="cannot decode image"):
        load_image(data_url(b"hello, this is text"))
    with pytest.raises(InvalidRequestError, match="cannot decode image"):
        load_image(png()[:60])  # a PNG header with the pixel data cut off


def test_byte_limit():
    data = png(200, 200)
    with pytest.raises(PayloadTooLargeError) as e:
        load_image(data, max_bytes=len(data) - 1)
    assert e.value.status_code == 413
    with pytest.raises(PayloadTooLargeError):
        load_image(data_url(data), max_bytes=len(data) // 2)
    assert load_image(data, max_bytes=len(data)).size == (200, 200)


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    data = png(100, 100)
    with pytest.raises(PayloadTooLargeError, match="100x100"):
        load_image(data, max_pixels=100 * 100 - 1)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1))
    with pytest.raises(PayloadTooLargeError):
        load_image(data, max_pixels=50)
    assert not decoded
    with pytest.raises(PayloadTooLargeError):
        load_image(Image.new("RGB", (100, 100)), max_pixels=50)


def test_pil_decompression_bomb_guard_becomes_413(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses above 2x this
    with pytest.raises(PayloadTooLargeError):
        load_image(png(100, 100))


def test_modes_become_rgb():
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    # Reference behaviour (.convert("RGB")): alpha is dropped, not composited on white.
    assert load_image(rgba).getpixel((0, 0)) == (10, 20, 30)
    assert load_image(png(mode="RGBA", color=(10, 20, 30, 0))).getpixel((0, 0)) == (10, 20, 30)
    pal = Image.new("RGB", (8, 8), (0, 128, 255)).convert("P", palette=Image.Palette.ADAPTIVE)
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (0, 128, 255)
    buf = io.BytesIO()
    Image.new("L", (8, 8), 77).save(buf, "JPEG")
    img = load_image(buf.getvalue())
    assert img.mode == "RGB" and img.getpixel((4, 4)) == (77, 77, 77)


@pytest.mark.parametrize("orientation,red_corner", [(6, (59, 0)), (8, (0, 39))])
def test_exif_orientation_applied(orientation, red_corner):
    stored = Image.new("RGB", (40, 60), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif, quality=95)
    img = load_image(buf.getvalue())
    assert img.size == (60, 40)
    r, g, b = img.getpixel(red_corner)
    assert r > 200 and b < 60
    # A caller's PIL image is transposed in a copy, never in place.
    original = Image.open(io.BytesIO(buf.getvalue()))
    assert load_image(original).size == (60, 40) and original.size == (40, 60)


def test_local_paths(tmp_path: Path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(png(12, 34))
    outside = tmp_path / "secret.png"
    outside.write_bytes(png())
    os.symlink(outside, allowed / "link.png")
    root = str(allowed)
    for source in (allowed / "a.png", str(allowed / "a.png"), f"file://{allowed / 'a.png'}"):
        assert load_image(source, allowed_local_path=root).size == (12, 34)
    assert load_image(outside, allowed_local_path="/").size == (40, 30)  # the offline API allows any path
    with pytest.raises(InvalidRequestError, match="not allowed"):
        load_image(allowed / "a.png")  # no allowed directory: local files refused
    for bad in (outside, allowed / "link.png", f"{root}/../secret.png", f"file://{outside}"):
        with pytest.raises(InvalidRequestError, match="outside the allowed directory"):
            load_image(bad, allowed_local_path=root)
    with pytest.raises(InvalidRequestError, match="cannot read local image"):
        load_image(allowed / "missing.png", allowed_local_path=root)
    with pytest.raises(PayloadTooLargeError):
        load_image(allowed / "a.png", allowed_local_path=root, max_bytes=10)


def test_unsupported_sources():
    with pytest.raises(InvalidRequestError, match="scheme"):
        load_image("ftp://example.invalid/a.png")
    with pytest.raises(InvalidRequestError, match="source type"):
        load_image(12345)


class _Handler(http.server.BaseHTTPRequestHandler):
    body = png(64, 48)

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/ok.png":
            self._send(self.body)
        elif self.path == "/slow":  # nothing for longer than the timeout
            time.sleep(1.5)
            self._send(self.body)
        elif self.path == "/drip":  # each chunk in time, the whole body not
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            for i in range(0, len(self.body), 20):
                self.wfile.write(self.body[i:i + 20])
                self.wfile.flush()
                time.sleep(0.15)
        elif self.path == "/big-chunked":  # no Content-Length: the limit is enforced while streaming
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 50_000)
        else:
            self.send_error(404)

    def _send(self, data: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _closed_port_url() -> str:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/a.png"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_http_fetch(server, mode):
    def load(url, **kw):
        if mode == "sync":
            return load_image(url, **kw)
        return asyncio.run(load_image_async(url, **kw))

    assert load(f"{server}/ok.png").size == (64, 48)
    with pytest.raises(InvalidRequestError, match="HTTP 404"):
        load(f"{server}/missing.png")
    for path in ("/slow", "/drip"):
        t0 = time.monotonic()
        with pytest.raises(InvalidRequestError, match="timed out"):
            load(f"{server}{path}", timeout=0.5)
        assert time.monotonic() - t0 < 1.2, path
    with pytest.raises(PayloadTooLargeError):
        load(f"{server}/ok.png", max_bytes=100)  # refused from Content-Length
    with pytest.raises(PayloadTooLargeError):
        load(f"{server}/big-chunked", max_bytes=10_000)
    with pytest.raises(InvalidRequestError, match="cannot fetch image URL"):
        load(_closed_port_url())


def test_async_non_http_sources(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(png(5, 6))
    assert asyncio.run(load_image_async(data_url(png(7, 8)))).size == (7, 8)
    assert asyncio.run(load_image_async(tmp_path / "a.png", allowed_local_path=str(tmp_path))).size == (5, 6)
    with pytest.raises(InvalidRequestError):
        asyncio.run(load_image_async("data:image/png;base64,%%%"))
