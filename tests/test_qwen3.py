"""Our paged Qwen3 decoder against transformers' Qwen3ForCausalLM on the tiny checkpoint's text weights."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from stepserve.layers.attention import build_context, forward_context
from stepserve.loader import load_model
from stepserve.testing import attach_kv_cache

PAGE_SIZE = 4  # small, so every sequence spans several pages
NUM_PAGES = 128
# float32 on both sides; the two differ only in summation order (fused vs separate GEMMs, paged attention).
ATOL, RTOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def ours(tiny_model_dir):
    model = load_model(tiny_model_dir, torch.float32, "cpu")
    attach_kv_cache(model, NUM_PAGES, PAGE_SIZE)
    return model


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**json.loads((tiny_model_dir / "config.json").read_text())["text_config"])
    model = Qwen3ForCausalLM(config).eval()
    state = {}
    for shard in sorted(tiny_model_dir.glob("*.safetensors")):
        state |= {k: v.float() for k, v in load_file(shard).items() if k.startswith(("model.", "lm_head."))}
    model.load_state_dict(state, strict=True)
    return model


class Paged:
    """Page bookkeeping for a few sequences; page ids are handed out in shuffled order (non-contiguous)."""

    def __init__(self, seed: int = 0):
        self.free = list(range(1, NUM_PAGES))  # page 0 stays unused, like padding in block tables
        random.Random(seed).shuffle(self.free)
        self.pages: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def step(self, model, batch: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """Append `batch[seq]` tokens to each sequence in one flat forward; returns each one's logits [q, V]."""
        ids, positions, q_lens, kv_lens, tables = [], [], [], [], []
        for seq, tokens in batch.items():
            start = self.lens.get(seq, 0)
            end = self.lens[seq] = start + len(tokens)
            pages = self.pages.setdefault(seq, [])
            while len(pages) * PAGE_SIZE < end:
                pages.append(self.free.pop())
            ids += tokens
            positions += range(start, end)
            q_lens.append(len(tokens))
            kv_lens.append(end)
            tables.append(list(pages))
        ctx = build_context(q_lens, kv_lens, tables, PAGE_SIZE)
        with torch.inference_mode(), forward_context(ctx):
            logits = model.compute_logits(model(torch.tensor(ids), torch.tensor(positions)))
        return dict(zip(batch, logits.split(q_lens)))


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 880, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_logits(reference, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return reference(torch.tensor([tokens])).logits[0].float()


def test_prefill_logits_match_transformers(ours, reference):
    tokens = prompt(37, seed=1)
    got = Paged().step(ours, {"a": tokens})["a"]
    want = reference_logits(reference, tokens)
    assert got.dtype == torch.float32 and got.shape == want.shape == (37, ours.vocab_size)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert want.std() > 0.1  # the comparison is not between near-constant logits


def test_greedy_decode_matches_transformers(ours, reference):
    tokens = prompt(23, seed=2)
    pager = Paged(seed=3)
    logits = pager.step(ours, {"s": tokens})["s"]
    ours_out, ref_out = [], []
    ref_seq = list(tokens)
    for _ in range(32):
        nxt = int(logits[-1].argmax())
        ours_out.append(nxt)
        logits = pager.step(ours, {"s": [nxt]})["s"]
        ref_next = int(reference_logits(reference, ref_seq)[-1].argmax())
        ref_out.append(ref_next)
        ref_seq.append(ref_next)
    assert ours_out == ref_out
    assert len(set(ours_out)) > 3  # a real sequence, not one token repeated
    torch.testing.assert_close(logits[-1], reference_logits(reference, ref_seq)[-1], atol=ATOL, rtol=RTOL)


def test_batched_step_equals_sequences_alone(ours):
    a, b = prompt(19, seed=4), prompt(7, seed=5)
    alone_a, alone_b = Paged(seed=6), Paged(seed=7)
    together = Paged(seed=8)
    want = {"a": alone_a.step(ours, {"a": a})["a"], "b": alone_b.step(ours, {"b": b})["b"]}
    got = together.step(ours, {"a": a, "b": b})
    for seq in "ab":
        torch.testing.assert_close(got[seq], want[seq], atol=ATOL, rtol=RTOL)
    # A mixed step: "a" decodes one token while "b" prefills a second chunk of three.
    want_a = alone_a.step(ours, {"a": [5]})["a"]
    want_b = alone_b.step(ours, {"b": [6, 7, 8]})["b"]
    got = together.step(ours, {"a": [5], "b": [6, 7, 8]})
    torch.testing.assert_close(got["a"], want_a, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got["b"], want_b, atol=ATOL, rtol=RTOL)


def test_chunked_prefill_equals_one_shot(ours):
    tokens = prompt(30, seed=9)
    one = Paged(seed=10).step(ours, {"s": tokens})["s"]
    chunked = Paged(seed=11)
    parts = [chunked.step(ours, {"s": tokens[i:i + 11]})["s"] for i in range(0, 30, 11)]
    torch.testing.assert_close(torch.cat(parts), one, atol=ATOL, rtol=RTOL)


def test_model_exposes_runner_attributes(ours, tiny_model_dir):
    text = json.loads((tiny_model_dir / "config.json").read_text())["text_config"]
    assert len(ours.attention_layers()) == ours.num_layers == text["num_hidden_layers"]
    assert (ours.num_kv_heads, ours.head_dim) == (text["num_key_value_heads"], text["head_dim"])
    assert (ours.vocab_size, ours.hidden_size) == (text["vocab_size"], text["hidden_size"])
