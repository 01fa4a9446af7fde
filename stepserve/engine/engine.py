"""The engine loop and its two front doors: `Engine` (synchronous, for `LLM`) and `AsyncEngine` (the server)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import random
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.profiler import record_function

from stepserve import loader
from stepserve.config import EngineConfig
from stepserve.engine.detokenizer import DetokenizeState
from stepserve.engine.kv_cache import PagePool
from stepserve.engine.model_runner import ModelRunner
from stepserve.engine.outputs import CompletionOutput, Logprob, RequestOutput, RequestTimes, merge_outputs
from stepserve.engine.profiler import EngineProfiler
from stepserve.engine.request import Sequence, cache_keys, image_spans
from stepserve.engine.sampling_params import SamplingParams
from stepserve.engine.scheduler import Scheduler
from stepserve.errors import InvalidRequestError
from stepserve.models.configs import TextConfig, read_config_dict
from stepserve.multimodal.processor import ImageInput, ImageProcessor, ImageTokenIds, expand_prompt
from stepserve.testing import TINY_MODEL_NAME

log = logging.getLogger(__name__)


WARMUP_PROMPT = "Describe {} in one sentence."
WARMUP_TOKENS = 4
WARMUP_SIZE = (1280, 720)  # the benchmarks' image: a global view and 3 x 2 crops
SLOW_STEP_S = 1.0  # a step this long holds every stream's next token back as long: worth a log line
# The engine thread shares the GIL with the server's event loop. When a GPU wait returns while the loop is busy
# (streaming ~6k chunks/s at concurrency 100), the engine thread waits for the loop to drop the GIL, up to one
# switch interval (Python's default: 5 ms), before it can queue the next step. Seed throughput workload, 400
# prompts on the H100: 3.44-3.50 req/s in four runs with 5 ms, 3.54 in two with 0.5 ms (GPU idle between steps
# 1.6 -> 1.3 s of ~114); docs/benchmarks.md, session 12.
GIL_SWITCH_INTERVAL_S = 0.0005


def _warmup_image(seed: int) -> Image.Image:
    """Noise, so it compresses nothing away and matches no user's image."""
    w, h = WARMUP_SIZE
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _model_limits(model_dir: Path) -> tuple[int, list[int]]:
    """(max positions, eos ids) from config.json / generation_config.json."""
    cfg = read_config_dict(model_dir)
    text = cfg.get("text_config", cfg)
    eos = text.get("eos_token_id", cfg.get("eos_token_id"))
    gen = model_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id", eos)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return TextConfig.from_dict(text).max_position_embeddings, eos


