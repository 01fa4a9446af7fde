"""The HTTP layer against a scripted engine: routes, streaming, parsers, errors, auth, 503, disconnects,
and the seed's section-4 calls through the real `openai` client on a real uvicorn server."""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import io
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from stepserve.api.server import build_app
from stepserve.config import ServerArgs
from stepserve.multimodal.image_io import load_image
from tests.fake_engine import IMAGE_TOKENS, FakeEngine, tiny_tokenizer

MODEL = "stepfun-ai/Step3-VL-10B"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a location",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["location"]}}}]
TOOL_REPLY = ('The user asks about Beijing.\n</think>\n\n<tool_calls>\n<tool_call>\n'
              '{"name": "get_weather", "arguments": {"location": "Beijing"}}\n</tool_call>\n</tool_calls>')


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_client(tok, reply=None, token_delay=0.0, **server_kw):
    args = ServerArgs(model=MODEL, reasoning_parser="deepseek-r1", tool_call_parser="hermes", **server_kw)
    engine = FakeEngine(tok, reply=reply, token_delay=token_delay)
    return TestClient(build_app(args, engine)), engine


def png_data_url(size=(8, 6)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def events(resp) -> list:
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def user(text):
    return [{"role": "user", "content": text}]


# --- plain routes -----------------------------------------------------------------------------------
def test_info_routes(tok):
    client, engine = make_client(tok)
    with client:
        assert engine.started
        assert client.get("/health").status_code == 200
        models = client.get("/v1/models").json()
        assert models["data"][0]["id"] == "stepserve-tiny" and models["data"][0]["max_model_len"] == 512
        info = client.get("/get_model_info").json()
        assert info["model_path"] == MODEL and info["is_generation"]
        assert client.get("/health_generate").status_code == 200
        assert engine.requests[-1]["params"].max_tokens == 1
    assert engine.stopped


def test_metrics(tok):
    client, _ = make_client(tok)
    with client:
        client.post("/v1/chat/completions", json={"messages": user("hi")})
        client.post("/v1/chat/completions", json={"messages": []})
        text = client.get("/metrics").text
    assert 'stepserve_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'stepserve_requests_total{route="/v1/chat/completions",status="400"} 1.0' in text
    assert "stepserve_time_to_first_token_seconds_count 1.0" in text
    assert "stepserve_request_prepare_seconds_count 1.0" in text  # the 400 never reached the engine
    assert "stepserve_e2e_request_latency_seconds_count 1.0" in text
    assert "stepserve_kv_cache_usage 0.25" in text and "stepserve_image_cache_hit_rate 0.75" in text
    assert "stepserve_generation_tokens_total" in text and "stepserve_num_waiting_reqs 0.0" in text


# --- chat completions --------------------------------------------------------------------------------
def test_chat_non_streaming_splits_reasoning(tok):
    client, engine = make_client(tok)
    with client:
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": user("hi"), "max_tokens": 100,
                                                      "top_k": -1, "some_new_openai_field": True})
    assert r.status_code == 200, r.text
    body = r.json()
    msg = body["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": "Hello there!", "reasoning_content": "Thinking about it.\n",
                   "tool_calls": None}
    assert body["choices"][0]["finish_reason"] == "stop" and body["model"] == MODEL
    req = engine.requests[0]
    assert body["usage"]["prompt_tokens"] == len(req["ids"])
    assert body["usage"]["completion_tokens"] == len(tok.encode(engine.reply("", None)))
    assert req["prompt"].endswith("<|im_start|>assistant\n<think>\n") and req["params"].top_k == -1


