"""The benchmark's HTTP side: OpenAI request bodies, and one streamed request timed chunk by chunk.

Requests go out through aiohttp, as SGLang's bench_serving sends them: measured on the lent GPU host, httpx's
async client added ~34 ms to the TTFT of a seed request (1.9 MB of images in the body) where aiohttp adds ~8
and a bare socket ~7 (`benchmarks/ttft_gap.py --client`), so the benchmark timed its own client, not the server.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from typing import Any

import aiohttp
import httpx

from stepserve.bench.metrics import RequestRecord

CHAT_BACKENDS = ("sglang-oai-chat", "vllm-chat", "openai-chat", "lmdeploy-chat")
COMPLETION_BACKENDS = ("sglang-oai", "vllm", "openai", "lmdeploy")


def resolve_base_url(host: str, port: int, base_url: str | None) -> str:
    return base_url.rstrip("/") if base_url else f"http://{host}:{port}"


def api_url(backend: str, base_url: str) -> str:
    if backend in CHAT_BACKENDS:
        return f"{base_url}/v1/chat/completions"
    if backend in COMPLETION_BACKENDS:
        return f"{base_url}/v1/completions"
    raise ValueError(f"unknown backend {backend!r}; choose from {CHAT_BACKENDS + COMPLETION_BACKENDS}")


def auth_headers() -> dict[str, str]:
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def make_async_client() -> aiohttp.ClientSession:
    # No pool limit: a capped pool would queue requests client-side and inflate TTFT at high concurrency.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=auth_headers(),
                                 timeout=aiohttp.ClientTimeout(total=6 * 3600), read_bufsize=1 << 20)


def fetch_model_id(base_url: str) -> str | None:
    """The first model the server lists, for runs that do not name one."""
    try:
        resp = httpx.get(f"{base_url}/v1/models", headers=auth_headers(), timeout=10.0)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return None


def fetch_model_path(base_url: str) -> str | None:
    """The tokenizer (else model) path the server reports at /get_model_info, None if it does not say."""
    try:
        resp = httpx.get(f"{base_url}/get_model_info", headers=auth_headers(), timeout=10.0)
        resp.raise_for_status()
        info = resp.json()
        return info.get("tokenizer_path") or info.get("model_path")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def build_payload(chat: bool, model: str, prompt: str, image_data: list[str], output_len: int, stream: bool,
                  ignore_eos: bool, extra: dict[str, Any]) -> dict[str, Any]:
    """The request body bench_serving sends; `extra` (--extra-request-body) overrides any default."""
    if chat:
        if image_data:
            content: Any = [{"type": "image_url", "image_url": {"url": url}} for url in image_data]
            content.append({"type": "text", "text": prompt})
        else:
            content = prompt
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    else:
        body = {"model": model, "prompt": prompt}
    body.update({"temperature": 0.0, "max_tokens": output_len, "stream": stream, "ignore_eos": ignore_eos})
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(extra)
    return body


def _chunk_text(data: dict[str, Any], chat: bool) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""
    if not chat:
        return choices[0].get("text") or ""
    part = choices[0].get("delta") or choices[0].get("message") or {}
    # Reasoning models stream their thoughts first; they are output tokens too (as in current SGLang).
    return (part.get("reasoning_content") or "") + (part.get("content") or "")


async def send_request(client: aiohttp.ClientSession, url: str, payload: dict[str, Any], chat: bool,
                       default_output_len: int) -> RequestRecord:
    """POST one request and record its timing; never raises (failures come back with `error` set).

    `prompt_len` is the server's `usage.prompt_tokens` (0 if not reported); `output_len` its
    `usage.completion_tokens`, else `default_output_len`.
    """
    rec = RequestRecord(output_len=default_output_len)
    text: list[str] = []
    start = rec.start_time = time.perf_counter()
    last = start
    try:
        async with client.post(url, json=payload) as resp:
            if resp.status != 200:
                body = (await resp.read()).decode(errors="replace")
                rec.error = f"HTTP {resp.status}: {body}"
                return rec
            if not payload.get("stream"):
                data = json.loads(await resp.read())
                rec.latency = rec.ttft = time.perf_counter() - start
                _take_usage(rec, data)
                rec.generated_text = _chunk_text(data, chat)
                rec.success = True
                return rec
            async for raw_line in resp.content:
                line = raw_line.decode().strip()
                if not line:
                    continue
                now = time.perf_counter()
                rec.latency = now - start
                if not line.startswith("data:"):
                    continue
                raw = line[5:].strip()
                if raw == "[DONE]":
                    continue
                data = json.loads(raw)
                if "error" in data:
                    rec.error = json.dumps(data["error"])
                    return rec
                _take_usage(rec, data)
                piece = _chunk_text(data, chat)
                if piece:
                    if text:
                        rec.itl.append(now - last)
                    else:
                        rec.ttft = now - start
                    last = now
                    text.append(piece)
        rec.generated_text = "".join(text)
        rec.success = True
    except Exception:  # noqa: BLE001 - a benchmark records every failure instead of dying on it
        rec.error = traceback.format_exc()
    return rec


def _take_usage(rec: RequestRecord, data: dict[str, Any]) -> None:
    usage = data.get("usage") or {}
    if usage.get("completion_tokens") is not None:
        rec.output_len = int(usage["completion_tokens"])
    if usage.get("prompt_tokens"):
        rec.prompt_len = int(usage["prompt_tokens"])
