"""The real server (`stepserve serve`, tiny random-weight model on CPU) end to end: the seed's section-4 calls
through the `openai` client, invariants of real engine output, every request error, concurrency with
disconnects, /metrics, and `python -m stepserve.launch_server` with the seed's flags and Ctrl-C.

The weights are random, so the tests check shapes and invariants, never the words.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import io
import json
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from real_server import LAUNCH_SERVER, SEED_MODEL, RealServer, free_port
from stepserve import loader
from stepserve.api.chat import render_chat
from stepserve.multimodal.processor import ImageProcessor, ImageTokenIds
from stepserve.testing import tiny_checkpoint

# name -> (width, height, format); the seed's URLs, served locally
IMAGES = {"receipt.png": (600, 900, "PNG"), "taxi.jpg": (800, 533, "JPEG"), "taxis-1280x600.jpg": (1280, 600, "JPEG"),
          "wide.png": (1200, 1000, "PNG"),        # over the strict server's pixel limit, small in bytes
          "plain.jpg": (990, 990, "JPEG"),        # under both limits, 504 prompt tokens
          "small.jpg": (320, 240, "JPEG"),
          "noise.png": (400, 400, "PNG"),         # random pixels: over its byte limit
          "metrics.png": (640, 480, "PNG")}       # sent by test_metrics_after_traffic only: a cold image there
SLOW_SECONDS = 3.0
# Seeds whose sampled outputs (temperature 1.0, top_k off, 128 tokens) contain `</think>` / `<tool_call>` with
# the tiny checkpoint; `find_seed` tries them first and searches on if a change to the weights or the sampler
# moved them (about 1 request in 20 has the tag).
THINK_SEED = 15
TOOL_TAG_SEED = 3
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a location",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"}},
        "required": ["location"]}}}]


def image_bytes(name: str) -> bytes:
    w, h, fmt = IMAGES[name]
    rng = np.random.default_rng(len(name))
    if name in ("wide.png", "plain.jpg"):
        pixels = np.zeros((h, w, 3), np.uint8)
    else:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def data_url(name: str) -> str:
    mime = "image/png" if name.endswith(".png") else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(image_bytes(name)).decode()


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def __init__(self, files: dict[str, bytes], *args, **kwargs):
        self.files = files
        super().__init__(*args, **kwargs)

    def do_GET(self):  # noqa: N802 - http.server's name
        name = self.path.lstrip("/")
        if name == "slow.png":
            time.sleep(SLOW_SECONDS)
            name = "receipt.png"
        if name not in self.files:
            self.send_error(404)
            return
        body = self.files[name]
        self.send_response(200)
        self.send_header("Content-Type", "image/png" if name.endswith("png") else "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    """An http.server with the seed's images (and a slow one): base URL."""
    files = {name: image_bytes(name) for name in IMAGES}
    files["not-an-image.png"] = b"<html>this is not an image</html>"
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_ImageHandler, files))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def tok():
    return loader.load_tokenizer(tiny_checkpoint())


def expected_prompt_tokens(tok, messages: list[dict], image_sizes: list[tuple[int, int]], tools=None) -> int:
    """Text tokens of the rendered chat (one placeholder per image) with each placeholder replaced by the
    image's token count from the processor's closed form."""
    template = loader.load_chat_template(tiny_checkpoint())
    prompt, sources = render_chat(messages, tok, template, tools)
    assert len(sources) == len(image_sizes)
    processor = ImageProcessor(ImageTokenIds.from_tokenizer(tok))
    return (len(tok.encode(prompt, add_special_tokens=False)) - len(image_sizes)
            + sum(processor.num_image_tokens(w, h) for w, h in image_sizes))