def test_chat_streaming_order_and_usage(tok):
    client, _ = make_client(tok)
    with client, client.stream("POST", "/v1/chat/completions", json={
            "messages": user("hi"), "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        ev = events(r)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-2]]
    kinds = [next(iter(d)) for d in deltas]
    assert kinds == sorted(kinds, key=["reasoning_content", "content"].index)  # reasoning first, then content
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Thinking about it.\n"
    assert "".join(d.get("content", "") for d in deltas) == "Hello there!"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert len({c["id"] for c in chunks}) == 1


def test_separate_reasoning_off_and_thinking_off(tok):
    client, _ = make_client(tok, reply=lambda p, s: "a</think>b")
    with client:
        off = client.post("/v1/chat/completions", json={"messages": user("x"), "separate_reasoning": False}).json()
        assert off["choices"][0]["message"]["content"] == "a</think>b"
        client2, _ = make_client(tok, reply=lambda p, s: "plain answer")
        with client2:
            r = client2.post("/v1/chat/completions", json={
                "messages": user("x"), "chat_template_kwargs": {"enable_thinking": False}}).json()
    assert r["choices"][0]["message"]["content"] == "plain answer"
    assert r["choices"][0]["message"]["reasoning_content"] is None


def test_length_n_and_logprobs(tok):
    client, _ = make_client(tok)
    with client:
        r = client.post("/v1/chat/completions", json={"messages": user("x"), "max_tokens": 3, "n": 2,
                                                      "logprobs": True, "top_logprobs": 2}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    for c in r["choices"]:
        assert c["finish_reason"] == "length"
        lps = c["logprobs"]["content"]
        assert len(lps) == 3 and [x["logprob"] for x in lps] == [-0.5, -1.0, -1.5]
        assert len(lps[0]["top_logprobs"]) == 2 and lps[0]["bytes"] == list(lps[0]["token"].encode())
    assert r["usage"]["completion_tokens"] == 6


def test_streaming_n2_logprobs(tok):
    client, _ = make_client(tok)
    with client, client.stream("POST", "/v1/chat/completions", json={
            "messages": user("x"), "stream": True, "n": 2, "logprobs": True}) as r:
        chunks = events(r)[:-1]
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant" and mine[-1]["finish_reason"] == "stop"
        text = "".join(c["delta"].get("reasoning_content", "") + c["delta"].get("content", "") for c in mine)
        assert text == f"Thinking about it.\nHello there! #{i}"
        assert sum(len(c["logprobs"]["content"]) for c in mine if c.get("logprobs")) == \
            len(tok.encode(f"Thinking about it.\n</think>\n\nHello there! #{i}"))


def test_tool_calls_non_streaming_and_streaming(tok):
    client, _ = make_client(tok, reply=lambda p, s: TOOL_REPLY)
    with client:
        r = client.post("/v1/chat/completions", json={"messages": user("Weather in Beijing?"), "tools": TOOLS}).json()
        choice = r["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] is None
        assert choice["message"]["reasoning_content"] == "The user asks about Beijing.\n"
        call = choice["message"]["tool_calls"][0]
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert call["function"] == {"name": "get_weather", "arguments": '{"location": "Beijing"}'}
        with client.stream("POST", "/v1/chat/completions", json={
                "messages": user("Weather?"), "tools": TOOLS, "stream": True}) as s:
            chunks = events(s)[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(tc["function"].get("arguments", "") for tc in calls) == '{"location": "Beijing"}'
    assert "".join(d.get("content", "") for d in deltas) == ""
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_none_named_and_required(tok):
    client, engine = make_client(tok, reply=lambda p, s: TOOL_REPLY)
    other = [{"type": "function", "function": {"name": "search"}}]
    with client:
        none = client.post("/v1/chat/completions", json={"messages": user("x"), "tools": TOOLS,
                                                         "tool_choice": "none"}).json()
        assert "<tool_call>" in none["choices"][0]["message"]["content"]
        assert "get_weather" not in engine.requests[-1]["prompt"]  # tools not shown to the model either
        named = client.post("/v1/chat/completions", json={
            "messages": user("x"), "tools": TOOLS + other,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}).json()
        assert named["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
        assert '"search"' not in engine.requests[-1]["prompt"]
        wrong = client.post("/v1/chat/completions", json={
            "messages": user("x"), "tools": TOOLS + other,
            "tool_choice": {"type": "function", "function": {"name": "search"}}})
        assert wrong.status_code == 500 and wrong.json()["error"]["param"] == "tool_choice"
        assert client.post("/v1/chat/completions", json={
            "messages": user("x"), "tools": TOOLS, "tool_choice": "required"}).status_code == 200


def test_images_count_in_prompt_tokens(tok):
    client, engine = make_client(tok)
    content = [{"type": "image_url", "image_url": {"url": png_data_url()}},
               {"type": "image_url", "image_url": {"url": png_data_url((5, 5))}},
               {"type": "text", "text": "Compare these two images."}]
    with client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]}).json()
    req = engine.requests[-1]
    assert [im.size for im in req["images"]] == [(8, 6), (5, 5)]
    text_ids = tok.encode(req["prompt"], add_special_tokens=False)
    assert r["usage"]["prompt_tokens"] == len(text_ids) - 2 + 2 * IMAGE_TOKENS == len(req["ids"])


def test_text_is_tokenized_while_images_are_prepared(tok, monkeypatch):
    client, engine = make_client(tok)
    serving = client.app.state.serving
    tokenized = threading.Event()
    tokenize = serving._tokenize

    def tokenize_and_tell(prompt):
        ids = tokenize(prompt)
        tokenized.set()
        return ids

    async def prepare(source, param):
        # Done only once the text is tokenized: if tokenization waited for the images, this would time out.
        if not await asyncio.to_thread(tokenized.wait, 5):
            raise RuntimeError("the text was not tokenized while the image was prepared")
        return engine.image_processor(load_image(source))

    monkeypatch.setattr(serving, "_tokenize", tokenize_and_tell)
    monkeypatch.setattr(serving.images, "prepare", prepare)
    content = [{"type": "image_url", "image_url": {"url": png_data_url()}}, {"type": "text", "text": "What is it?"}]
    with client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(engine.requests[-1]["ids"])


# --- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b'[1]', 400, None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                        {"type": "audio"}]}]},
     400, "messages[0].content[1].type"),
    ("/v1/chat/completions", {"messages": user("x"), "temperature": 9}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": user("x"), "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": user("x"), "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": user("word " * 600)}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}]}]}, 400,
     "messages[0].content[0].image_url.url"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url((3000, 3000))}}]}]}, 413,
     "messages[0].content[0].image_url.url"),
    ("/v1/completions", {"prompt": [10 ** 9]}, 400, "prompt"),
    ("/v1/nothing", {}, 404, None),
])
def test_error_bodies(tok, path, body, status, param):
    client, _ = make_client(tok, max_image_pixels=1000 * 1000)
    with client:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = client.post(path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    assert err["param"] == param


def test_stream_errors_before_first_token_are_http_errors(tok):
    client, _ = make_client(tok)
    with client:
        r = client.post("/v1/chat/completions", json={"messages": user("word " * 600), "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_api_key(tok):
    client, _ = make_client(tok, api_key="sekret")
    with client:
        assert client.post("/v1/chat/completions", json={"messages": user("x")}).status_code == 401
        bad = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "AuthenticationError"
        ok = client.post("/v1/chat/completions", json={"messages": user("x")},
                         headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def test_queue_full_is_503(tok):
    client, engine = make_client(tok, max_queued_requests=2)
    engine.waiting = 2
    with client:
        r = client.post("/v1/chat/completions", json={"messages": user("x")})
        assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
        engine.waiting = 1
        assert client.post("/v1/chat/completions", json={"messages": user("x")}).status_code == 200


# --- /v1/completions ----------------------------------------------------------------------------------
def test_completions(tok):
    client, engine = make_client(tok, reply=lambda p, s: " world and more")
    with client:
        r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 50, "echo": True,
                                                 "logprobs": 1}).json()
        assert r["object"] == "text_completion" and r["choices"][0]["text"] == "hello world and more"
        lp = r["choices"][0]["logprobs"]
        assert lp["text_offset"][0] == len("hello") and len(lp["tokens"]) == r["usage"]["completion_tokens"]
        ids = tok.encode("hello", add_special_tokens=False)
        r2 = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 2}).json()
        assert engine.requests[-1]["ids"] == ids and r2["choices"][0]["finish_reason"] == "length"
        with client.stream("POST", "/v1/completions", json={"prompt": "hello", "stream": True,
                                                            "stream_options": {"include_usage": True}}) as s:
            ev = events(s)
    assert ev[-1] == "[DONE]" and ev[-2]["usage"]["completion_tokens"] > 0
    assert "".join(c["choices"][0]["text"] for c in ev[:-2]) == " world and more"


