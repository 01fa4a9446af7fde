"""Continuous batching: which tokens of which sequences run in the next step.

Each step is one flat batch: every running sequence that is decoding contributes its last token, and
prefills (new or resumed) fill the remaining token budget in chunks of at most `chunked_prefill_size`.
Admission needs free KV pages for the chunk; when decoding runs out of pages the newest running
sequence is preempted (its pages freed, its tokens recomputed later), so a small pool slows work down
but never fails it. The images a step's chunks start to encode are capped too (`vision_budget` feature
rows): the vision tower runs inside the step, so a burst of image requests admitted together would
otherwise stall every decoding sequence for seconds.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from stepserve.engine.kv_cache import PagePool
from stepserve.engine.request import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)  # tokens each sequence computes this step
    images: dict[str, int] = field(default_factory=dict)  # image hash -> feature rows encoded this step

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.num_new)

    def samples(self, i: int) -> bool:
        """Whether sequence i reaches its end this step, so its next token is sampled."""
        seq = self.seqs[i]
        return seq.num_computed + self.num_new[i] == seq.num_tokens


class Scheduler:
    def __init__(self, pool: PagePool, max_running: int, max_step_tokens: int, chunk_size: int,
                 vision_budget: int = 0, is_encoded: Callable[[str], bool] = lambda image_hash: False):
        """vision_budget: feature rows of images a step may encode (0: no cap; a step's first image always may);
        is_encoded(hash): whether an image's embeddings are cached, so encoding it costs nothing."""
        self.pool = pool
        self.max_running = max_running
        self.max_step_tokens = max_step_tokens
        self.chunk_size = chunk_size if chunk_size > 0 else 1 << 60
        self.vision_budget = vision_budget
        self.is_encoded = is_encoded
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        while True:
            batch = self._schedule_once()
            if batch.seqs or not self.running or any(s.num_pending for s in self.running):
                return batch
            # Every running sequence is a prefill stuck on pages held by the others: free the newest.
            self._preempt(self.running[-1])

    def _schedule_once(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_step_tokens
        # 1. Decodes: one token each; preempt from the back when a new page cannot be found.
        # A sequence whose last allowed token is already sampled (pending) has nothing left to run.
        decoding = [s for s in self.running if not s.is_prefilling and len(s.output_ids) + s.num_pending < s.max_output]
        for seq in decoding:
            if seq.status is not Status.RUNNING:
                continue  # preempted while making room for an earlier one
            while not self.pool.can_grow(seq, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.pool.grow(seq, seq.num_tokens)
                batch.seqs.append(seq)
                batch.num_new.append(1)
                budget -= 1
        # 2. Running prefills continue, then waiting sequences are admitted, while budget and pages last.
        for seq in [s for s in self.running if s.is_prefilling]:
            if budget <= 0:
                break
            budget -= self._add_chunk(batch, seq, budget)
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            cached = self.pool.match_prefix(seq)
            took = self._add_chunk(batch, seq, budget)
            if took == 0:
                self.pool.release(seq)  # a waiting sequence never holds pages
                if not self.running and not batch.seqs:
                    raise RuntimeError("KV pool too small for a single chunk of one request")
                break
            seq.num_cached = cached
            self.pool.record_lookup(cached, seq.num_tokens)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            if seq.scheduled_at is None:  # first admission (a preempted sequence comes back later)
                seq.scheduled_at = time.monotonic()
            self.running.append(seq)
            budget -= took
        return batch

    def _add_chunk(self, batch: ScheduledBatch, seq: Sequence, budget: int) -> int:
        n = min(seq.num_tokens - seq.num_computed, self.chunk_size, budget)
        # Shrink the chunk to the pages we have rather than waiting for a whole chunk's worth.
        spare = (self.pool.num_available + len(seq.pages)) * self.pool.page_size - seq.num_computed
        n, images = self._within_vision_budget(batch, seq, min(n, spare))
        if n <= 0:
            return 0
        self.pool.grow(seq, seq.num_computed + n)
        batch.seqs.append(seq)
        batch.num_new.append(n)
        batch.images.update(images)
        return n

    def _within_vision_budget(self, batch: ScheduledBatch, seq: Sequence, n: int) -> tuple[int, dict[str, int]]:
        """Cut a chunk of n tokens before the first image that would take the step past the vision budget;
        return the cut length and the images the chunk encodes (hash -> feature rows)."""
        images: dict[str, int] = {}
        rows = sum(batch.images.values())
        start, end = seq.num_computed, seq.num_computed + n
        for k, span in enumerate(seq.spans):
            h = span.image.hash
            if (span.end <= start or span.start >= end or k in seq.image_embeds or h in batch.images or h in images
                    or self.is_encoded(h)):
                continue
            cost = span.image.num_feature_rows
            if self.vision_budget and rows and rows + cost > self.vision_budget:
                return span.start - start, images
            images[h] = cost
            rows += cost
        return n, images

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq)
        seq.status = Status.WAITING
        seq.image_embeds.clear()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and give its pages back (cached pages stay reusable)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq)
        seq.status = Status.FINISHED
        seq.image_embeds.clear()

    def after_step(self, batch: ScheduledBatch) -> None:
        """Advance computed counts and register newly full pages in the prefix cache."""
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_computed += n
            self.pool.commit(seq)