def metrics(server: RealServer) -> dict[str, float]:
    """/metrics as {series name with sorted labels: value}."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(server.base_url + "/metrics").text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_idle_and_full(server: RealServer, timeout: float = 15) -> dict[str, float]:
    """Metrics once nothing runs or waits and every KV page is free again (fails after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        idle = m["stepserve_num_running_reqs"] == 0 and m["stepserve_num_waiting_reqs"] == 0
        if idle and m["stepserve_num_kv_pages_free"] == m["stepserve_num_kv_pages_total"]:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle with a full KV pool after {timeout}s: {m}")
        time.sleep(0.1)


def check_usage(usage, prompt_tokens: int, max_tokens: int | None = None) -> None:
    assert usage.prompt_tokens == prompt_tokens
    assert usage.completion_tokens >= 1 and (max_tokens is None or usage.completion_tokens <= max_tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


# --- the seed's section 4, unchanged but for the base URL and where the images live ---------------------
def test_seed_one_image(real_server, image_host, tok, capsys):
    client = OpenAI(api_key="EMPTY", base_url=f"{real_server.base_url}/v1", timeout=3600)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"{image_host}/receipt.png"}},
        {"type": "text", "text": "Read all the text in the image."}]}]
    start = time.time()
    response = client.chat.completions.create(
        model="stepfun-ai/Step3-VL-10B",
        messages=messages,
        max_tokens=2048,
        extra_body={"top_k": -1}
    )
    print(f"Response costs: {time.time() - start:.2f}s")
    print(f"Generated text: {response.choices[0].message.content}")

    out = capsys.readouterr().out
    assert out.startswith("Response costs: ") and "Generated text: " in out
    assert response.id.startswith("chatcmpl-") and len(response.id) > len("chatcmpl-")
    assert response.model == SEED_MODEL and len(response.choices) == 1
    choice = response.choices[0]
    assert choice.index == 0 and choice.finish_reason in ("stop", "length")
    assert choice.message.role == "assistant" and not choice.message.tool_calls
    check_usage(response.usage, expected_prompt_tokens(tok, messages, [IMAGES["receipt.png"][:2]]), 2048)
    assert choice.finish_reason == "stop" or response.usage.completion_tokens == 2048


def test_seed_two_images(real_server, image_host, tok):
    client = OpenAI(api_key="EMPTY", base_url=f"{real_server.base_url}/v1", timeout=3600)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"{image_host}/taxi.jpg"}},
        {"type": "image_url", "image_url": {"url": f"{image_host}/taxis-1280x600.jpg"}},
        {"type": "text", "text": "Compare these two images and describe the differences in 100 words or less."}]}]
    response = client.chat.completions.create(
        model="stepfun-ai/Step3-VL-10B",
        messages=messages,
        max_tokens=2048,
        extra_body={"top_k": -1}
    )
    sizes = [IMAGES["taxi.jpg"][:2], IMAGES["taxis-1280x600.jpg"][:2]]
    check_usage(response.usage, expected_prompt_tokens(tok, messages, sizes), 2048)
    assert response.choices[0].finish_reason in ("stop", "length")


def test_seed_streaming_with_thinking(real_server, capsys):
    client = OpenAI(base_url=f"{real_server.base_url}/v1", api_key="EMPTY")
    response = client.chat.completions.create(
        model="stepfun-ai/Step3-VL-10B",
        messages=[
            {"role": "user", "content": "Solve this problem step by step: What is 15% of 240?"}
        ],
        temperature=0.7,
        max_tokens=2048,
        stream=True,
        extra_body={"top_k": -1}
    )
    has_thinking = False
    has_answer = False
    thinking_started = False
    for chunk in response:
        if chunk.choices and len(chunk.choices) > 0:
            delta = chunk.choices[0].delta
            if hasattr(delta, 'reasoning_content') and delta.reasoning_content:
                if not thinking_started:
                    print("=============== Thinking =================", flush=True)
                    thinking_started = True
                has_thinking = True
                print(delta.reasoning_content, end="", flush=True)
            if delta.content:
                if has_thinking and not has_answer:
                    print("\n=============== Content =================", flush=True)
                    has_answer = True
                print(delta.content, end="", flush=True)
    print()

    out = capsys.readouterr().out
    # the template opens <think>, so a random model's text is reasoning until it happens to sample </think>
    assert has_thinking and out.startswith("=============== Thinking =================\n")
    assert out.count("=============== Content =================") == int(has_answer)