class Engine:
    def __init__(self, config: EngineConfig):
        if config.tp_size != 1:
            raise ValueError(f"--tp-size {config.tp_size}: tensor parallelism is not implemented yet (one GPU only)")
        self.config = config
        self.device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available()
                                   else "cpu" if config.device == "auto" else config.device)
        self.dtype = loader.resolve_dtype(config.dtype, self.device)
        self.model_dir = loader.resolve_model_dir(config.model, config.revision,
                                                  download_weights=config.load_format != "dummy")
        self.model_name = config.model or TINY_MODEL_NAME
        self.tokenizer = loader.load_tokenizer(Path(config.tokenizer) if config.tokenizer else self.model_dir)
        self.chat_template = loader.load_chat_template(self.model_dir, config.chat_template)
        max_pos, self.eos_ids = _model_limits(self.model_dir)
        self.context_length = config.context_length or max_pos
        if self.context_length > max_pos:  # positions past the rotary table would fail every step in flight
            log.warning("context length %d capped to the model's %d positions", self.context_length, max_pos)
            self.context_length = max_pos
        self.token_ids = ImageTokenIds.from_tokenizer(self.tokenizer)
        self.image_token_id = self.token_ids.im_patch
        self.image_processor = ImageProcessor(self.token_ids)
        start = time.perf_counter()
        model = loader.load_model(self.model_dir, self.dtype, self.device, config.load_format, config.seed,
                                  config.quantization, config.quantize_vision)
        self.runner = ModelRunner(config, model, self.device, self.dtype, self.eos_ids, len(self.tokenizer))
        pool_tokens = self.runner.num_pages * config.page_size
        if pool_tokens < self.context_length:  # one sequence must always fit, or preemption cannot help it
            log.warning("context length %d capped to the KV pool's %d tokens", self.context_length, pool_tokens)
            self.context_length = pool_tokens
        self.runner.capture_graphs(self.context_length)
        self.reset()
        if self.device.type == "cuda":
            self.warm_up()
            from stepserve.kernels.compile_log import watch_compiles

            watch_compiles()
        log.info("engine ready in %.1fs: %s on %s (%s), context %d, %d KV pages", time.perf_counter() - start,
                 self.model_name, self.device, self.dtype, self.context_length, self.runner.num_pages)

    def reset(self) -> None:
        """Empty KV pool and prefix cache, queues, encoder cache and counters: a new engine's state."""
        c = self.config
        self.pool = PagePool(self.runner.num_pages, c.page_size, not c.disable_radix_cache)
        self.scheduler = Scheduler(self.pool, c.max_running_requests, max(c.max_prefill_tokens, c.max_running_requests),
                                   c.chunked_prefill_size, c.max_image_tokens_per_step,
                                   self.runner.encoder_cache.__contains__)
        self.seqs: dict[str, list[Sequence]] = {}
        self.launched = None  # the step queued on the GPU whose tokens the host has not taken in yet
        self.prompts: dict[str, str | None] = {}
        self.num_finished = 0
        self.runner.encoder_cache.clear()
        self.runner.num_encoded_images = 0

    def warm_up(self) -> None:
        """Serve two synthetic requests shaped like a user's, then forget them (`reset`).

        Whatever is built on first use (Triton kernels, the vision compile for a real image's crop count, cuBLAS
        and cuDNN heuristics, sampler kernels, pinned staging memory) is built here, at start-up, instead of in the
        first user's TTFT. The first request is greedy from an empty cache; the second samples with top-p over
        the first one's cached prefix and image. Fixed seeds keep the global RNG, and so later unseeded
        requests, as they were.
        """
        start = time.perf_counter()
        greedy = SamplingParams(temperature=0.0, seed=0, max_tokens=WARMUP_TOKENS, ignore_eos=True)
        # Two images then one: the vision batch shapes of the seed's benchmarks (2 views + 12 crops) and of a
        # one-image request (inductor may specialize a batch of one view).
        requests = [([_warmup_image(0), _warmup_image(1)], greedy),
                    ([_warmup_image(2)], dataclasses.replace(greedy, temperature=1.0, top_p=0.9))]
        shapes = []
        for i, (pictures, params) in enumerate(requests):
            ids, images = self.encode_prompt(WARMUP_PROMPT.format(" and ".join(["<im_patch>"] * len(pictures))),
                                             pictures)
            if len(ids) + WARMUP_TOKENS >= self.context_length:  # too short a context for images: text only
                ids, images = self.encode_prompt(WARMUP_PROMPT.format("a picture"), [])
            self.add_request(f"warmup-{i}", ids, images, params)
            while self.has_work():
                self.step()
            shapes.append(f"{len(ids)} tokens with {len(images)} image(s)")
        self.reset()
        log.info("warm-up: requests of %s, %d output tokens each, in %.2f s", " and ".join(shapes), WARMUP_TOKENS,
                 time.perf_counter() - start)

    # -- requests ---------------------------------------------------------------------------------
    def encode_prompt(self, text: str, images: list) -> tuple[list[int], list[ImageInput]]:
        """Prompt text with one <im_patch> per image + PIL images -> expanded token ids and image inputs."""
        inputs = [self.image_processor(im) for im in images]
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return expand_prompt(ids, inputs, self.image_token_id), inputs

    def make_sequences(self, request_id: str, prompt_ids: list[int], images: list[ImageInput],
                       params: SamplingParams) -> list[Sequence]:
        """Validate a request and build its sequences (one per choice); touches no engine state."""
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if len(prompt_ids) >= self.context_length:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens (images included) but the context length is "
                f"{self.context_length}", param="messages")
        room = self.context_length - len(prompt_ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens ({params.max_tokens}) plus the prompt ({len(prompt_ids)} tokens) exceeds the context "
                f"length ({self.context_length})", param="max_tokens")
        spans = image_spans(prompt_ids, images, self.image_token_id)
        keys = cache_keys(prompt_ids, spans)
        base = params.seed if params.seed is not None else random.getrandbits(62)
        now = time.monotonic()
        seqs = []
        for i in range(params.n):
            seq = Sequence(request_id, i, prompt_ids, params, seed=base + i, spans=spans, keys=keys, arrival=now,
                           max_output=min(params.max_tokens or room, room))
            seq.detok = DetokenizeState(self.tokenizer, prompt_ids, params)
            seqs.append(seq)
        return seqs

    def add(self, request_id: str, seqs: list[Sequence], prompt: str | None = None) -> None:
        if request_id in self.seqs:
            raise InvalidRequestError(f"duplicate request id {request_id}", param="request_id")
        self.seqs[request_id] = seqs
        self.prompts[request_id] = prompt
        for seq in seqs:
            self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt_ids: list[int], images: list[ImageInput],
                    params: SamplingParams, prompt: str | None = None) -> None:
        self.add(request_id, self.make_sequences(request_id, prompt_ids, images, params), prompt)

    def abort(self, request_id: str) -> RequestOutput | None:
        seqs = self.seqs.get(request_id)
        if seqs is None:
            return None
        for seq in seqs:
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
        return self._output(request_id, {})

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.launched is not None

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Queue step N+1 on the GPU, then take in step N's tokens while it runs (overlap scheduling).

        Step N+1 reads N's sampled ids on the device, so the host's bookkeeping (detokenization, stop checks,
        outputs) never leaves the GPU idle. A sequence that stopped at N has computed one token too many;
        it is dropped. Penalties need every earlier token on the host, so those steps run one at a time.
        """
        began = time.perf_counter()
        outputs = []
        if self.launched is not None and any(s.needs_history for s in self.scheduler.running):
            outputs, self.launched = self._take(self.launched), None
        with record_function("schedule"):
            batch = self.scheduler.schedule()
        launched = None
        if batch.seqs:
            with record_function("launch"):
                launched = self.runner.run(batch)
            self.scheduler.after_step(batch)
        previous, self.launched = self.launched, launched
        if previous is not None:
            outputs += self._take(previous)
        took = time.perf_counter() - began
        if took > SLOW_STEP_S:
            log.warning("slow engine step: %.2f s to launch %d sequences (%d tokens, %d images to encode) and take "
                        "in the step before; %d running, %d waiting", took, len(batch), batch.num_tokens,
                        len(batch.images), len(self.scheduler.running), len(self.scheduler.waiting))
        return outputs

    def _take(self, launched) -> list[RequestOutput]:
        """Record a launched step's sampled tokens (waiting for the GPU), finishing sequences that stop."""
        with record_function("wait"):
            result = self.runner.collect(launched)
        with record_function("collect"):
            deltas: dict[str, dict[int, tuple]] = {}
            for j, (seq, token) in enumerate(zip(result.seqs, result.token_ids)):
                seq.num_pending -= 1
                if seq.finished:  # aborted, or stopped at the step before: this token is past its end
                    continue
                deltas.setdefault(seq.request_id, {})[seq.index] = self._append(seq, token, result, j)
                if not seq.finished:
                    self.pool.commit(seq)
            return [self._output(rid, d) for rid, d in deltas.items()]

    def _append(self, seq: Sequence, token: int, result, j: int) -> tuple[str, list[int], list[Logprob]]:
        """Record a sampled token, detokenize it, and finish the sequence if a stop condition holds."""
        params = seq.params
        seq.output_ids.append(token)
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        lp = None
        if result.logprobs is not None and params.logprobs is not None:
            lp = Logprob(token, result.logprobs[j], (result.top_logprobs[j][: params.logprobs]
                                                      if result.top_logprobs else []))
            seq.logprobs = (seq.logprobs or []) + [lp]
        stop_token = token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_ids)
        text = ""
        if stop_token and len(seq.output_ids) > params.min_tokens:
            seq.finish_reason, seq.stop_reason = "stop", token
        else:
            text, hit = seq.detok.update([token])
            if hit is not None:
                seq.finish_reason, seq.stop_reason = "stop", hit
        if seq.finish_reason is None and len(seq.output_ids) >= seq.max_output:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            if seq.finish_reason == "length" or isinstance(seq.stop_reason, int):
                text += seq.detok.flush()
            self.scheduler.finish(seq)
        seq.text += text
        return text, [token], [lp] if lp else []

    def _output(self, request_id: str, deltas: dict[int, tuple]) -> RequestOutput:
        """The request's state, with each choice's (text, token ids, logprobs) added this step."""
        seqs = self.seqs[request_id]
        outs = []
        for seq in seqs:
            d_text, d_ids, d_lps = deltas.get(seq.index, ("", [], []))
            outs.append(CompletionOutput(index=seq.index, text=seq.text, token_ids=seq.output_ids,
                                         logprobs=seq.logprobs, finish_reason=seq.finish_reason,
                                         stop_reason=seq.stop_reason, delta_text=d_text, delta_token_ids=d_ids,
                                         delta_logprobs=d_lps))
        first = seqs[0]
        out = RequestOutput(request_id, self.prompts[request_id], first.prompt_ids, outs,
                            num_cached_tokens=first.num_cached,
                            num_image_tokens=sum(len(s.positions) for s in first.spans),
                            times=RequestTimes(first.arrival, first.scheduled_at, first.first_token_at))
        if out.finished:
            del self.seqs[request_id], self.prompts[request_id]
            self.num_finished += 1
        return out

    def stats(self) -> dict:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_usage": self.pool.usage,
            "num_kv_pages_free": self.pool.num_available,
            "num_kv_pages_total": self.pool.num_pages,
            "prefix_cache_hit_rate": self.pool.prefix_hit_rate,
            "image_cache_hit_rate": self.runner.encoder_cache.hit_rate,
            "num_encoded_images": self.runner.num_encoded_images,
            "num_preemptions": self.scheduler.num_preemptions,
        }


