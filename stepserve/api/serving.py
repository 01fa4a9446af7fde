"""From a validated request to engine outputs to OpenAI responses: /v1/chat/completions and /v1/completions.

CPU work that could stall the event loop (template rendering, image preprocessing, tokenization) runs in a
thread pool (images: in worker processes by default on GPU hosts); images are fetched asynchronously, and a
chat's text is tokenized while its images are prepared. Errors raised before the first token (bad input,
prompt too long) become HTTP errors even for streams, because the first engine output is awaited before
responding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from stepserve.api import protocol as P
from stepserve.api.chat import image_part_params, render_chat
from stepserve.api.metrics import Metrics
from stepserve.api.reasoning import get_reasoning_parser, thinking_disabled
from stepserve.api.tools import HermesToolParser, ToolCallDelta, get_tool_parser
from stepserve.config import ServerArgs
from stepserve.engine.outputs import CompletionOutput, Logprob, RequestOutput
from stepserve.errors import InvalidRequestError, NotFoundError, ServiceUnavailableError, StepserveError

logger = logging.getLogger(__name__)


class ChoicePipe:
    """Per choice: reasoning split, then tool-call parsing of the content."""

    def __init__(self, reasoning, tools: HermesToolParser | None):
        self._r = reasoning.stream() if reasoning is not None else None
        self._t = tools.stream() if tools is not None else None

    @property
    def calls(self) -> list:
        return self._t.calls if self._t is not None else []

    def feed(self, text: str, final: bool) -> tuple[str, str, list[ToolCallDelta]]:
        reasoning, content = self._r.feed(text) if self._r else ("", text)
        if final and self._r:
            r2, c2 = self._r.flush()
            reasoning, content = reasoning + r2, content + c2
        if self._t is None:
            return reasoning, content, []
        content, deltas = self._t.feed(content)
        if final:
            c2, d2 = self._t.flush()
            content, deltas = content + c2, deltas + d2
        return reasoning, content, deltas


def sse(obj: Any) -> str:
    return f"data: {obj.model_dump_json() if hasattr(obj, 'model_dump_json') else json.dumps(obj)}\n\n"


class Serving:
    def __init__(self, args: ServerArgs, engine, metrics: Metrics):
        self.args, self.engine, self.metrics = args, engine, metrics
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="stepserve-prep")
        from stepserve.multimodal.prep_pool import ImageLimits, ImagePrepPool, default_workers

        workers = args.image_workers if args.image_workers >= 0 else default_workers(torch.cuda.is_available())
        limits = ImageLimits(args.max_image_bytes, args.max_image_pixels, args.image_fetch_timeout,
                             args.allowed_local_media_path)
        self.images = ImagePrepPool(engine.image_processor, limits, workers)
        self.reasoning = get_reasoning_parser(args.reasoning_parser) if args.reasoning_parser else None
        if args.tool_call_parser:
            get_tool_parser(args.tool_call_parser, None)  # unknown names fail at startup
        self.served_name = args.served_model_name or engine.model_name
        self.model_names = {n for n in (self.served_name, args.model, engine.model_name) if n}

    # --- checks and preparation ---------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name and name not in self.model_names:
            raise NotFoundError(f"model {name!r} does not exist; this server serves {self.served_name!r}",
                                param="model")

    def check_capacity(self) -> None:
        waiting = self.engine.stats().get("waiting", 0)
        if waiting >= self.args.max_queued_requests:
            raise ServiceUnavailableError(f"{waiting} requests are waiting (limit {self.args.max_queued_requests}); "
                                          "retry later")

    async def _in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt given as text or as ids (checked), its image placeholders not yet expanded."""
        if isinstance(prompt, str):
            return self.engine.tokenizer.encode(prompt, add_special_tokens=False)
        vocab = len(self.engine.tokenizer)
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(prompt)

    def _expand(self, ids: list[int], images: list) -> list[int]:
        """Each image's placeholder replaced by its token layout (images: ImageInput, in prompt order)."""
        from stepserve.multimodal.processor import expand_prompt  # torch lives there; keep it off import time

        return expand_prompt(ids, images, self.engine.image_token_id)

    async def _prepare_images(self, sources: list, params: list[str]) -> list:
        """Fetch, decode and preprocess each image (ImageInput); each image goes through on its own, in
        parallel with the others."""

        async def prepare(source, param: str):
            try:
                return await self.images.prepare(source, param)
            except StepserveError as e:
                e.message = f"{param}: {e.message}"  # which of the request's images failed
                raise

        return await asyncio.gather(*(prepare(s, p) for s, p in zip(sources, params)))

    def _parsers(self, req: P.ChatCompletionRequest):
        reasoning = self.reasoning if req.separate_reasoning else None
        if reasoning is not None and thinking_disabled(req.chat_template_kwargs):
            reasoning = get_reasoning_parser(reasoning.kind, force_reasoning=False)
        tools = None
        if req.tools and req.tool_choice != "none":
            if not self.args.tool_call_parser:
                if req.tool_choice != "auto":
                    raise InvalidRequestError("tool_choice other than auto/none needs the server to run with "
                                              "--tool-call-parser", param="tool_choice")
            else:
                # a named tool_choice accepts only calls to that function; other blocks stay content
                tools = get_tool_parser(self.args.tool_call_parser, req.template_tools())
        return reasoning, tools

    # --- /v1/chat/completions -----------------------------------------------------------------
    async def chat(self, req: P.ChatCompletionRequest, request: Request, t0: float):
        """t0: the request's arrival (before its body was read), where its latency metrics start."""
        self.check_model(req.model)
        self.check_capacity()
        reasoning, tools = self._parsers(req)
        prompt, sources = await self._in_pool(render_chat, req.messages, self.engine.tokenizer,
                                              self.engine.chat_template, req.template_tools(), True,
                                              req.chat_template_kwargs)
        # The text is tokenized while the images are prepared: only the placeholders' expansion needs both.
        images, text_ids = await asyncio.gather(self._prepare_images(sources, image_part_params(req.messages)),
                                                self._in_pool(self._tokenize, prompt))
        ids = self._expand(text_ids, images)
        params = P.to_sampling_params(req, self.engine.context_length, len(ids), len(self.engine.tokenizer))
        rid = P.new_id("chatcmpl-")
        stream = _Generation(self, rid, t0, self.engine.generate(ids, images, params, rid, prompt=prompt))
        await stream.start()
        pipes = [ChoicePipe(reasoning, tools) for _ in range(req.n)]
        model = req.model or self.served_name
        if req.stream:
            return StreamingResponse(self._chat_events(req, stream, pipes, model), media_type="text/event-stream")
        final = await _until_disconnect(request, stream.collect())
        choices = []
        for o in final.outputs:
            pipe = pipes[o.index]
            r, c, _ = pipe.feed(o.text, final=True)
            self._check_required(req, pipe)
            calls = [P.ToolCallOut(id=t.id, function=P.FunctionCall(name=t.name, arguments=t.arguments))
                     for t in pipe.calls]
            choices.append(P.ChatChoice(
                index=o.index, finish_reason=_finish(o.finish_reason, bool(calls)),
                message=P.ChatMessage(content=c or None, reasoning_content=r or None, tool_calls=calls or None),
                logprobs=self._chat_logprobs(stream.logprobs[o.index]) if req.logprobs else None))
        return JSONResponse(P.ChatCompletion(id=rid, model=model, choices=choices,
                                             usage=stream.usage()).model_dump(mode="json"))

    def _check_required(self, req: P.ChatCompletionRequest, pipe: ChoicePipe) -> None:
        # SGLang forces the call with constrained decoding; without it, a missing call is reported, not hidden
        if req.tool_choice not in ("auto", "none", None) and not pipe.calls:
            want = "a tool call" if req.tool_choice == "required" else f"a call to {req.tool_choice.function.name!r}"
            raise StepserveError(f"tool_choice asked for {want} but the model produced none", param="tool_choice")

    async def _chat_events(self, req: P.ChatCompletionRequest, stream: _Generation, pipes: list[ChoicePipe],
                           model: str) -> AsyncIterator[str]:
        def chunk(index: int, delta: P.DeltaMessage, finish: str | None = None, logprobs=None) -> str:
            return sse(P.ChatCompletionChunk(id=stream.rid, model=model, choices=[
                P.ChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)]))

        async def events() -> AsyncIterator[str]:
            for i in range(req.n):
                yield chunk(i, P.DeltaMessage(role="assistant", content=""))
            async for o in stream.choice_updates():
                pipe = pipes[o.index]
                reasoning, content, calls = pipe.feed(o.delta_text, final=o.finished)
                deltas = ([P.DeltaMessage(reasoning_content=reasoning)] if reasoning else []) + (
                    [P.DeltaMessage(content=content)] if content else []) + [
                    P.DeltaMessage(tool_calls=[P.DeltaToolCall(
                        index=d.index, id=d.id, type="function" if d.id else None,
                        function=P.FunctionCall(name=d.name, arguments=d.arguments_delta))]) for d in calls]
                logprobs = self._chat_logprobs(o.delta_logprobs) if req.logprobs and o.delta_logprobs else None
                if logprobs and not deltas:
                    deltas = [P.DeltaMessage()]
                for k, delta in enumerate(deltas):
                    yield chunk(o.index, delta, logprobs=logprobs if k == 0 else None)
                if o.finished:
                    self._check_required(req, pipe)
                    yield chunk(o.index, P.DeltaMessage(), finish=_finish(o.finish_reason, bool(pipe.calls)))
            if req.include_usage:
                yield sse(P.ChatCompletionChunk(id=stream.rid, model=model, choices=[], usage=stream.usage()))

        async for event in stream.guard(events()):
            yield event

    def _chat_logprobs(self, logprobs: list[Logprob]) -> P.ChoiceLogprobs:
        def entry(token_id: int, lp: float) -> dict:
            text = self.engine.tokenizer.decode([token_id])
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return P.ChoiceLogprobs(content=[P.TokenLogprob(**entry(x.token_id, x.logprob),
                                                        top_logprobs=[P.TopLogprob(**entry(t, lp)) for t, lp in x.top])
                                         for x in logprobs])

    # --- /v1/completions ----------------------------------------------------------------------
    async def completion(self, req: P.CompletionRequest, request: Request, t0: float):
        """t0: the request's arrival (before its body was read), where its latency metrics start."""
        self.check_model(req.model)
        self.check_capacity()
        prompts = req.prompts()
        if len(prompts) != 1:
            raise InvalidRequestError("one prompt per request (send several requests to batch)", param="prompt")
        ids = self._expand(await self._in_pool(self._tokenize, prompts[0]), [])
        params = P.to_sampling_params(req, self.engine.context_length, len(ids), len(self.engine.tokenizer))
        rid = P.new_id("cmpl-")
        stream = _Generation(self, rid, t0, self.engine.generate(ids, [], params, rid))
        await stream.start()
        echo = ""
        if req.echo:
            echo = prompts[0] if isinstance(prompts[0], str) else self.engine.tokenizer.decode(prompts[0])
        model = req.model or self.served_name
        if req.stream:
            return StreamingResponse(self._completion_events(req, stream, model, echo), media_type="text/event-stream")
        final = await _until_disconnect(request, stream.collect())
        choices = [P.CompletionChoice(index=o.index, text=echo + o.text, finish_reason=_finish(o.finish_reason, False),
                                      logprobs=self._completion_logprobs(stream.logprobs[o.index], len(echo))
                                      if req.logprobs is not None else None) for o in final.outputs]
        return JSONResponse(P.Completion(id=rid, model=model, choices=choices, usage=stream.usage())
                            .model_dump(mode="json"))

    async def _completion_events(self, req: P.CompletionRequest, stream: _Generation, model: str,
                                 echo: str) -> AsyncIterator[str]:
        async def events() -> AsyncIterator[str]:
            offsets = [len(echo)] * req.n
            if echo:
                for i in range(req.n):
                    yield sse(P.Completion(id=stream.rid, model=model, choices=[P.CompletionChoice(index=i, text=echo)]))
            async for o in stream.choice_updates():
                lp = None
                if req.logprobs is not None and o.delta_logprobs:
                    lp = self._completion_logprobs(o.delta_logprobs, offsets[o.index])
                offsets[o.index] += len(o.delta_text)
                if o.delta_text or lp or o.finished:
                    yield sse(P.Completion(id=stream.rid, model=model, choices=[P.CompletionChoice(
                        index=o.index, text=o.delta_text, logprobs=lp,
                        finish_reason=_finish(o.finish_reason, False) if o.finished else None)]))
            if req.include_usage:
                yield sse(P.Completion(id=stream.rid, model=model, choices=[], usage=stream.usage()))

        async for event in stream.guard(events()):
            yield event

    def _completion_logprobs(self, logprobs: list[Logprob], offset: int) -> P.CompletionLogprobs:
        decode = self.engine.tokenizer.decode
        out = P.CompletionLogprobs()
        for x in logprobs:
            token = decode([x.token_id])
            out.tokens.append(token)
            out.token_logprobs.append(x.logprob)
            out.top_logprobs.append({decode([t]): lp for t, lp in x.top})
            out.text_offset.append(offset)
            offset += len(token)
        return out

    # --- /health_generate ---------------------------------------------------------------------
    async def health_generate(self) -> None:
        from stepserve.engine.sampling_params import SamplingParams

        ids = self.engine.tokenizer.encode("ping", add_special_tokens=False)[:1] or [0]
        rid = P.new_id("health-")

        async def one_token() -> None:
            async for _ in self.engine.generate(ids, [], SamplingParams(max_tokens=1, temperature=0), rid):
                pass

        try:
            await asyncio.wait_for(one_token(), 60)
        except asyncio.TimeoutError:
            self.engine.abort(rid)
            raise ServiceUnavailableError("the engine did not generate a token within 60 s") from None