def test_seed_tool_calling_stream(real_server, capsys):
    client = OpenAI(base_url=f"{real_server.base_url}/v1", api_key="EMPTY")
    tools = TOOLS
    response = client.chat.completions.create(
        model="stepfun-ai/Step3-VL-10B",
        messages=[
            {"role": "user", "content": "What's the weather in Beijing?"}
        ],
        tools=tools,
        temperature=0.7,
        stream=True,
        extra_body={"top_k": -1}
    )
    thinking_started = False
    has_thinking = False
    tool_calls_accumulator = {}
    finish_reasons = []
    for chunk in response:
        if chunk.choices and len(chunk.choices) > 0:
            delta = chunk.choices[0].delta
            finish_reasons.append(chunk.choices[0].finish_reason)  # (not in the seed: for the checks below)
            if hasattr(delta, 'reasoning_content') and delta.reasoning_content:
                if not thinking_started:
                    print("=============== Thinking =================", flush=True)
                    thinking_started = True
                has_thinking = True
                print(delta.reasoning_content, end="", flush=True)
            if hasattr(delta, 'tool_calls') and delta.tool_calls:
                if has_thinking and thinking_started:
                    print("\n=============== Content =================\n", flush=True)
                    thinking_started = False
                for tool_call in delta.tool_calls:
                    index = tool_call.index
                    if index not in tool_calls_accumulator:
                        tool_calls_accumulator[index] = {
                            'name': None,
                            'arguments': ''
                        }
                    if tool_call.function:
                        if tool_call.function.name:
                            tool_calls_accumulator[index]['name'] = tool_call.function.name
                        if tool_call.function.arguments:
                            tool_calls_accumulator[index]['arguments'] += tool_call.function.arguments
            if delta.content:
                print(delta.content, end="", flush=True)
    for index, tool_call in sorted(tool_calls_accumulator.items()):
        print(f"Tool Call: {tool_call['name']}")
        print(f"   Arguments: {tool_call['arguments']}")
    print()

    finals = [f for f in finish_reasons if f is not None]
    assert len(finals) == 1 and finish_reasons[-1] == finals[0]
    # a random model almost never writes a valid call; whatever it did write must be consistent
    assert finals[0] == ("tool_calls" if tool_calls_accumulator else "stop") or finals[0] == "length"
    for call in tool_calls_accumulator.values():
        assert call["name"] == "get_weather" and isinstance(json.loads(call["arguments"]), dict)
    assert capsys.readouterr().out.startswith("=============== Thinking =================\n")


def test_seed_tool_result_turn(real_server, tok):
    client = OpenAI(base_url=f"{real_server.base_url}/v1", api_key="EMPTY")

    def get_weather(location, unit="celsius"):
        return f"The weather in {location} is 22°{unit[0].upper()} and sunny."

    messages = [
        {"role": "user", "content": "What's the weather in Beijing?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{
                "id": "call_123",
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": '{"location": "Beijing", "unit": "celsius"}'
                }
            }]
        },
        {
            "role": "tool",
            "tool_call_id": "call_123",
            "content": get_weather("Beijing", "celsius")
        }
    ]
    final_response = client.chat.completions.create(
        model="stepfun-ai/Step3-VL-10B",
        messages=messages,
        temperature=0.7,
        extra_body={"top_k": -1}
    )
    print(final_response.choices[0].message.content)

    prompt, _ = render_chat(messages, tok, loader.load_chat_template(tiny_checkpoint()))
    assert "<tool_call>" in prompt and "22°C and sunny" in prompt  # the call and its result reach the model
    check_usage(final_response.usage, expected_prompt_tokens(tok, messages, []))
    assert final_response.choices[0].finish_reason in ("stop", "length")


# --- invariants of real engine output --------------------------------------------------------------
def stream_chat(base_url: str, body: dict) -> tuple[dict, list[dict]]:
    """POST a streaming chat request: ({"reasoning", "content", "finish", "usage", "calls"}, raw chunks)."""
    chunks = []
    with httpx.stream("POST", base_url + "/v1/chat/completions", json={**body, "stream": True,
                      "stream_options": {"include_usage": True}}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    out = {"reasoning": "", "content": "", "finish": None, "usage": chunks[-1]["usage"], "calls": {}, "kinds": []}
    assert chunks[-1]["choices"] == [] and len({c["id"] for c in chunks}) == 1
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        delta = choice["delta"]
        out["kinds"] += [k for k in ("reasoning_content", "content", "tool_calls") if delta.get(k)]
        out["reasoning"] += delta.get("reasoning_content") or ""
        out["content"] += delta.get("content") or ""
        for call in delta.get("tool_calls") or []:
            acc = out["calls"].setdefault(call["index"], {"name": None, "arguments": ""})
            acc["name"] = call["function"].get("name") or acc["name"]
            acc["arguments"] += call["function"].get("arguments") or ""
        if choice["finish_reason"] is not None:
            assert out["finish"] is None
            out["finish"] = choice["finish_reason"]
    return out, chunks


def chat(base_url: str, body: dict) -> dict:
    r = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7}],
                         ids=["greedy", "seeded"])
