"""The engine end to end on the tiny model: batching, prefix and image caching, chunking, preemption, abort."""

import logging
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from stepserve import LLM, SamplingParams
from stepserve.engine.engine import WARMUP_PROMPT, _warmup_image

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def make_image(seed: int, size=(320, 200)) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", size)
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    return img


def make_prompts(n: int) -> list:
    rng = random.Random(1)
    words = "the a cat dog sees runs over under bright red blue green house tree river stone".split()
    images = [make_image(i, size) for i, size in enumerate([(320, 200), (900, 500), (200, 640)])]
    prompts = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(1, 60)))
        if i % 4 == 0:
            prompts.append({"prompt": f"<|im_start|>user\n<im_patch>{text}<|im_end|>\n", "images": [images[i % 3]]})
        elif i % 4 == 1:
            prompts.append({"prompt": f"<im_patch><im_patch> {text}", "images": [images[(i + 1) % 3], images[i % 3]]})
        else:
            prompts.append(text)
    return prompts


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", chunked_prefill_size=0)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_batched_equals_alone(llm):
    prompts = make_prompts(64)
    batched = token_ids(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert all(len(t) == GREEDY.max_tokens for t in batched)
    for i in range(0, 64, 5):
        alone = token_ids(llm.generate([prompts[i]], GREEDY, use_tqdm=False))[0]
        assert alone == batched[i], f"prompt {i} differs alone vs batched"


@pytest.mark.parametrize("kwargs", [
    dict(disable_radix_cache=True, chunked_prefill_size=0),
    dict(chunked_prefill_size=37, max_prefill_tokens=64),
    dict(num_kv_pages=96, page_size=16, max_running_requests=16, context_length=1536),  # forces preemption
    dict(max_image_tokens_per_step=0),  # no cap on the vision work of a step
    dict(vision_attention="math"),
])
def test_same_outputs_across_engine_settings(llm, kwargs):
    prompts = make_prompts(24)
    want = token_ids(llm.generate(prompts, GREEDY, use_tqdm=False))
    other = LLM(dtype="float32", **kwargs)
    got = token_ids(other.generate(prompts, GREEDY, use_tqdm=False))
    assert got == want
    if "vision_attention" in kwargs:
        assert other.engine.runner.model.vision_model.options.attention == kwargs["vision_attention"]
    stats = other.engine.stats()
    assert stats["running"] == stats["waiting"] == 0
    assert stats["num_kv_pages_free"] == stats["num_kv_pages_total"]
    if "num_kv_pages" in kwargs:
        assert stats["num_preemptions"] > 0


def test_vision_budget_spreads_images_over_steps(llm):
    """A burst of image requests encodes at most the budget's rows per step (or one image), same outputs."""
    prompts = make_prompts(24)
    want = token_ids(llm.generate(prompts, GREEDY, use_tqdm=False))
    capped = LLM(dtype="float32", chunked_prefill_size=0, max_image_tokens_per_step=200)
    steps = []
    encode = capped.engine.runner.encode
    capped.engine.runner.encode = lambda images: steps.append([im.num_feature_rows for im in images]) or encode(images)
    assert token_ids(capped.generate(prompts, GREEDY, use_tqdm=False)) == want
    assert sum(map(len, steps)) == 3  # three distinct pictures, each encoded once
    assert len(steps) > 1 and all(sum(rows) <= 200 or len(rows) == 1 for rows in steps)


def test_same_image_reuses_prefix_and_encoder_cache():
    llm = LLM(dtype="float32")
    image = make_image(7, (640, 480))
    prompt = {"prompt": "<|im_start|>user\n<im_patch>describe<|im_end|>\n", "images": [image]}
    first = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    encoded = llm.engine.stats()["num_encoded_images"]
    assert encoded == 1
    # The same pixels as a fresh PIL object: keyed by content, not identity.
    again = {"prompt": prompt["prompt"], "images": [image.copy()]}
    second = llm.generate(again, GREEDY, use_tqdm=False)[0]
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert second.num_cached_tokens >= len(first.prompt_token_ids) - llm.engine.config.page_size
    assert llm.engine.stats()["num_encoded_images"] == encoded  # vision tower did not run again
    assert llm.engine.stats()["prefix_cache_hit_rate"] > 0.4
    # A different image with the same text shares no image pages.
    other = {"prompt": prompt["prompt"], "images": [make_image(8, (640, 480))]}
    third = llm.generate(other, GREEDY, use_tqdm=False)[0]
    assert third.num_cached_tokens < 16
    assert llm.engine.stats()["num_encoded_images"] == encoded + 1


def test_abort_returns_every_page():
    llm = LLM(dtype="float32")
    engine = llm.engine
    params = SamplingParams(temperature=0.8, max_tokens=200, ignore_eos=True)
    for i, p in enumerate(make_prompts(12)):
        ids, images = (engine.encode_prompt(p["prompt"], p["images"]) if isinstance(p, dict)
                       else engine.encode_prompt(p, []))
        engine.add_request(f"r{i}", ids, images, params)
    for _ in range(6):
        engine.step()
    assert engine.stats()["kv_usage"] > 0
    for i in range(12):
        engine.abort(f"r{i}")
    engine.pool.check_invariants()
    assert engine.stats()["num_kv_pages_free"] == engine.stats()["num_kv_pages_total"]
    assert engine.step() == []  # the step still queued when they were aborted is taken in and dropped
    assert not engine.has_work()


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    prompts = make_prompts(16)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    unseeded = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    mixed = [seeded if i % 2 == 0 else unseeded for i in range(len(prompts))]
    run1 = token_ids(llm.generate(prompts, mixed, use_tqdm=False))
    run2 = token_ids(llm.generate(prompts[::-1], mixed[::-1], use_tqdm=False))[::-1]
    for i in range(0, len(prompts), 2):
        assert run1[i] == run2[i]
        assert run1[i] == token_ids(llm.generate([prompts[i]], seeded, use_tqdm=False))[0]


def test_n_choices_and_stop_conditions(llm):
    out = llm.generate("the cat", SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert all(o.finish_reason == "length" for o in out.outputs)
    greedy = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    first = greedy.outputs[0].token_ids[0]
    stopped = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                     stop_token_ids=[first]), use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == first and stopped.token_ids == [first]


def test_warm_up_leaves_no_trace(llm, caplog):
    # On CUDA the engine warms up by itself at start-up; on the CPU the tests call it.
    warmed = LLM(dtype="float32", chunked_prefill_size=0)
    engine = warmed.engine
    encoded = []
    encode = engine.runner.encode
    engine.runner.encode = lambda images: encoded.extend(images) or encode(images)
    stats, rng = engine.stats(), random.getstate()
    with caplog.at_level(logging.INFO, logger="stepserve.engine.engine"):
        engine.warm_up()
    assert re.search(r"warm-up: requests of \d+ tokens with 2 image\(s\) and \d+ tokens with 1 image\(s\), "
                     r"4 output tokens each", caplog.text)
    assert [(im.size, im.num_crops) for im in encoded] == [((1280, 720), 6)] * 3
    assert engine.stats() == stats and random.getstate() == rng  # unseeded requests still draw the same seeds
    assert not engine.has_work() and not engine.seqs and engine.num_finished == 0
    assert not engine.pool.page_of and not engine.pool.evictable and len(engine.runner.encoder_cache) == 0
    engine.pool.check_invariants()
    # The warm-up's own prompt again: nothing of it was kept, so it is computed and encoded from scratch.
    ids, images = engine.encode_prompt(WARMUP_PROMPT.format("<im_patch>"), [_warmup_image(2)])
    engine.add_request("again", ids, images, GREEDY)
    while engine.has_work():
        outputs = engine.step()
    assert outputs[0].num_cached_tokens == 0 and engine.stats()["num_encoded_images"] == 1
    prompts = make_prompts(12)
    assert token_ids(warmed.generate(prompts, GREEDY, use_tqdm=False)) == \
        token_ids(llm.generate(prompts, GREEDY, use_tqdm=False))


def test_warm_up_without_room_for_the_image_runs_text_only(caplog):
    engine = LLM(dtype="float32", context_length=512).engine
    with caplog.at_level(logging.INFO, logger="stepserve.engine.engine"):
        engine.warm_up()
    assert "with 0 image(s)" in caplog.text
    assert engine.stats()["num_kv_pages_free"] == engine.stats()["num_kv_pages_total"] and not engine.pool.page_of


def test_a_slow_step_is_logged_with_what_it_ran(llm, monkeypatch, caplog):
    """A step past SLOW_STEP_S holds every stream back: the log says how long and what the step held."""
    import stepserve.engine.engine as engine_mod

    monkeypatch.setattr(engine_mod, "SLOW_STEP_S", 0.0)
    with caplog.at_level(logging.WARNING, logger="stepserve.engine.engine"):
        llm.generate([{"prompt": "<im_patch> a slow picture", "images": [make_image(77)]}], GREEDY, use_tqdm=False)
    first = re.search(r"slow engine step: [\d.]+ s to launch 1 sequences \((\d+) tokens, 1 images to encode\)",
                      caplog.text)
    assert first and int(first.group(1)) > 100  # the whole prompt, image rows included, in one chunk
    assert "to launch 1 sequences (1 tokens, 0 images to encode)" in caplog.text  # then decode steps
    monkeypatch.setattr(engine_mod, "SLOW_STEP_S", 60.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stepserve.engine.engine"):
        llm.generate(["quick"], GREEDY, use_tqdm=False)
    assert "slow engine step" not in caplog.text


def test_vision_runs_in_bounded_passes(llm, monkeypatch):
    """Many images in one step go through the tower a few at a time, with the same embeddings as one pass."""
    from stepserve.engine import model_runner

    runner = llm.engine.runner
    pictures = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8))
                for i, (w, h) in enumerate([(1280, 720), (300, 200), (900, 700), (640, 480)])]
    images = [llm.engine.image_processor(p) for p in pictures]
    calls = []
    encode_images = runner.model.encode_images
    monkeypatch.setattr(runner.model, "encode_images", lambda *a: calls.append(len(a[2])) or encode_images(*a))
    with torch.inference_mode():
        whole = runner.encode(images)
        monkeypatch.setattr(model_runner, "VISION_ROWS_PER_PASS", images[0].num_feature_rows + 1)
        split = runner.encode(images)
    assert calls[0] == 4 and sum(calls[1:]) == 4 and len(calls) > 2
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("length", [7, 8])
def test_positions_reach_the_model_16_byte_aligned(llm, monkeypatch, length):
    """Triton specializes pointers on 16-byte alignment: positions of an odd token count must not shift it."""
    model = llm.engine.runner.model
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda ids, pos, *a: seen.append(pos.data_ptr() % 16) or forward(ids, pos, *a))
    llm.generate([{"prompt_token_ids": list(range(10, 10 + length))}], GREEDY, use_tqdm=False)
    assert seen and set(seen) == {0}


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5])
def test_attention_metadata_16_byte_aligned_at_any_batch_size(batch):
    from stepserve.layers.attention import build_context

    ctx = build_context([3] * batch, [7] * batch, [[0, 1]] * batch, page_size=4)
    for name in ("cu_q_lens", "kv_lens", "block_tables", "slot_mapping"):
        assert getattr(ctx, name).data_ptr() % 16 == 0, name
    assert ctx.kv_lens.tolist() == [7] * batch and ctx.cu_q_lens.tolist() == [3 * i for i in range(batch + 1)]
    assert ctx.block_tables.tolist() == [[0, 1]] * batch