def _put_all(pairs: list[tuple[asyncio.Queue, object]]) -> None:
    for stream, item in pairs:
        stream.put_nowait(item)


class AsyncEngine:
    """Runs `Engine.step` in a background thread and streams each request's outputs to an asyncio queue."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.chat_template = engine.chat_template
        self.image_token_id = engine.image_token_id
        self.context_length = engine.context_length
        self.model_name = engine.model_name
        self.image_processor = engine.image_processor
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.profiler = EngineProfiler()  # driven from the engine thread only (`call`)

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(Engine(config))

    async def start(self) -> None:
        if self._thread is None:
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # process-wide: the server runs one engine
            self._thread = threading.Thread(target=self._loop, name="stepserve-engine", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    async def generate(self, prompt_token_ids: list[int], images: list[ImageInput], params: SamplingParams,
                       request_id: str, prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        seqs = self.engine.make_sequences(request_id, prompt_token_ids, images, params)  # raises before queueing
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._inbox.put(("add", request_id, seqs, prompt))
        finished, error = False, None
        try:
            while not finished:
                item = error if error is not None else await stream.get()
                if isinstance(item, BaseException):
                    raise item
                # A reader that fell behind (a busy event loop) gets what queued up as one output, so a slow
                # loop writes fewer, larger chunks instead of a burst of small ones it catches up with later.
                while not item.finished and not stream.empty():
                    later = stream.get_nowait()
                    if isinstance(later, BaseException):
                        error = later
                        break
                    item = merge_outputs(item, later)
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def abort_all(self) -> None:
        """Abort every request with an open stream (server shutdown): each ends with finish_reason "abort"."""
        for request_id in list(self._streams):
            self.abort(request_id)

    def stats(self) -> dict:
        return self.engine.stats()

    async def call(self, fn, *args):
        """Run fn(*args) on the engine thread between two steps and return its result (or raise its error)."""
        if self._thread is None:
            raise RuntimeError("the engine is not running")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._inbox.put(("call", fn, args, loop, done))
        return await done

    # -- the engine thread ------------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, object]]) -> None:
        """Hand each listening stream its item, waking each event loop once: every wake-up is a write to the loop's
        self-pipe, and one per request was ~100 per decode step at concurrency 100, on the engine thread."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, pairs in by_loop.items():
            loop.call_soon_threadsafe(_put_all, pairs)

    def _drain(self, block: bool) -> None:
        while True:
            try:
                cmd = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if cmd is None:
                return
            if cmd[0] == "add":
                _, rid, seqs, prompt = cmd
                try:
                    self.engine.add(rid, seqs, prompt)
                except Exception as e:  # duplicate ids and the like: fail this request only
                    self._deliver(rid, e)
            elif cmd[0] == "call":
                _, fn, args, loop, done = cmd
                try:
                    result = fn(*args)
                except Exception as e:  # noqa: BLE001 - the caller gets it, the engine thread goes on
                    loop.call_soon_threadsafe(done.set_exception, e)
                else:
                    loop.call_soon_threadsafe(done.set_result, result)
            else:
                out = self.engine.abort(cmd[1])
                if out is not None:  # a consumer still listening (not a disconnect) gets the final output
                    self._deliver(cmd[1], out)

    def _fail_all(self, error: Exception) -> None:
        """Every request in flight gets `error`, and the engine starts over empty: the failed step may have left
        its pages, queues and pending tokens half-updated, which no later request should inherit."""
        self._deliver_all([(rid, error) for rid in self.engine.seqs])
        self.engine.reset()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.engine.has_work())
            if not self.engine.has_work():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - the engine thread must outlive any one step
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(RuntimeError(f"engine step failed: {e}"))
                continue
            with record_function("deliver"):
                self._deliver_all([(out.request_id, out) for out in outputs])
            trace = self.profiler.step()
            if trace is not None:
                log.info("profile of the requested steps written to %s", trace)