# --- a real server: disconnects and the openai client ------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(tok):
    servers = []

    def start(reply=None, token_delay=0.0, **kw):
        port = free_port()
        args = ServerArgs(model=MODEL, port=port, reasoning_parser="deepseek-r1", tool_call_parser="hermes", **kw)
        engine = FakeEngine(tok, reply=reply, token_delay=token_delay, context_length=32768)
        server = uvicorn.Server(uvicorn.Config(build_app(args, engine), host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}", engine

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def wait_for(cond, timeout=5.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_client_disconnect_aborts(live_server):
    long_reply = lambda p, s: "word " * 400  # noqa: E731
    url, engine = live_server(reply=long_reply, token_delay=0.01)
    with httpx.Client(base_url=url) as c:
        with c.stream("POST", "/v1/chat/completions", json={"messages": user("x"), "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 5:
                    break
        assert wait_for(lambda: len(engine.aborted) == 1)
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/chat/completions", json={"messages": user("x")}, timeout=0.3)
        assert wait_for(lambda: len(engine.aborted) == 2)
    assert not engine.finished


@pytest.fixture
def image_host(tmp_path):
    Image.new("RGB", (32, 24), (0, 128, 255)).save(tmp_path / "receipt.png")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "taxi.jpg")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_seed_section_4_with_openai_client(live_server, image_host):
    from openai import OpenAI

    def reply(prompt, params):
        return TOOL_REPLY if "get_weather" in prompt and "tool_response" not in prompt else \
            "Let me think.\n</think>\n\nThe answer is 36."

    url, engine = live_server(reply=reply)
    client = OpenAI(api_key="EMPTY", base_url=url + "/v1", timeout=3600)

    # 4.2.1: one image + text, then two images + text
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_host + "/receipt.png"}},
                                             {"type": "text", "text": "Read all the text in the image."}]}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2048,
                                              extra_body={"top_k": -1})
    assert response.choices[0].message.content == "The answer is 36."
    assert engine.requests[-1]["images"][0].size == (32, 24)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_host + "/taxi.jpg"}},
        {"type": "image_url", "image_url": {"url": png_data_url()}},
        {"type": "text", "text": "Compare these two images and describe the differences in 100 words or less."}]}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2048,
                                              extra_body={"top_k": -1})
    assert response.choices[0].message.content and len(engine.requests[-1]["images"]) == 2
    assert response.usage.prompt_tokens == len(engine.requests[-1]["ids"])

    # 4.2.2: streaming with reasoning
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Solve this problem step by step: What is 15% of 240?"}],
        temperature=0.7, max_tokens=2048, stream=True, extra_body={"top_k": -1})
    thinking, answer = "", ""
    for chunk in stream:
        if chunk.choices and len(chunk.choices) > 0:
            delta = chunk.choices[0].delta
            if hasattr(delta, "reasoning_content") and delta.reasoning_content:
                assert not answer  # reasoning comes first
                thinking += delta.reasoning_content
            if delta.content:
                answer += delta.content
    assert (thinking, answer) == ("Let me think.\n", "The answer is 36.")
    assert engine.requests[-1]["params"].temperature == 0.7

    # 4.2.3: tools, streamed, accumulated by index
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What's the weather in Beijing?"}], tools=TOOLS,
        temperature=0.7, stream=True, extra_body={"top_k": -1})
    acc: dict[int, dict] = {}
    for chunk in response:
        if chunk.choices and len(chunk.choices) > 0:
            delta = chunk.choices[0].delta
            for tool_call in getattr(delta, "tool_calls", None) or []:
                entry = acc.setdefault(tool_call.index, {"name": None, "arguments": ""})
                if tool_call.function:
                    if tool_call.function.name:
                        entry["name"] = tool_call.function.name
                    if tool_call.function.arguments:
                        entry["arguments"] += tool_call.function.arguments
    assert acc == {0: {"name": "get_weather", "arguments": '{"location": "Beijing"}'}}

    # the second turn with the tool result
    messages = [
        {"role": "user", "content": "What's the weather in Beijing?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_123", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"location": "Beijing", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_123", "content": "The weather in Beijing is 22°C and sunny."},
    ]
    final_response = client.chat.completions.create(model=MODEL, messages=messages, temperature=0.7,
                                                    extra_body={"top_k": -1})
    assert final_response.choices[0].message.content == "The answer is 36."
    assert "The weather in Beijing is 22°C and sunny." in engine.requests[-1]["prompt"]

    # errors come back as the openai client's exceptions
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=10 ** 6)
    assert e.value.body["param"] == "max_tokens"
