"""Where a request's preparation time goes (HTTP arrival -> engine), for the seed latency request, on CPU.

    python benchmarks/prepare_path.py [--runs 20] [--workers 2 0] [--format jpeg]

The seed request: 2 random 1280x720 images as data URLs (`stepserve bench serving --dataset-name image
--image-resolution 720p --image-count 2`) + ~128 text tokens, max_tokens 1.

Server: the real app around the tiny built-in model, under uvicorn in this process, once per `--workers`
value (`--image-workers`); the client is another process (as bench_serving is), sending one request at a
time. Each request's `stepserve_request_prepare_seconds` is the histogram sum's increase, and timers wrapped around the server's own steps split it: `read` (the body
read), `parse` (the rest of arrival to the route's parsed request: JSON, pydantic), `template`, `images`
(fetch, decode, preprocess, back from the workers), `tokenize` (and placeholder expansion; since the text is
tokenized while the images are prepared, only its part outside `images` counts towards the sum), `other`
(prepare minus the serial phases).

One image, in this process: the same steps one by one (base64, decode, cache key, processor), then a 1-worker
pool's `prepare` of the same URL, whose excess over those steps is the process hop (arguments out, pixels back).
Every figure is the median over `--runs` after one warm-up, in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing
import statistics
import threading
import time
from collections import defaultdict

import httpx
import uvicorn
from starlette.requests import Request

from stepserve.api import serving as serving_module
from stepserve.api.server import build_app
from stepserve.bench.client import build_payload
from stepserve.bench.datasets import sample_image_requests
from stepserve.config import ServerArgs
from stepserve.engine.engine import AsyncEngine
from stepserve.loader import load_tokenizer
from stepserve.multimodal.image_io import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, _decode, _parse_data_url
from stepserve.multimodal.prep_pool import ImageLimits, ImagePrepPool
from stepserve.multimodal.processor import encoded_key
from stepserve.testing import tiny_checkpoint

PHASES = ("prepare", "read", "parse", "template", "images", "tokenize", "other")
PREPARE_SUM = "stepserve_request_prepare_seconds_sum"


def seed_payloads(tokenizer, n: int, image_format: str, seed: int) -> list[dict]:
    """`n` seed-shaped chat requests, each with fresh random images (no cache can serve a repeat)."""
    reqs = sample_image_requests(tokenizer, n, 2, 128, 1, 1.0, "720p", image_format, "random", seed)
    return [build_payload(True, "stepserve-tiny", r.prompt, r.image_data, 1, True, True, {}) for r in reqs]


def send_requests(url: str, n: int, image_format: str, seed: int) -> None:
    """The client process: `n` seed requests, one at a time."""
    payloads = seed_payloads(load_tokenizer(tiny_checkpoint()), n, image_format, seed)
    with httpx.Client(base_url=url, timeout=120) as client:
        for payload in payloads:
            time.sleep(0.2)  # let the last request's engine work (and its spinning CPU threads) settle
            client.post("/v1/chat/completions", json=payload).raise_for_status()


class PhaseTimer:
    """Wraps the serving steps of a request, collects their wall times (ms) in `last` and, when the request
    reaches the engine, appends them to `rows` with the prepare histogram's increase."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.last: dict[str, float] = defaultdict(float)
        self.spans: dict[str, tuple[float, float]] = {}
        self.read = 0.0

    def _record(self, name: str, start: float) -> None:
        end = time.monotonic()
        self.last[name] += (end - start) * 1e3
        self.spans[name] = (start, end)

    def serial_ms(self) -> float:
        """The phases' total, counting only tokenization's part outside the image preparation."""
        tokenize = self.last["tokenize"]
        if "images" in self.spans and "tokenize" in self.spans:
            (i0, i1), (t0, t1) = self.spans["images"], self.spans["tokenize"]
            tokenize -= max(0.0, min(i1, t1) - max(i0, t0)) * 1e3
        return sum(self.last[k] for k in ("read", "parse", "template", "images")) + tokenize

    def install(self) -> None:
        timer, S, G = self, serving_module.Serving, serving_module._Generation
        chat, prepare_images, in_pool, body = S.chat, S._prepare_images, S._in_pool, Request.body
        generation = G.__init__

        @functools.wraps(generation)
        def timed_generation(self, serving, *a):
            registry = serving.metrics.registry
            before = registry.get_sample_value(PREPARE_SUM) or 0.0
            generation(self, serving, *a)  # observes the prepare histogram
            prepare = (registry.get_sample_value(PREPARE_SUM) - before) * 1e3
            timer.rows.append(dict(timer.last, prepare=prepare, other=prepare - timer.serial_ms()))

        @functools.wraps(body)
        async def timed_body(self):
            start = time.monotonic()
            try:
                return await body(self)
            finally:
                timer.read = (time.monotonic() - start) * 1e3

        @functools.wraps(chat)
        async def timed_chat(self, req, request, t0):
            arrived = (time.monotonic() - t0) * 1e3
            timer.last = defaultdict(float, read=timer.read, parse=arrived - timer.read)
            timer.spans = {}
            return await chat(self, req, request, t0)

        @functools.wraps(prepare_images)
        async def timed_images(self, *a):
            start = time.monotonic()
            try:
                return await prepare_images(self, *a)
            finally:
                timer._record("images", start)

        @functools.wraps(in_pool)
        async def timed_pool(self, fn, *a):
            start = time.monotonic()
            try:
                return await in_pool(self, fn, *a)
            finally:
                timer._record("template" if getattr(fn, "__name__", "") == "render_chat" else "tokenize", start)

        S.chat, S._prepare_images, S._in_pool, Request.body = timed_chat, timed_images, timed_pool, timed_body
        G.__init__ = timed_generation


