"""A tiny OpenAI-compatible server for the benchmark tests: streams SSE chat/completion chunks with controlled
timing and a final usage chunk, counts prompt tokens like a VLM server (text tokens + a fixed count per image),
and answers with a pluggable `reply` function (MMMU tests)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 200


def make_tiny_tokenizer(path: str) -> None:
    """A whitespace word-level tokenizer ("w0".."w199") saved where AutoTokenizer can load it."""
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(VOCAB_SIZE)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def _text_and_images(body: dict[str, Any]) -> tuple[str, int]:
    if "prompt" in body:
        return body["prompt"], 0
    texts, images = [], 0
    for msg in body["messages"]:
        content = msg["content"]
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content:
            if part["type"] == "text":
                texts.append(part["text"])
            else:
                images += 1
    return " ".join(texts), images


class FakeOpenAIServer:
    def __init__(self, vision_tokens_per_image: int = 670, ttft_s: float = 0.0, itl_s: float = 0.0,
                 reasoning_chunks: int = 0, eos_after: int = 6, model: str = "stepfun-ai/Step3-VL-10B",
                 reply: Callable[[dict[str, Any]], str] | None = None,
                 on_request: Callable[[int], None] | None = None):
        self.vision_tokens_per_image = vision_tokens_per_image
        self.ttft_s, self.itl_s = ttft_s, itl_s
        self.reasoning_chunks = reasoning_chunks
        self.eos_after = eos_after
        self.model = model
        self.reply = reply
        self.on_request = on_request
        self.requests: list[dict[str, Any]] = []
        self.app = self._make_app()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> "FakeOpenAIServer":
        self._thread.start()
        deadline = time.time() + 10
        while not self._server.started:
            if time.time() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        text, images = _text_and_images(body)
        return len(text.split()) + images * self.vision_tokens_per_image

    def _output_words(self, body: dict[str, Any]) -> list[str]:
        if self.reply is not None:
            return [w + " " for w in self.reply(body).split(" ")]
        n = body.get("max_tokens") or 16
        if not body.get("ignore_eos", False):
            n = min(n, self.eos_after)
        return [f"w{(i * 7) % VOCAB_SIZE} " for i in range(n)]

    def _make_app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models_() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.model, "object": "model"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self._answer(await request.json(), chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._answer(await request.json(), chat=False)

        return app

    async def _answer(self, body: dict[str, Any], chat: bool):
        self.requests.append(body)
        if self.on_request is not None:
            self.on_request(len(self.requests))
        if body.get("model") != self.model:
            return JSONResponse({"error": {"message": "unknown model", "code": 404}}, status_code=404)
        words = self._output_words(body)
        usage = {"prompt_tokens": self.prompt_tokens(body), "completion_tokens": len(words),
                 "total_tokens": self.prompt_tokens(body) + len(words)}
        if not body.get("stream"):
            await asyncio.sleep(self.ttft_s + self.itl_s * max(0, len(words) - 1))
            text = "".join(words).strip()
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                      if chat else {"index": 0, "text": text, "finish_reason": "stop"})
            return {"id": "x", "object": "chat.completion", "choices": [choice], "usage": usage}
        return StreamingResponse(self._stream(words, usage, chat), media_type="text/event-stream")

    async def _stream(self, words: list[str], usage: dict[str, int], chat: bool):
        def event(obj: dict[str, Any]) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        if chat:
            yield event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        await asyncio.sleep(self.ttft_s)
        for i, word in enumerate(words):
            if i:
                await asyncio.sleep(self.itl_s)
            if not chat:
                yield event({"choices": [{"index": 0, "text": word}]})
            elif i < self.reasoning_chunks:
                yield event({"choices": [{"index": 0, "delta": {"reasoning_content": word}}]})
            else:
                yield event({"choices": [{"index": 0, "delta": {"content": word}}]})
        yield event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]} if chat
                    else {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        yield event({"choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
