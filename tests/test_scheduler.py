"""Page pool and scheduler on their own: sharing, eviction, chunking, preemption, exact page accounting."""

import random
from dataclasses import dataclass

import pytest

from stepserve.engine.kv_cache import PagePool
from stepserve.engine.request import ImageSpan, Sequence, cache_keys
from stepserve.engine.sampling_params import SamplingParams
from stepserve.engine.scheduler import Scheduler


def seq(ids, max_tokens=4, keys=None):
    return Sequence("r", 0, list(ids), SamplingParams(max_tokens=max_tokens), seed=0, keys=keys or [])


def test_prefix_pages_are_shared_and_released():
    pool = PagePool(num_pages=16, page_size=4)
    a = seq(range(13))
    assert pool.match_prefix(a) == 0
    pool.grow(a, 13)
    a.num_computed = 13
    pool.commit(a)
    assert a.num_hashed_pages == 3
    b = seq(list(range(12)) + [99, 100])
    assert pool.match_prefix(b) == 12  # three full pages in common
    assert b.pages == a.pages[:3]
    c = seq(range(8))
    assert pool.match_prefix(c) == 4  # never the whole prompt: the last token must be computed
    for s in (a, b, c):
        pool.release(s)
    pool.check_invariants()
    assert pool.num_available == 16
    d = seq(range(13))
    assert pool.match_prefix(d) == 12  # cached pages survive their owners
    pool.release(d)


def test_lru_eviction_reuses_cached_pages():
    pool = PagePool(num_pages=4, page_size=2)
    a = seq(range(8))
    pool.grow(a, 8)
    a.num_computed = 8
    pool.commit(a)
    pool.release(a)
    assert len(pool.evictable) == 4 and not pool.free
    b = seq([50, 51, 52, 53, 54])
    pool.grow(b, 5)  # takes three cached pages, the chain's tail first
    pool.check_invariants()
    c = seq(range(8))
    assert pool.match_prefix(c) == 2  # only the head page of a's chain is left
    pool.release(b)
    pool.release(c)
    pool.check_invariants()


@dataclass
class FakeImage:
    hash: str
    num_feature_rows: int = 3


def test_image_rows_are_keyed_by_content():
    ids = [1, 2, 9, 9, 9, 3, 4, 5]
    span_a = [ImageSpan(FakeImage("aaa"), [2, 3, 4])]
    span_b = [ImageSpan(FakeImage("bbb"), [2, 3, 4])]
    ka, kb = cache_keys(ids, span_a), cache_keys(ids, span_b)
    assert ka[:2] == kb[:2] == [1, 2] and ka[5:] == ids[5:]
    assert ka[2:5] != kb[2:5] and len(set(ka[2:5])) == 3 and all(k < 0 for k in ka[2:5])
    pool = PagePool(num_pages=8, page_size=2)
    a = seq(ids, keys=ka)
    pool.grow(a, 8)
    a.num_computed = 8
    pool.commit(a)
    assert pool.match_prefix(seq(ids, keys=kb)) == 2  # only the text page before the image
    assert pool.match_prefix(seq(ids, keys=list(ka))) == 6


def drive(sched: Scheduler, seqs: list[Sequence], max_steps: int = 10_000) -> list[list[int]]:
    """Run the scheduler with a fake model that 'samples' token = position; finish at max_tokens."""
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_work():
        batch = sched.schedule()
        assert batch.seqs, "scheduler stalled"
        assert batch.num_tokens <= sched.max_step_tokens
        assert len({id(s) for s in batch.seqs}) == len(batch.seqs)
        for s, n in zip(batch.seqs, batch.num_new):
            assert len(s.pages) * sched.pool.page_size >= s.num_computed + n
        sampling = [batch.samples(i) for i in range(len(batch))]
        sched.after_step(batch)
        for s, samples in zip(batch.seqs, sampling):
            if samples:
                s.output_ids.append(s.num_tokens)
                if len(s.output_ids) >= s.params.max_tokens:
                    sched.finish(s)
        sched.pool.check_invariants()
        steps += 1
        assert steps < max_steps
    return [s.output_ids for s in seqs]


