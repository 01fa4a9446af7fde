"""How much of a streamed request's TTFT, as the benchmark client sees it, the server sees: seed requests sent
one at a time, each timed by the bench client and by the server's own histograms (read from /metrics around it).

    python benchmarks/ttft_gap.py --port 30000 --tokenizer DIR [--model NAME] [--requests 8] [--client bench|raw]

Per request: client TTFT (bench_serving's timer: before the body is serialized -> first content chunk), server
TTFT (arrival -> first output), their gap, and the server's prepare / engine-first-token parts.
"""

import argparse
import asyncio
import json
import re
import time

import httpx
import numpy as np

from stepserve.bench.client import build_payload, make_async_client, send_request
from stepserve.bench.datasets import sample_image_requests
from stepserve.loader import load_tokenizer

HISTOGRAMS = ("time_to_first_token_seconds", "request_prepare_seconds", "request_first_token_engine_seconds")


async def raw_ttft(port: int, payload: dict) -> float | None:
    """The same request over a bare asyncio socket (TCP_NODELAY, one write): seconds to the first content chunk.
    Reads to the end, so the server has recorded the request when we look."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.perf_counter()
    body = json.dumps(payload).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    writer.write(head + body)
    await writer.drain()
    ttft = None
    try:
        while line := await reader.readline():
            if ttft is None and line.startswith(b"data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    ttft = time.perf_counter() - start
    finally:
        writer.close()
    return ttft


def sums(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    return {h: float(re.search(rf"^stepserve_{h}_sum (\S+)$", text, re.M).group(1)) for h in HISTOGRAMS}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="of the random images (a new seed: nothing cached)")
    ap.add_argument("--output-len", type=int, default=2)
    ap.add_argument("--client", default="bench", choices=["bench", "raw"],
                    help="bench: the serving benchmark's client (aiohttp, as SGLang's); raw: a bare socket")
    args = ap.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    model = args.model or httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
    reqs = sample_image_requests(load_tokenizer(args.tokenizer), args.requests + 1, 2, 128, 1, 1.0, "720p", "jpeg",
                                 "random", args.seed)
    rows = []
    async with make_async_client() as client:
        for i, r in enumerate(reqs):
            payload = build_payload(True, model, r.prompt, r.image_data, args.output_len, True, True, {})
            t = time.perf_counter()
            size = len(json.dumps(payload))
            dumps_ms = (time.perf_counter() - t) * 1e3
            before = sums(base)
            if args.client == "raw":
                ttft = await raw_ttft(args.port, payload)
            else:
                ttft = (await send_request(client, f"{base}/v1/chat/completions", payload, True, args.output_len)).ttft
            after = sums(base)
            d = {h: (after[h] - before[h]) * 1e3 for h in HISTOGRAMS}
            row = {"client_ttft": ttft * 1e3, "server_ttft": d["time_to_first_token_seconds"],
                   "prepare": d["request_prepare_seconds"], "engine": d["request_first_token_engine_seconds"],
                   "json_dumps": dumps_ms, "body_mb": size / 1e6}
            row["gap"] = row["client_ttft"] - row["server_ttft"]
            print(json.dumps({k: round(v, 1) for k, v in row.items()}))
            if i:  # the first warms the connection and the server's paths
                rows.append(row)
    print("median", json.dumps({k: round(float(np.median([r[k] for r in rows])), 1) for k in rows[0]}))


if __name__ == "__main__":
    asyncio.run(main())