def _finish(reason: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if has_calls and reason == "stop" else reason


async def _until_disconnect(request: Request, work):
    """Await `work`, cancelling it (which aborts the engine request) if the client goes away first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    finally:
        watcher.cancel()


class _Generation:
    """One engine request: the first output awaited up front, usage, logprobs, timing and abort on exit."""

    def __init__(self, serving: Serving, rid: str, t0: float, gen: AsyncIterator[RequestOutput]):
        self.serving, self.rid, self.t0, self._gen = serving, rid, t0, gen
        serving.metrics.prepare.observe(time.monotonic() - t0)  # the request reaches the engine now
        self._first: RequestOutput | None = None
        self.last: RequestOutput | None = None
        self.ttft: float | None = None
        self.logprobs: dict[int, list[Logprob]] = {}

    async def start(self) -> None:
        try:
            self._first = await self._gen.__anext__()
        except StopAsyncIteration:
            raise StepserveError("the engine returned no output") from None

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        out = self._first
        while out is not None:
            self.last = out
            for o in out.outputs:
                if o.delta_token_ids and self.ttft is None:
                    self.ttft = time.monotonic() - self.t0
                self.logprobs.setdefault(o.index, []).extend(o.delta_logprobs)
            yield out
            if out.finished:
                self._record()
                return
            out = await self._gen.__anext__()

    async def choice_updates(self) -> AsyncIterator[CompletionOutput]:
        """Each choice's new text once per engine output, and its finish exactly once."""
        done: set[int] = set()
        async for out in self.outputs():
            for o in out.outputs:
                if o.index not in done:
                    if o.finished:
                        done.add(o.index)
                    yield o

    async def collect(self) -> RequestOutput:
        async with _closing(self):
            async for _ in self.outputs():
                pass
        return self.last

    async def guard(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """SSE framing for a stream: errors after the first byte go out as an error event; always [DONE]."""
        async with _closing(self):
            try:
                async for event in events:
                    yield event
            except StepserveError as e:
                yield sse(e.to_dict())
            except Exception as e:  # noqa: BLE001 - the status line is already sent; tell the client in-band
                logger.exception("stream %s failed", self.rid)
                yield sse(StepserveError(f"generation failed: {e}").to_dict())
            yield "data: [DONE]\n\n"

    def usage(self) -> P.Usage:
        out = self.last
        return P.Usage.of(len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs),
                          out.num_cached_tokens)

    def _record(self) -> None:
        u = self.usage()
        self.serving.metrics.observe_request(u.prompt_tokens, u.completion_tokens, self.ttft,
                                             time.monotonic() - self.t0, self.last.times)


class _closing:
    """Abort the engine request unless it finished, and close the engine's generator."""

    def __init__(self, gen: _Generation):
        self.gen = gen

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc) -> None:
        g = self.gen
        if g.last is None or not g.last.finished:
            g.serving.engine.abort(g.rid)
        await g._gen.aclose()