def serve(args: ServerArgs) -> tuple[uvicorn.Server, threading.Thread, str]:
    """The app on a free port (port 0: the OS picks), in a thread; returns the server, its thread and URL."""
    app = build_app(args, AsyncEngine.from_config(args.engine_config()))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    return server, thread, f"http://{host}:{port}"


def server_phases(workers: int, runs: int, image_format: str, timer: PhaseTimer) -> dict[str, float]:
    server, thread, url = serve(ServerArgs(image_workers=workers))
    try:
        timer.rows.clear()
        client = multiprocessing.get_context("spawn").Process(target=send_requests,
                                                              args=(url, runs + 1, image_format, workers))
        client.start()
        client.join()
        if client.exitcode != 0:
            raise RuntimeError(f"the client failed with exit code {client.exitcode}")
        rows = timer.rows[1:]  # the first request is a warm-up
        return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in PHASES}
    finally:
        server.should_exit = True
        thread.join(30)


def image_parts(runs: int, image_format: str) -> dict[str, float]:
    args = ServerArgs()
    engine = AsyncEngine.from_config(args.engine_config())
    url = seed_payloads(engine.tokenizer, 1, image_format, seed=7)[0]["messages"][0]["content"][0]["image_url"]["url"]
    limits = ImageLimits(DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, 10.0, None)
    pool = ImagePrepPool(engine.image_processor, limits, workers=1)
    pool.start()
    rows = []
    try:
        for i in range(runs + 1):
            t = {}
            start = time.perf_counter()
            data = _parse_data_url(url, DEFAULT_MAX_BYTES, None)
            t["base64"] = time.perf_counter() - start
            mark = time.perf_counter()
            image = _decode(data, DEFAULT_MAX_PIXELS, None)
            t["decode"] = time.perf_counter() - mark
            mark = time.perf_counter()
            key = encoded_key(data)
            t["cache_key"] = time.perf_counter() - mark
            mark = time.perf_counter()
            engine.image_processor(image, key)
            t["processor"] = time.perf_counter() - mark
            mark = time.perf_counter()
            asyncio.run(pool.prepare(url, None))
            t["pool_1_worker"] = time.perf_counter() - mark
            t["process_hop"] = t["pool_1_worker"] - sum(t[k] for k in ("base64", "decode", "cache_key", "processor"))
            if i:
                rows.append(t)
    finally:
        pool.shutdown()
    return {k: statistics.median(r[k] for r in rows) * 1e3 for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 0], help="--image-workers values to serve with")
    ap.add_argument("--format", default="jpeg", choices=["jpeg", "png"])
    args = ap.parse_args()
    timer = PhaseTimer()
    timer.install()
    print(f"server, median of {args.runs} seed requests (ms)")
    print(f"{'image-workers':>14}" + "".join(f"{p:>10}" for p in PHASES))
    for workers in args.workers:
        med = server_phases(workers, args.runs, args.format, timer)
        print(f"{workers:>14}" + "".join(f"{med[p]:>10.1f}" for p in PHASES), flush=True)
    parts = image_parts(args.runs, args.format)
    print(f"\none 1280x720 {args.format} image, median of {args.runs} (ms)")
    print("".join(f"{k:>15}" for k in parts))
    print("".join(f"{v:>15.1f}" for v in parts.values()))


if __name__ == "__main__":
    main()