def test_a_step_outputs_reach_the_event_loop_in_one_wake_up(llm):
    import asyncio

    from stepserve.engine.engine import AsyncEngine

    class CountingLoop:
        def __init__(self):
            self.calls = []

        def call_soon_threadsafe(self, fn, *args):
            self.calls.append((fn, args))

    front, loop = AsyncEngine(llm.engine), CountingLoop()
    streams = [asyncio.Queue() for _ in range(5)]
    front._streams = {f"r{i}": (loop, q) for i, q in enumerate(streams)}
    front._deliver_all([(f"r{i}", i) for i in range(5)] + [("disconnected", 9), ("r0", 10)])
    assert len(loop.calls) == 1
    fn, args = loop.calls[0]
    fn(*args)
    assert [q.qsize() for q in streams] == [2, 1, 1, 1, 1]
    assert [streams[0].get_nowait(), streams[0].get_nowait()] == [0, 10]
    assert [q.get_nowait() for q in streams[1:]] == [1, 2, 3, 4]


def test_a_reader_that_fell_behind_gets_the_queued_outputs_as_one():
    """Outputs that queued up while the event loop was busy come out merged (deltas joined, the latest state),
    up to and including the finishing one; an error queued behind an output still follows it."""
    import asyncio

    from stepserve.engine.engine import AsyncEngine
    from stepserve.engine.outputs import CompletionOutput, RequestOutput

    class Inbox:
        def put(self, item):
            pass

    class FakeEngine:
        tokenizer = chat_template = image_token_id = context_length = model_name = image_processor = None

        def make_sequences(self, *args):
            return []

    def out(texts: list[str], ids: list[list[int]], finished: bool = False) -> RequestOutput:
        return RequestOutput("r", None, [], [CompletionOutput(index=i, delta_text=t, delta_token_ids=d,
                                                              finish_reason="stop" if finished else None)
                                             for i, (t, d) in enumerate(zip(texts, ids))])

    async def read(items: list) -> list:
        front = AsyncEngine(FakeEngine())
        front._inbox = Inbox()
        got = []
        gen = front.generate([], [], GREEDY, "r")
        try:
            first = asyncio.ensure_future(gen.__anext__())
            await asyncio.sleep(0)  # generate() registered its queue and waits on it
            for item in items:
                front._streams["r"][1].put_nowait(item)
            got.append(await first)
            async for o in gen:
                got.append(o)
        except RuntimeError as e:
            got.append(str(e))
        return got

    got = asyncio.run(read([out(["a", "x"], [[1], [7]]), out(["b", ""], [[2], []]), out(["c", "y"], [[3], [8]]),
                            out(["", "z"], [[], [9]], finished=True), out(["late"], [[4]])]))
    assert [[(o.delta_text, o.delta_token_ids) for o in r.outputs] for r in got] == [
        [("abc", [1, 2, 3]), ("xyz", [7, 8, 9])]]
    assert got[0].finished  # and the output queued after the finishing one is not read
    got = asyncio.run(read([out(["a"], [[1]]), out(["b"], [[2]]), RuntimeError("boom"), out(["c"], [[3]])]))
    assert [r.outputs[0].delta_text for r in got[:-1]] == ["ab"] and got[-1] == "boom"


