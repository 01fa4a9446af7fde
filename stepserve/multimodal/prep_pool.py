"""Image decoding and preprocessing in worker processes, off the server process's GIL.

base64 and PIL's PNG decoder hold the GIL: in threads, two images of one request decode one after the other
(~40 ms each for a 1280x720 PNG on the lent GPU host), and while they do, the engine thread cannot launch the
next GPU step. Worker processes decode in parallel and leave the server process free; only the global view's
uint8 pixels come back (the decoded image itself for most sizes: 2.7 MB for 1280x720; the crops are cut on the
model's device), as a numpy array pickled by value. http(s) images are still fetched
by the event loop; the workers get their bytes.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import io
import multiprocessing
import os
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from PIL import Image

from stepserve.multimodal.image_io import ImageSource, fetch_image_bytes, is_http_url, load_image, load_image_and_bytes
from stepserve.multimodal.processor import ImageInput, ImageProcessor, ImageTokenIds, encoded_key


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    fetch_timeout: float
    allowed_local_path: str | None


def default_workers(has_gpu: bool) -> int:
    """Processes for image preparation when the user does not say: none on a CPU-only host (the model's own
    work needs the cores), else enough for a few images in parallel while leaving cores to the server."""
    return min(4, (os.cpu_count() or 1) // 2) if has_gpu else 0


_PROCESSOR: ImageProcessor | None = None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_MiB = 1 << 20


def _init_worker(token_ids: ImageTokenIds) -> None:
    global _PROCESSOR
    torch.set_num_threads(1)  # one image per process; several processes already use the cores
    _reuse_freed_memory()
    _PROCESSOR = ImageProcessor(token_ids)


def _reuse_freed_memory() -> None:
    """Let glibc serve an image's buffers from the memory the previous image freed.

    By default glibc maps each allocation above a threshold afresh and returns freed memory to the OS, so every
    image paid page faults and the kernel's zeroing for its encoded bytes, decoded pixels and pickled result:
    ~3 ms of the seed request's (two 1280x720 JPEGs) 27 ms on a 2-core CPU. A worker now keeps up to 64 MiB of
    freed memory; allocations over 32 MiB (glibc's largest threshold) are still mapped and returned."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its allocator decides
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 32 * _MiB)
    libc.mallopt(_M_TRIM_THRESHOLD, 64 * _MiB)


def _warm_worker() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (1280, 720), (90, 120, 150)).save(buf, format="PNG")
    _PROCESSOR(load_image(buf.getvalue()))
    time.sleep(0.05)  # stay busy a moment, so each of the start-up's tasks lands on a different worker


def _load_and_process(processor: ImageProcessor, source: ImageSource, limits: ImageLimits,
                      param: str | None) -> ImageInput:
    image, data = load_image_and_bytes(source, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels,
                                       allowed_local_path=limits.allowed_local_path, param=param)
    return processor(image, encoded_key(data) if data is not None else None)


def _prepare_in_worker(source: ImageSource, limits: ImageLimits, param: str | None) -> ImageInput:
    out = _load_and_process(_PROCESSOR, source, limits, param)
    # numpy pickles by value; torch tensors would travel through shared-memory file descriptors instead.
    return dataclasses.replace(out, view=out.view.numpy())


class ImagePrepPool:
    """`prepare(source, param)` -> ImageInput, in `workers` processes (0: a thread pool in this process)."""

    def __init__(self, processor: ImageProcessor, limits: ImageLimits, workers: int):
        self.processor, self.limits, self.workers = processor, limits, workers
        self._executor: Executor
        if workers > 0:
            # spawn, not fork: the server process holds CUDA state and threads that a fork would copy half-made.
            self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init_worker, initargs=(processor.ids,))
        else:
            self._executor = ThreadPoolExecutor(4, thread_name_prefix="stepserve-image")

    def start(self) -> None:
        """Start every worker now (each imports torch: seconds) and run one image through each, so the first
        requests do not pay a worker's first PNG decode and torch CPU ops (lazy library and thread-pool set-up)."""
        if self.workers > 0:
            for f in [self._executor.submit(_warm_worker) for _ in range(self.workers)]:
                f.result()

    async def prepare(self, source: ImageSource, param: str | None) -> ImageInput:
        lim = self.limits
        if isinstance(source, str) and is_http_url(source):
            source = await fetch_image_bytes(source, lim.max_bytes, lim.fetch_timeout, param)
        loop = asyncio.get_running_loop()
        if self.workers == 0:
            return await loop.run_in_executor(self._executor, _load_and_process, self.processor, source, lim, param)
        out = await loop.run_in_executor(self._executor, _prepare_in_worker, source, lim, param)
        return dataclasses.replace(out, view=torch.from_numpy(out.view))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


