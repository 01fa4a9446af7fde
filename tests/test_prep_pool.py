"""Image preparation in worker processes gives what the in-process path gives, errors included."""

from __future__ import annotations

import asyncio
import base64
import io
import ctypes
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from stepserve.errors import InvalidRequestError, PayloadTooLargeError
from stepserve.multimodal import prep_pool
from stepserve.multimodal.prep_pool import ImageLimits, ImagePrepPool
from stepserve.multimodal.processor import ImageProcessor, ImageTokenIds, encoded_key

IDS = ImageTokenIds(151679, 151680, 151681, 151689, 151690, 151691)
LIMITS = ImageLimits(max_bytes=8 * 2**20, max_pixels=2**24, fetch_timeout=5.0, allowed_local_path=None)


def data_url(w: int, h: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_errors_keep_their_param_across_processes():
    e = pickle.loads(pickle.dumps(InvalidRequestError("bad image", param="messages[0].content[1]")))
    assert type(e) is InvalidRequestError and e.message == "bad image" and e.param == "messages[0].content[1]"


@pytest.fixture(scope="module")
def pools():
    proc = ImageProcessor(IDS)
    procs, threads = ImagePrepPool(proc, LIMITS, workers=2), ImagePrepPool(proc, LIMITS, workers=0)
    procs.start()
    yield procs, threads
    procs.shutdown()
    threads.shutdown()


def test_worker_processes_match_threads(pools):
    procs, threads = pools
    urls = [data_url(1280, 720, 0), data_url(300, 200, 1), data_url(900, 100, 2)]

    async def both():
        a = await asyncio.gather(*(procs.prepare(u, f"img{i}") for i, u in enumerate(urls)))
        b = await asyncio.gather(*(threads.prepare(u, f"img{i}") for i, u in enumerate(urls)))
        return a, b

    got, want = asyncio.run(both())
    assert got[0].num_crops == 6  # 1280x720: view + 6 crops
    for g, w in zip(got, want):
        assert isinstance(g.view, torch.Tensor) and isinstance(g.crops, torch.Tensor)
        assert torch.equal(g.view, w.view) and torch.equal(g.crops, w.crops)
        assert (g.hash, g.size, g.token_ids, g.num_crops, g.newline_mask) == (w.hash, w.size, w.token_ids,
                                                                               w.num_crops, w.newline_mask)


@pytest.mark.parametrize("url, error", [("data:image/png;base64,@@@", InvalidRequestError),
                                        ("data:image/png;base64," + "A" * (12 * 2**20), PayloadTooLargeError)])
def test_worker_errors_reach_the_caller(pools, url, error):
    procs, _ = pools
    with pytest.raises(error) as info:
        asyncio.run(procs.prepare(url, "messages[0].content[0]"))
    assert info.value.param == "messages[0].content[0]"


def test_workers_ship_the_view_not_the_crops(monkeypatch):
    # The crops are cut on the model's device, so what a worker sends back is about the decoded image's size:
    # 2.7 MB for 1280x720 (its six crops were another 4.6 MB).
    monkeypatch.setattr(prep_pool, "_PROCESSOR", ImageProcessor(IDS))
    out = prep_pool._prepare_in_worker(data_url(1280, 720, 3), LIMITS, None)
    assert out.num_crops == 6
    assert len(pickle.dumps(out)) < 1.01 * 1280 * 720 * 3


def test_cache_key_is_of_the_encoded_bytes(pools):
    # Equal bytes decode to equal pixels, so keying by the bytes keeps "equal keys mean equal pixels" while hashing
    # a JPEG's ~4x fewer bytes. The same picture in another encoding gets another key: a cache miss, not an error.
    procs, threads = pools
    img = Image.fromarray(np.random.default_rng(4).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    png, webp = io.BytesIO(), io.BytesIO()
    img.save(png, format="PNG")
    img.save(webp, format="WEBP", lossless=True)
    png_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()

    async def prepare(pool, *sources):
        return await asyncio.gather(*(pool.prepare(s, None) for s in sources))

    a, b, c = asyncio.run(prepare(procs, png_url, png.getvalue(), webp.getvalue()))
    assert a.hash == b.hash == encoded_key(png.getvalue()) != c.hash
    assert torch.equal(a.view, c.view)
    # A PIL image (the offline API) has no bytes: its pixels are hashed, whatever pool prepares it.
    pixel_key = ImageProcessor(IDS)(img).hash
    assert [o.hash for o in asyncio.run(prepare(threads, img)) + asyncio.run(prepare(procs, img))] == [pixel_key] * 2
    assert not pixel_key.startswith("encoded:")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mapped_by_a_30_mib_buffer() -> int:
    """Bytes glibc maps afresh (rather than serving from its heap) for a 30 MiB buffer."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    before = libc.mallinfo2().hblkhd
    buffer = bytearray(30 << 20)  # held while measuring: freed, a mapped buffer would be unmapped again
    mapped = libc.mallinfo2().hblkhd - before
    del buffer
    return mapped


def test_workers_serve_image_buffers_from_freed_memory(pools):
    # glibc's default maps large allocations afresh and unmaps them when freed, so each image paid page faults and
    # the kernel's zeroing for its buffers (measured: ~2600 faults per 1280x720 JPEG in a fresh worker). The
    # workers raise its thresholds: buffers up to 32 MiB come from, and go back to, the heap.
    procs, _ = pools
    assert procs._executor.submit(_mapped_by_a_30_mib_buffer).result() == 0
