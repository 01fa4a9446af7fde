"""Page accounting for the paged KV cache, with a prefix cache over full pages.

A full page is named by a hash chained over every key before it (token ids, with image rows keyed by
image content: see `request.cache_keys`), so a page can be shared by any sequence whose first
`(i + 1) * page_size` keys are the same. Pages nobody holds but whose hash is known stay cached and are
evicted least-recently-used when free pages run out. The KV tensors themselves live in the model runner.
"""

from __future__ import annotations

from collections import OrderedDict

from stepserve.engine.request import Sequence


def page_hash(parent: int, keys: list[int]) -> int:
    return hash((parent, tuple(keys)))


class PagePool:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_cache: bool = True):
        self.num_pages, self.page_size = num_pages, page_size
        self.enable_prefix_cache = enable_prefix_cache
        self.free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self.ref = [0] * num_pages
        self.hash_of: dict[int, int] = {}  # page -> hash
        self.page_of: dict[int, int] = {}  # hash -> page
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached pages with ref 0, LRU first
        self.hit_tokens = 0
        self.queried_tokens = 0

    # -- capacity ---------------------------------------------------------------------------------
    @property
    def num_available(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_available / self.num_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _take(self) -> int:
        if self.free:
            page = self.free.pop()
        else:
            page, _ = self.evictable.popitem(last=False)
            del self.page_of[self.hash_of.pop(page)]
        self.ref[page] = 1
        return page

    # -- per sequence -----------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Attach the longest cached run of full pages of a fresh sequence; returns tokens reused.

        At least one token is always left to compute, since the last position's logits are needed.
        """
        assert not seq.pages and seq.num_computed == 0
        if not self.enable_prefix_cache:
            return 0
        parent, limit = 0, (seq.num_tokens - 1) // self.page_size
        for i in range(limit):
            h = page_hash(parent, [seq.key_at(j) for j in range(i * self.page_size, (i + 1) * self.page_size)])
            page = self.page_of.get(h)
            if page is None:
                break
            if self.ref[page] == 0:
                self.evictable.pop(page)
            self.ref[page] += 1
            seq.pages.append(page)
            seq.page_hashes.append(h)
            parent = h
        seq.num_hashed_pages = len(seq.pages)
        seq.num_computed = len(seq.pages) * self.page_size
        return seq.num_computed

    def record_lookup(self, hit_tokens: int, num_tokens: int) -> None:
        self.hit_tokens += hit_tokens
        self.queried_tokens += num_tokens

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.pages_for(num_tokens) - len(seq.pages) <= self.num_available

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make the sequence's pages cover its first `num_tokens` tokens."""
        need = self.pages_for(num_tokens) - len(seq.pages)
        if need > self.num_available:
            raise RuntimeError("KV pool exhausted: the scheduler must check can_grow first")
        seq.pages.extend(self._take() for _ in range(need))

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly filled pages (all of whose tokens have K/V) in the prefix cache."""
        if not self.enable_prefix_cache:
            return
        full = min(seq.num_computed, seq.num_known) // self.page_size
        parent = seq.page_hashes[-1] if seq.page_hashes else 0
        for i in range(seq.num_hashed_pages, full):
            h = page_hash(parent, [seq.key_at(j) for j in range(i * self.page_size, (i + 1) * self.page_size)])
            page = seq.pages[i]
            if h not in self.page_of and page not in self.hash_of:
                self.page_of[h], self.hash_of[page] = page, h
            seq.page_hashes.append(h)
            parent = h
        seq.num_hashed_pages = full

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's hold on its pages; cached ones stay reusable until evicted."""
        for page in reversed(seq.pages):  # reversed: a prefix's tail is evicted before its head
            self.ref[page] -= 1
            if self.ref[page] == 0:
                if page in self.hash_of:
                    self.evictable[page] = None
                else:
                    self.free.append(page)
        seq.pages, seq.page_hashes = [], []
        seq.num_hashed_pages = 0
        seq.num_computed = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def check_invariants(self) -> None:
        """Every page is exactly one of: free, held (ref > 0), or cached-evictable."""
        held = sum(1 for r in self.ref if r > 0)
        assert held + len(self.free) + len(self.evictable) == self.num_pages, "page leak"
        assert all(self.ref[p] == 0 for p in self.free) and all(self.ref[p] == 0 for p in self.evictable)