def test_stream_equals_non_stream(real_server, sampling):
    """Same request streamed and not: the deltas concatenate to the one-shot text (U+FFFD from invalid byte
    sequences included: the random model samples lone UTF-8 bytes), with the same usage and finish."""
    body = {"model": SEED_MODEL, "max_tokens": 48, **sampling, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url("taxi.jpg")}}, {"type": "text", "text": "Describe."}]}]}
    one = chat(real_server.base_url, body)
    streamed, chunks = stream_chat(real_server.base_url, body)
    msg = one["choices"][0]["message"]
    assert streamed["reasoning"] == (msg["reasoning_content"] or "")
    assert streamed["content"] == (msg["content"] or "")
    assert streamed["finish"] == one["choices"][0]["finish_reason"]
    assert streamed["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert streamed["usage"]["completion_tokens"] == one["usage"]["completion_tokens"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    if "seed" in sampling:  # lone UTF-8 bytes were sampled: U+FFFD, the same in both (see the docstring)
        assert "\ufffd" in streamed["reasoning"] + streamed["content"]


def find_seed(base_url: str, body: dict, tag: str, first: int, tries: int = 80) -> tuple[dict, str]:
    """(body with a seed, raw output) for a seed whose output, unparsed, contains `tag`."""
    for seed in [first, *(s for s in range(tries) if s != first)]:
        seeded = {**body, "seed": seed}
        msg = chat(base_url, {**seeded, "separate_reasoning": False})["choices"][0]["message"]
        assert msg["reasoning_content"] is None and msg["tool_calls"] is None
        if tag in (msg["content"] or ""):
            return seeded, msg["content"]
    raise AssertionError(f"no seed in {tries} sampled {tag}")


def test_reasoning_split_on_real_output(real_server):
    """A sampled output that contains </think>: reasoning before it, content after, streamed in that order."""
    body = {"model": SEED_MODEL, "max_tokens": 128, "temperature": 1.0, "top_k": -1,
            "messages": [{"role": "user", "content": "Solve this problem step by step: What is 15% of 240?"}]}
    body, text = find_seed(real_server.base_url, body, "</think>", THINK_SEED)
    reasoning, content = text.removeprefix("<think>").split("</think>", 1)
    content = content.lstrip("\r\n")

    msg = chat(real_server.base_url, body)["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == (reasoning or None, content or None)
    streamed, _ = stream_chat(real_server.base_url, body)
    assert (streamed["reasoning"], streamed["content"]) == (reasoning, content)
    kinds = streamed["kinds"]
    assert kinds == sorted(kinds, key=["reasoning_content", "content"].index)


def test_tool_parser_on_real_output(real_server):
    """A sampled output with a stray `<tool_call>` (no valid call after it): streamed and not, it stays
    content, nothing is lost or invented, and the finish is not tool_calls."""
    body = {"model": SEED_MODEL, "max_tokens": 128, "temperature": 1.0, "top_k": -1, "tools": TOOLS,
            "messages": [{"role": "user", "content": "What's the weather in Beijing?"}]}
    body, text = find_seed(real_server.base_url, body, "<tool_call>", TOOL_TAG_SEED)
    body["separate_reasoning"] = False
    one = chat(real_server.base_url, body)
    msg = one["choices"][0]["message"]
    assert msg["content"] == text and msg["tool_calls"] is None
    assert one["choices"][0]["finish_reason"] in ("stop", "length")
    streamed, _ = stream_chat(real_server.base_url, body)
    assert streamed["content"] == msg["content"] and streamed["calls"] == {} and streamed["reasoning"] == ""
    assert streamed["finish"] == one["choices"][0]["finish_reason"]


def test_completions_and_models(real_server):
    models = httpx.get(real_server.base_url + "/v1/models").json()
    assert models["data"][0]["id"] == SEED_MODEL
    body = {"model": SEED_MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    r = httpx.post(real_server.base_url + "/v1/completions", json=body, timeout=60).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 8
    with httpx.stream("POST", real_server.base_url + "/v1/completions", json={**body, "stream": True}) as s:
        texts = [json.loads(x[6:])["choices"][0]["text"] for x in s.iter_lines()
                 if x.startswith("data: {")]
    assert "".join(texts) == r["choices"][0]["text"]


def test_logit_bias_forces_and_bans_tokens(real_server):
    """OpenAI's logit_bias (token id strings -> added to the logits): +100 makes a token certain at temperature
    0, -100 keeps it out even then."""
    body = {"model": SEED_MODEL, "prompt": [11, 12, 13], "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "logprobs": 0}

    def tokens(**extra) -> list[str]:
        r = httpx.post(real_server.base_url + "/v1/completions", json={**body, **extra}, timeout=60).json()
        return r["choices"][0]["logprobs"]["tokens"]

    plain = tokens()
    forced = tokens(logit_bias={"42": 100})
    assert len(set(forced)) == 1 and forced[0] not in plain
    assert forced[0] not in tokens(logit_bias={"42": -100, "43": -100, "44": -100})
    assert tokens(logit_bias={"42": -100, "43": 100})[0] not in (forced[0], plain[0])


# --- load: concurrent streams, some clients leaving ------------------------------------------------
def test_concurrent_streams_with_disconnects(real_server):
    """50 streams at once; 10 clients hang up after a few chunks. The other 40 complete in full, the 10 are
    aborted (nothing keeps running), and every KV page is free again."""
    total, leaving, max_tokens = 50, 10, 24

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, int]:
        leaves = i % (total // leaving) == 0
        body = {"model": SEED_MODEL, "stream": True, "ignore_eos": True, "temperature": 0.8, "seed": i,
                "max_tokens": 3000 if leaves else max_tokens, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": f"Request {i}: count to {i * 7}."}]}
        finish, chunks = None, 0
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunks += 1
                if leaves and chunks == 3:
                    return "left", 0
                event = json.loads(line[6:])
                if event["choices"] and event["choices"][0]["finish_reason"]:
                    finish = event["choices"][0]["finish_reason"]
                if event.get("usage"):
                    return finish, event["usage"]["completion_tokens"]
        return finish, -1

    async def run():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=real_server.base_url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(total)))

    before = metrics(real_server)
    results = asyncio.run(run())
    assert results.count(("left", 0)) == leaving
    assert [r for r in results if r[0] != "left"] == [("length", max_tokens)] * (total - leaving)
    after = wait_idle_and_full(real_server)
    assert after["stepserve_num_kv_pages_total"] > 0 and after["stepserve_kv_cache_usage"] == 0
    ok = 'stepserve_requests_total{route=/v1/chat/completions,status=200}'
    assert after[ok] - before.get(ok, 0) == total
    # the aborted ones stopped early: far fewer tokens than their 3000 each were generated
    generated = after["stepserve_generation_tokens_total"] - before["stepserve_generation_tokens_total"]
    assert (total - leaving) * max_tokens <= generated < (total - leaving) * max_tokens + leaving * 500


# --- /metrics -------------------------------------------------------------------------------------------
def test_metrics_after_traffic(real_server):
    before = metrics(real_server)
    body = {"model": SEED_MODEL, "max_tokens": 5, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url("metrics.png")}},
        {"type": "text", "text": "What does this receipt say? Please read it carefully, line by line."}]}]}
    # The same request twice (the second reuses the first's prompt pages), then the image after other text: its rows
    # sit at other positions, so no prefix is shared but the vision embeddings come from the encoder cache.
    moved = {**body, "messages": [{"role": "user", "content": [{"type": "text", "text": "Look closely."},
                                                               *body["messages"][0]["content"]]}]}
    usages = [chat(real_server.base_url, b)["usage"] for b in (body, body, moved)]
    assert httpx.post(real_server.base_url + "/v1/chat/completions", json={"messages": []}).status_code == 400
    m = metrics(real_server)

    def delta(name):
        return m.get(name, 0) - before.get(name, 0)

    route = "route=/v1/chat/completions"
    assert delta(f"stepserve_requests_total{{{route},status=200}}") == 3
    assert delta(f"stepserve_requests_total{{{route},status=400}}") == 1
    assert delta("stepserve_num_encoded_images") == 1 and m["stepserve_num_preemptions"] >= 0
    assert delta("stepserve_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("stepserve_generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    for hist in ("request_prepare_seconds", "time_to_first_token_seconds", "time_per_output_token_seconds",
                 "e2e_request_latency_seconds", "request_queue_seconds", "request_first_token_engine_seconds"):
        assert delta(f"stepserve_{hist}_count") == 3
        assert 0 < delta(f"stepserve_{hist}_sum") < 60
        assert m[f"stepserve_{hist}_bucket{{le=+Inf}}"] == m[f"stepserve_{hist}_count"]
    # the second request reused the first one's prompt pages and vision embeddings
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] > 0
    # preparing a request (image decoding included) is part of its time to first token
    assert delta("stepserve_request_prepare_seconds_sum") < delta("stepserve_time_to_first_token_seconds_sum")
    # arrival -> engine -> scheduled -> first token: the parts fit inside the time to first token
    parts = ("request_prepare_seconds", "request_queue_seconds", "request_first_token_engine_seconds")
    assert sum(delta(f"stepserve_{p}_sum") for p in parts) < delta("stepserve_time_to_first_token_seconds_sum")
    assert 0 < m["stepserve_prefix_cache_hit_rate"] <= 1 and 0 < m["stepserve_image_cache_hit_rate"] <= 1
    assert m["stepserve_num_running_reqs"] == 0 and m["stepserve_num_waiting_reqs"] == 0
    assert 0 <= m["stepserve_kv_cache_usage"] <= 1
    assert m["stepserve_num_kv_pages_free"] <= m["stepserve_num_kv_pages_total"]


