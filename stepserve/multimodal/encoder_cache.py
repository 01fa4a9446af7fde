"""Image hash -> vision embeddings, least recently used first out.

A repeated image (same pixels, any encoding) skips the vision tower. Not thread-safe: only the engine thread
touches it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"encoder cache capacity must be >= 0, got {capacity}")
        self.capacity = capacity  # in images; 0 disables caching
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        tensor = self._entries.get(key)
        if tensor is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return tensor

    def __contains__(self, key: str) -> bool:  # a look that counts as neither hit nor miss
        return key in self._entries

    def put(self, key: str, tensor: torch.Tensor) -> None:
        if self.capacity == 0:
            return
        self._entries[key] = tensor
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry and the hit counts."""
        self._entries.clear()
        self.hits = self.misses = 0

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def __len__(self) -> int:
        return len(self._entries)