@pytest.mark.parametrize("pages,chunk", [(1000, 0), (1000, 7), (12, 5), (10, 64)])
def test_every_request_completes_with_any_pool(pages, chunk):
    rng = random.Random(0)
    prompts = [[rng.randrange(50) for _ in range(rng.randrange(1, 30))] for _ in range(20)]
    seqs = [seq(p, max_tokens=rng.randrange(1, 12)) for p in prompts]
    pool = PagePool(num_pages=pages, page_size=4)
    sched = Scheduler(pool, max_running=8, max_step_tokens=32, chunk_size=chunk)
    outs = drive(sched, seqs)
    for s, out in zip(seqs, outs):
        assert out == list(range(len(s.prompt_ids), len(s.prompt_ids) + s.params.max_tokens))
    assert pool.num_available == pages
    if pages < 20:
        assert sched.num_preemptions > 0


def test_finish_while_waiting_or_prefilling_frees_pages():
    pool = PagePool(num_pages=10, page_size=4)
    sched = Scheduler(pool, max_running=4, max_step_tokens=8, chunk_size=8)
    a, b = seq(range(30)), seq(range(100, 120))
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a] and batch.num_new == [8]
    sched.after_step(batch)
    sched.finish(a)  # abort mid-prefill
    sched.finish(b)  # abort while waiting
    assert not sched.has_work()
    pool.check_invariants()
    assert pool.num_available == 10


def image_seq(image_hash: str, rows: int = 3) -> Sequence:
    """Text, one image's feature rows, text."""
    ids = [1] + [9] * rows + [2]
    return Sequence("r", 0, ids, SamplingParams(max_tokens=2), seed=0,
                    spans=[ImageSpan(FakeImage(image_hash, rows), list(range(1, rows + 1)))])


@pytest.mark.parametrize("budget", [0, 2, 4, 6, 100])
def test_vision_budget_caps_the_images_a_step_encodes(budget):
    seqs = [image_seq(h) for h in "abcde"]
    sched = Scheduler(PagePool(num_pages=100, page_size=4), max_running=8, max_step_tokens=64, chunk_size=0,
                      vision_budget=budget)
    encoded_at = {}
    for s in seqs:
        sched.add(s)
    step = 0
    while sched.has_work():
        batch = sched.schedule()
        rows = sum(batch.images.values())
        assert rows <= budget or len(batch.images) == 1 or budget == 0
        for h in batch.images:
            assert h not in encoded_at  # each image is encoded once
            encoded_at[h] = step
        sched.after_step(batch)
        for s, n in zip(batch.seqs, batch.num_new):
            if s.num_computed >= len(s.prompt_ids) and not s.output_ids:
                s.output_ids.append(0)
                sched.finish(s)
        step += 1
    assert sorted(encoded_at) == list("abcde")
    per_step = {0: 5, 2: 1, 4: 1, 6: 2, 100: 5}[budget]  # an image bigger than the budget still runs alone
    assert max(list(encoded_at.values()).count(i) for i in range(step)) == per_step
    sched.pool.check_invariants()


def test_vision_budget_charges_an_image_once_and_cached_images_nothing():
    a, b, c = image_seq("x"), image_seq("x"), image_seq("y")
    sched = Scheduler(PagePool(num_pages=100, page_size=4), max_running=8, max_step_tokens=64, chunk_size=0,
                      vision_budget=3, is_encoded=lambda h: h == "y")
    for s in (a, b, c):
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == [a, b, c] and batch.num_new == [5, 5, 5]  # x twice in one step, y cached
    assert batch.images == {"x": 3}


def test_vision_budget_cuts_a_chunk_before_the_image():
    first, second = image_seq("p"), image_seq("q")
    sched = Scheduler(PagePool(num_pages=100, page_size=4), max_running=8, max_step_tokens=64, chunk_size=0,
                      vision_budget=3)
    sched.add(first)
    sched.add(second)
    batch = sched.schedule()
    assert batch.seqs == [first, second] and batch.num_new == [5, 1]  # second: only the text before its image
    sched.after_step(batch)
    first.output_ids.append(0)
    sched.finish(first)
    batch = sched.schedule()
    assert batch.seqs == [second] and batch.num_new == [4] and batch.images == {"q": 3}
