import pytest
import torch

from stepserve.multimodal.encoder_cache import EncoderCache


def test_get_put_and_counters():
    cache = EncoderCache(2)
    assert cache.get("a") is None
    t = torch.ones(3, 4)
    cache.put("a", t)
    assert cache.get("a") is t
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.hit_rate == 0.5


def test_evicts_least_recently_used():
    cache = EncoderCache(2)
    cache.put("a", torch.zeros(1))
    cache.put("b", torch.zeros(1))
    cache.get("a")  # b is now the oldest use
    cache.put("c", torch.zeros(1))
    assert "a" in cache and "c" in cache and "b" not in cache
    assert len(cache) == 2


def test_put_existing_key_refreshes_it():
    cache = EncoderCache(2)
    cache.put("a", torch.zeros(1))
    cache.put("b", torch.zeros(1))
    cache.put("a", torch.ones(1))
    cache.put("c", torch.zeros(1))
    assert "b" not in cache and cache.get("a").item() == 1.0


def test_zero_capacity_disables_and_empty_hit_rate():
    cache = EncoderCache(0)
    cache.put("a", torch.zeros(1))
    assert cache.get("a") is None and len(cache) == 0
    assert EncoderCache(1).hit_rate == 0.0
    with pytest.raises(ValueError):
        EncoderCache(-1)
