"""`LLM`: the offline API. Batches every prompt through the engine and returns finished outputs in order."""

from __future__ import annotations

import itertools
from typing import Any

from tqdm import tqdm

from stepserve.config import EngineConfig
from stepserve.engine.engine import Engine
from stepserve.engine.outputs import RequestOutput
from stepserve.engine.sampling_params import SamplingParams

Prompt = str | list[int] | dict[str, Any]


class LLM:
    """`LLM(model=None)` serves the built-in tiny model; `model` is a hub id or a local checkpoint dir."""

    def __init__(self, model: str | None = None, dtype: str = "auto", **kwargs: Any):
        self.engine = Engine(EngineConfig(model=model, dtype=dtype, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Prompts are text, token ids, or {"prompt": text with one <im_patch> per image, "images": [...]}."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        requests = []
        for p in prompts:
            if isinstance(p, str):
                requests.append((p, *self.engine.encode_prompt(p, [])))
            elif isinstance(p, dict) and "prompt_token_ids" in p:
                requests.append((None, list(p["prompt_token_ids"]), []))
            elif isinstance(p, dict):
                images = [_load(src) for src in p.get("images", [])]
                requests.append((p["prompt"], *self.engine.encode_prompt(p["prompt"], images)))
            else:
                requests.append((None, list(p), []))
        return self._run(requests, sampling_params, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | list[SamplingParams] | None = None,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = True) -> list[RequestOutput]:
        """One conversation or a list of them, in OpenAI message format (text, image_url and image parts)."""
        from stepserve.api.chat import render_chat

        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        requests = []
        for conv in conversations:
            text, sources = render_chat(conv, self.tokenizer, self.engine.chat_template, tools=tools,
                                        add_generation_prompt=add_generation_prompt,
                                        chat_template_kwargs=chat_template_kwargs)
            requests.append((text, *self.engine.encode_prompt(text, [_load(s) for s in sources])))
        return self._run(requests, sampling_params, use_tqdm)

    def _run(self, requests: list[tuple], sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(requests)
        if len(params) != len(requests):
            raise ValueError(f"{len(params)} sampling params for {len(requests)} prompts")
        order = []
        for (text, ids, images), sp in zip(requests, params):
            rid = str(next(self._ids))
            self.engine.add_request(rid, ids, images, sp, prompt=text)
            order.append(rid)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(order), desc="generating", disable=not use_tqdm or len(order) < 8)
        while self.engine.has_work():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[rid] for rid in order]


def _load(source):
    from stepserve.multimodal.image_io import load_image

    return load_image(source, allowed_local_path="/")
