"""A scripted stand-in for `AsyncEngine` (same interface), to test the HTTP layer without a model.

It uses the tiny checkpoint's real tokenizer and chat template, streams a scripted reply token by token
(text deltas from incremental decoding, like a real detokenizer), honours max_tokens, n, logprobs and
abort, and reports settable stats.
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Callable

from transformers import AutoTokenizer

from stepserve.engine.outputs import CompletionOutput, Logprob, RequestOutput
from stepserve.engine.sampling_params import SamplingParams
from stepserve.errors import InvalidRequestError

IMAGE_TOKENS = 5  # tokens each fake image expands to


def tiny_tokenizer():
    from stepserve.testing import tiny_checkpoint

    return AutoTokenizer.from_pretrained(str(tiny_checkpoint()))


class FakeEngine:
    def __init__(self, tokenizer, reply: Callable[[str, SamplingParams], str] | None = None,
                 context_length: int = 512, token_delay: float = 0.0):
        self.tokenizer = tokenizer
        self.chat_template = None
        self.image_token_id = tokenizer.convert_tokens_to_ids("<im_patch>")
        self.context_length = context_length
        self.model_name = "stepserve-tiny"
        self.reply = reply or (lambda prompt, params: "Thinking about it.\n</think>\n\nHello there!")
        self.token_delay = token_delay
        self.waiting = 0
        self.started = self.stopped = False
        self.aborted: set[str] = set()
        self.finished: set[str] = set()
        self.requests: list[dict] = []
        self._lock = threading.Lock()

    def image_processor(self, image, key: str | None = None) -> SimpleNamespace:
        return SimpleNamespace(size=image.size, token_ids=[self.image_token_id] * IMAGE_TOKENS)

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.stopped = True

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.aborted.add(request_id)

    def stats(self) -> dict:
        return {"running": len(self.requests) - len(self.finished) - len(self.aborted), "waiting": self.waiting,
                "kv_usage": 0.25, "prefix_cache_hit_rate": 0.5, "image_cache_hit_rate": 0.75,
                "num_kv_pages_free": 30, "num_kv_pages_total": 40}

    async def generate(self, prompt_token_ids: list[int], images: list, params: SamplingParams, request_id: str,
                       prompt: str | None = None):
        if len(prompt_token_ids) >= self.context_length:
            raise InvalidRequestError(f"prompt of {len(prompt_token_ids)} tokens is too long", param="messages")
        self.requests.append({"ids": prompt_token_ids, "images": images, "params": params, "id": request_id,
                              "prompt": prompt})
        replies = [self.reply(prompt or "", params) + ("" if params.n == 1 else f" #{i}") for i in range(params.n)]
        token_lists = [self.tokenizer.encode(r, add_special_tokens=False) for r in replies]
        outs = [CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None)
                for i in range(params.n)]
        step = 0
        while True:
            for i, o in enumerate(outs):
                o.delta_text, o.delta_token_ids, o.delta_logprobs = "", [], []
                toks = token_lists[i]
                if o.finished or step >= len(toks) + 1:
                    continue
                if step == len(toks) or step >= params.max_tokens:
                    o.finish_reason = "stop" if step == len(toks) else "length"
                    continue
                tok = toks[step]
                text = self.tokenizer.decode(toks[:step + 1])
                o.delta_text, o.text = text[len(o.text):], text
                o.delta_token_ids = [tok]
                o.token_ids.append(tok)
                if params.logprobs is not None:
                    lp = Logprob(tok, -0.5 * (step + 1), [(tok, -0.5 * (step + 1))] * params.logprobs)
                    o.delta_logprobs = [lp]
                    o.logprobs.append(lp)
                if step + 1 >= params.max_tokens and step + 1 < len(toks):
                    o.finish_reason = "length"
            step += 1
            if request_id in self.aborted:
                return
            out = RequestOutput(request_id, prompt, prompt_token_ids, outs, num_cached_tokens=2,
                                num_image_tokens=len(images) * IMAGE_TOKENS)
            if out.finished:
                self.finished.add(request_id)
            yield out
            if out.finished:
                return
            await asyncio.sleep(self.token_delay)