# --- errors (a server with an API key, a small context and tight limits) --------------------------------
API_KEY = "sk-e2e-secret"
STRICT_CONTEXT = 1024


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    server = RealServer(["--api-key", API_KEY, "--context-length", str(STRICT_CONTEXT),
                         "--served-model-name", SEED_MODEL, "--max-running-requests", "1", "--max-queued-requests", "1",
                         "--max-image-pixels", "1000000", "--max-image-bytes", "300000",
                         "--image-fetch-timeout", "1", "--reasoning-parser", "deepseek-r1",
                         "--tool-call-parser", "hermes"], tmp_path_factory.mktemp("strict") / "serve.log")
    yield server
    server.stop()


AUTH = {"Authorization": f"Bearer {API_KEY}"}


def user(content, **kw) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


def with_image(url: str) -> dict:
    return user([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}])


def _bad_base64() -> str:
    return "data:image/png;base64,iVBORw0KGgo%%%not-base64"


def _not_image() -> str:
    return "data:image/png;base64," + base64.b64encode(b"GIF89a? no, just text").decode()


ERROR_CASES = {
    # name: (body (dict, or bytes sent raw), status, param, words the message must contain)
    "malformed_json": (b'{"messages": [', 400, None, "not valid JSON"),
    "body_not_object": (b'[1, 2]', 400, None, "JSON object"),
    "missing_messages": ({"max_tokens": 4}, 400, "messages", "messages"),
    "empty_messages": ({"messages": []}, 400, "messages", "non-empty"),
    "unknown_role": ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "wizard"),
    "missing_content": ({"messages": [{"role": "user"}]}, 400, "messages[0].content", "content"),
    "unknown_content_type": (user([{"type": "video_url", "video_url": {"url": "x"}}]), 400,
                             "messages[0].content[0].type", "video_url"),
    "broken_base64": (lambda host: with_image(_bad_base64()), 400, "messages[0].content[0].image_url.url",
                      "base64"),
    "not_an_image_data_url": (lambda host: with_image(_not_image()), 400,
                              "messages[0].content[0].image_url.url", "cannot decode image"),
    "not_an_image_url": (lambda host: with_image(f"{host}/not-an-image.png"), 400,
                         "messages[0].content[0].image_url.url", "cannot decode image"),
    "too_many_pixels": (lambda host: with_image(f"{host}/wide.png"), 413,
                        "messages[0].content[0].image_url.url", "1200x1000"),
    "too_many_bytes_url": (lambda host: with_image(f"{host}/noise.png"), 413,
                           "messages[0].content[0].image_url.url", "300000-byte limit"),
    "too_many_bytes_data_url": (lambda host: with_image(data_url("noise.png")), 413,
                                "messages[0].content[0].image_url.url", "300000-byte limit"),
    "unreachable_url": (lambda host: with_image(f"http://127.0.0.1:{free_port()}/x.png"), 400,
                        "messages[0].content[0].image_url.url", "cannot fetch"),
    "missing_url": (lambda host: with_image(f"{host}/missing.png"), 400,
                    "messages[0].content[0].image_url.url", "HTTP 404"),
    "slow_url": (lambda host: with_image(f"{host}/slow.png"), 400, "messages[0].content[0].image_url.url",
                 "timed out"),
    "prompt_over_context": (user("word " * (2 * STRICT_CONTEXT)), 400, "messages", "context"),
    "image_prompt_over_context": (lambda host: user(
        [{"type": "image_url", "image_url": {"url": f"{host}/plain.jpg"}}] * 3), 400, "messages", "context"),
    "max_tokens_zero": (user("hi", max_tokens=0), 400, "max_tokens", ">= 1"),
    "max_tokens_negative": (user("hi", max_tokens=-5), 400, "max_tokens", "max_tokens"),
    "max_tokens_over_context": (user("hi", max_tokens=STRICT_CONTEXT), 400, "max_tokens", "context length"),
    "max_completion_tokens_over_context": (user("hi", max_completion_tokens=10 ** 6), 400,
                                           "max_completion_tokens", "context length"),
    "temperature_high": (user("hi", temperature=2.5), 400, "temperature", "temperature"),
    "temperature_negative": (user("hi", temperature=-0.1), 400, "temperature", "temperature"),
    "top_p_zero": (user("hi", top_p=0), 400, "top_p", "top_p"),
    "top_p_high": (user("hi", top_p=1.5), 400, "top_p", "top_p"),
    "temperature_not_number": (user("hi", temperature="hot"), 400, "temperature", "temperature"),
    "tool_without_name": (user("hi", tools=[{"type": "function", "function": {"parameters": {}}}]), 400,
                          "tools[0].function.name", "name"),
    "tool_parameters_not_object": (user("hi", tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "array"}}}]), 400, "tools[0].function.parameters", "object"),
    "tool_properties_not_object": (user("hi", tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": "location"}}}]), 400,
        "tools[0].function.parameters.properties", "properties"),
    "tool_property_type_unknown": (user("hi", tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "text"}}}}}]), 400,
        "tools[0].function.parameters.properties.x.type", "text"),
    "tool_required_not_list": (user("hi", tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {}, "required": "x"}}}]), 400,
        "tools[0].function.parameters.required", "required"),
    "tool_choice_unknown": (user("hi", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "g"}}),
                            400, "tool_choice.function.name", "'g'"),
    "unknown_model": (user("hi", model="gpt-4o"), 404, "model", "gpt-4o"),
    "logit_bias_not_a_token": (user("hi", logit_bias={"10000000": 5}), 400, "logit_bias", "10000000"),
    "logit_bias_too_large": (user("hi", logit_bias={"5": 500}), 400, "logit_bias", "[-100, 100]"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_request_errors(strict_server, image_host, case):
    body, status, param, words = ERROR_CASES[case]
    body = body(image_host) if callable(body) else body
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(strict_server.base_url + "/v1/chat/completions", headers={**AUTH, "content-type":
                   "application/json"}, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["param"] == param and words in err["message"], err
    if case == "slow_url":
        assert r.elapsed.total_seconds() < SLOW_SECONDS


def test_api_key(strict_server):
    url = strict_server.base_url + "/v1/chat/completions"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(url, json=user("hi"), headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(strict_server.base_url + "/v1/models").status_code == 401
    assert httpx.get(strict_server.base_url + "/health").status_code == 200        # probes need no key
    assert httpx.get(strict_server.base_url + "/metrics").status_code == 200
    client = OpenAI(api_key=API_KEY, base_url=strict_server.base_url + "/v1")
    assert client.chat.completions.create(model=SEED_MODEL, messages=user("hi")["messages"], max_tokens=2) \
        .usage.completion_tokens >= 1
    assert httpx.get(strict_server.base_url + "/v1/nothing-here", headers=AUTH).status_code == 404


def test_queue_full_is_503_and_recovers(strict_server):
    """One running, one waiting (--max-running-requests 1 --max-queued-requests 1): the next is refused with
    503; when the clients go away both are aborted and the server serves again with a full KV pool."""
    long = {**user("Tell me a very long story."), "max_tokens": 900, "ignore_eos": True, "stream": True}

    async def run():
        async with httpx.AsyncClient(base_url=strict_server.base_url, headers=AUTH, timeout=60) as client:
            async with client.stream("POST", "/v1/chat/completions", json=long) as running:
                lines = running.aiter_lines()
                while not (await anext(lines)).startswith("data: {"):
                    pass

                async def queued():
                    async with client.stream("POST", "/v1/chat/completions", json=long) as r:
                        await r.aread()

                waiting = asyncio.create_task(queued())
                deadline = time.monotonic() + 10
                while metrics(strict_server)["stepserve_num_waiting_reqs"] < 1:
                    assert time.monotonic() < deadline, "the second request never queued"
                    await asyncio.sleep(0.05)
                refused = await client.post("/v1/chat/completions", json=user("hi"))
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
                return refused

    refused = asyncio.run(run())
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["type"] == "ServiceUnavailableError" and "waiting" in \
        refused.json()["error"]["message"]
    wait_idle_and_full(strict_server)
    r = httpx.post(strict_server.base_url + "/v1/chat/completions", json=user("hi"), headers=AUTH, timeout=30)
    assert r.status_code == 200


def test_serves_after_errors(strict_server, image_host):
    r = httpx.post(strict_server.base_url + "/v1/chat/completions", headers=AUTH, timeout=60,
                   json={**with_image(f"{image_host}/small.jpg"), "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert "Traceback" not in strict_server.log()


# --- the seed's launch command ----------------------------------------------------------------------------
def test_launch_server_seed_flags_and_ctrl_c(tmp_path, tiny_model_dir):
    """`python -m stepserve.launch_server` with the seed's flags serves the seed's model name; Ctrl-C with a
    stream in flight ends that stream (finish_reason abort) and exits with 0, promptly, without a traceback."""
    server = RealServer(["--model", str(tiny_model_dir), "--reasoning-parser", "deepseek-r1",
                         "--tool-call-parser", "hermes", "--host", "0.0.0.0", "--trust-remote-code",
                         "--context-length", "32768", "--served-model-name", SEED_MODEL],
                        tmp_path / "launch.log", entry=LAUNCH_SERVER)
    try:
        client = OpenAI(api_key="EMPTY", base_url=f"{server.base_url}/v1", timeout=3600)
        r = client.chat.completions.create(model="stepfun-ai/Step3-VL-10B", max_tokens=4,
                                           messages=[{"role": "user", "content": "hi"}], extra_body={"top_k": -1})
        assert r.usage.completion_tokens >= 1
        positions = json.loads((tiny_model_dir / "config.json").read_text())["text_config"]["max_position_embeddings"]
        assert httpx.get(server.base_url + "/v1/models").json()["data"][0]["max_model_len"] == min(32768, positions)
        stream = client.chat.completions.create(model=SEED_MODEL, max_tokens=4000, stream=True,
                                                messages=[{"role": "user", "content": "go on"}],
                                                extra_body={"ignore_eos": True})
        next(iter(stream))
        start = time.monotonic()
        rc = server.stop(signal.SIGINT, timeout=20)
        took = time.monotonic() - start
        finishes = [c.choices[0].finish_reason for c in stream if c.choices]  # what was sent before the exit
    finally:
        server.stop(signal.SIGKILL)
    assert finishes[-1] == "abort" and finishes.count("abort") == 1
    log = server.log()
    assert rc == 0 and "Traceback" not in log, log[-3000:]
    assert took < 8, f"Ctrl-C took {took:.1f}s"