def test_the_engine_thread_waits_at_most_a_short_switch_interval_for_the_gil():
    """Serving, the engine thread shares the GIL with the event loop: it must not wait Python's default 5 ms for
    it after every GPU wait (measured: ~2 % of the seed throughput)."""
    import asyncio
    import sys

    from stepserve.engine.engine import GIL_SWITCH_INTERVAL_S, AsyncEngine

    class IdleEngine:
        tokenizer = chat_template = image_token_id = context_length = model_name = image_processor = None

        def has_work(self) -> bool:
            return False

    async def main():
        front = AsyncEngine(IdleEngine())
        await front.start()
        try:
            return sys.getswitchinterval()
        finally:
            await front.shutdown()

    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    try:
        assert asyncio.run(main()) == GIL_SWITCH_INTERVAL_S <= 0.001
    finally:
        sys.setswitchinterval(before)


def test_a_failed_step_fails_the_requests_in_flight_and_the_engine_goes_on(monkeypatch):
    """A step that raises ends every request in flight with the error, and later requests run on a clean engine."""
    import asyncio

    from stepserve.engine.engine import AsyncEngine

    engine = LLM(dtype="float32").engine
    run = engine.runner.run
    failed = []

    def flaky(batch):
        if len(batch.seqs) == 2 and not failed:
            failed.append(True)
            raise RuntimeError("boom")
        return run(batch)

    monkeypatch.setattr(engine.runner, "run", flaky)
    front = AsyncEngine(engine)

    async def one(rid: str) -> str:
        try:
            async for out in front.generate(list(range(10, 30)), [], GREEDY, rid):
                pass
            return f"{len(out.outputs[0].token_ids)} tokens"
        except RuntimeError as e:
            return str(e)

    async def main():
        await front.start()
        try:
            first = await asyncio.wait_for(asyncio.gather(one("a"), one("b")), 60)
            return first, await asyncio.wait_for(one("c"), 60)
        finally:
            await front.shutdown()

    (a, b), c = asyncio.run(main())
    assert failed and a == b == "engine step failed: boom"
    assert c == f"{GREEDY.max_tokens} tokens"
    assert engine.pool.num_available == engine.pool.num_pages and not engine.seqs
