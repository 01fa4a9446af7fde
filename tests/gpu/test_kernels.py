"""Triton kernels vs the plain-torch references on the GPU, bf16 at Qwen3-8B sizes (32 q heads, 8 kv heads,
head_dim 128), fresh random inputs each case. Attention is compared with the reference run in float32.
"""

from __future__ import annotations

import pytest
import torch

from stepserve.kernels import (apply_rotary, decode_attention, extend_attention, fused_add_rms_norm,
                               paged_attention, qk_norm_rope, rms_norm, silu_and_mul)
from stepserve.layers import activation as act_ref
from stepserve.layers import norm as norm_ref
from stepserve.layers import rotary as rope_ref
from stepserve.layers.attention import build_context, paged_attention_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HQ, HKV, D = 32, 8, 128
SCALE = D ** -0.5
DEV = "cuda"


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _paged_case(q_lens, kv_lens, page_size, kv_dtype=torch.bfloat16, kv_scale=1.0, spare_pages=7):
    """Random q and cache; each sequence gets randomly chosen (scattered) pages of a larger pool."""
    pages_per_seq = [(kv + page_size - 1) // page_size for kv in kv_lens]
    total = sum(pages_per_seq) + spare_pages
    perm = torch.randperm(total).tolist()
    tables, i = [], 0
    for n in pages_per_seq:
        tables.append(perm[i:i + n])
        i += n
    kv_cache = (torch.randn(2, total, page_size, HKV, D, device=DEV) / kv_scale).to(kv_dtype)
    ctx = build_context(q_lens, kv_lens, tables, page_size, device=DEV, kv_scale=kv_scale)
    q = torch.randn(sum(q_lens), HQ, D, device=DEV, dtype=torch.bfloat16)
    return q, kv_cache, ctx


def _reference(q, kv_cache, ctx):
    return paged_attention_reference(q.float(), kv_cache, ctx, SCALE)


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("batch,max_kv", [(1, 1536), (1, 8192), (3, 100), (64, 2048), (256, 8192)])
def test_decode_attention(page_size, batch, max_kv):
    kv_lens = torch.randint(1, max_kv + 1, (batch,)).tolist()
    kv_lens[0] = max_kv
    q, kv_cache, ctx = _paged_case([1] * batch, kv_lens, page_size)
    out = paged_attention(q, kv_cache, ctx, SCALE)
    assert _rel_err(out, _reference(q, kv_cache, ctx)) < 1e-2


@pytest.mark.parametrize("num_splits", [1, 2, 7, 64])
def test_decode_any_split_count(num_splits):
    q, kv_cache, ctx = _paged_case([1] * 5, [1, 17, 64, 1000, 3001], 16)
    out = decode_attention(q, kv_cache, ctx, SCALE, num_splits=num_splits)
    assert _rel_err(out, _reference(q, kv_cache, ctx)) < 1e-2


@pytest.mark.parametrize("page_size", [16, 64])
def test_decode_fp8_cache(page_size):
    q, kv_cache, ctx = _paged_case([1] * 9, torch.randint(1, 4096, (9,)).tolist(), page_size,
                                   kv_dtype=torch.float8_e4m3fn, kv_scale=0.05)
    assert _rel_err(paged_attention(q, kv_cache, ctx, SCALE), _reference(q, kv_cache, ctx)) < 1e-2


def test_decode_cuda_graph_replays_new_lengths():
    """Captured once, replayed after the batch's lengths, pages and queries change in place."""
    batch, page_size, max_pages = 8, 16, 512
    q = torch.randn(batch, HQ, D, device=DEV, dtype=torch.bfloat16)
    kv_cache = torch.randn(2, batch * max_pages + 1, page_size, HKV, D, device=DEV).to(torch.bfloat16)
    tables = [list(range(i * max_pages, (i + 1) * max_pages)) for i in range(batch)]
    ctx = build_context([1] * batch, [1] * batch, tables, page_size, device=DEV)
    ctx.max_kv_len = max_pages * page_size  # what the runner captures with: the longest context
    decode_attention(q, kv_cache, ctx, SCALE)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, kv_cache, ctx, SCALE)
    for _ in range(3):
        kv_lens = torch.randint(1, max_pages * page_size + 1, (batch,)).tolist()
        perm = torch.randperm(batch * max_pages).view(batch, max_pages).to(torch.int32)
        ctx.kv_lens.copy_(torch.tensor(kv_lens, dtype=torch.int32))
        ctx.block_tables.copy_(perm)
        q.copy_(torch.randn_like(q))
        graph.replay()
        new = build_context([1] * batch, kv_lens, perm.tolist(), page_size, device=DEV)
        assert _rel_err(out, _reference(q, kv_cache, new)) < 1e-2


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_extend_mixed_batch(page_size, kv_dtype):
    # Fresh prefills, chunks after a cached prefix, and decodes mixed in one batch.
    q_lens = [1536, 1, 700, 33, 1, 2048, 129]
    kv_lens = [1536, 8000, 4000, 33, 1, 8192, 300]
    kv_scale = 0.05 if kv_dtype == torch.float8_e4m3fn else 1.0
    q, kv_cache, ctx = _paged_case(q_lens, kv_lens, page_size, kv_dtype=kv_dtype, kv_scale=kv_scale)
    out = paged_attention(q, kv_cache, ctx, SCALE)
    assert _rel_err(out, _reference(q, kv_cache, ctx)) < 1e-2


@pytest.mark.parametrize("batch", [1, 16, 100])
def test_extend_random_batches(batch):
    q_lens = torch.randint(1, 600, (batch,)).tolist()
    kv_lens = [q + int(torch.randint(0, 3000, ())) for q in q_lens]
    q, kv_cache, ctx = _paged_case(q_lens, kv_lens, 16)
    out = extend_attention(q, kv_cache, ctx, SCALE)
    assert _rel_err(out, _reference(q, kv_cache, ctx)) < 1e-2


def test_attention_strided_q_from_fused_qkv():
    q_lens, kv_lens = [5, 300], [50, 300]
    q, kv_cache, ctx = _paged_case(q_lens, kv_lens, 16)
    qkv = torch.randn(q.shape[0], (HQ + 2 * HKV) * D, device=DEV, dtype=torch.bfloat16)
    q = qkv[:, : HQ * D].view(-1, HQ, D)
    assert _rel_err(paged_attention(q, kv_cache, ctx, SCALE), _reference(q, kv_cache, ctx)) < 1e-2
    dq, dkv, dctx = _paged_case([1, 1], [70, 700], 16)
    dq = qkv[:2, : HQ * D].view(-1, HQ, D)
    assert _rel_err(paged_attention(dq, dkv, dctx, SCALE), _reference(dq, dkv, dctx)) < 1e-2


def _assert_bf16_close(out: torch.Tensor, ref: torch.Tensor, atol: float = 1e-5) -> None:
    """Within two bf16 rounding steps everywhere and bit-equal almost everywhere.

    `atol` covers outputs that are a difference of larger values (rotary: x1 cos - x2 sin), where one
    rounding step of the O(1) inputs taken at another point shows as a large relative error of a small result.

    float32 sums, rsqrt and exp may differ in their last bits from torch's and flip a rounding; a kernel
    that rounds at different points than the reference (e.g. multiplies the weight in float32) would
    differ in a large fraction of elements instead.
    """
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -6, atol=atol)
    equal = (out == ref).float().mean().item()
    assert equal > 0.95, f"only {equal:.1%} of elements bit-equal to the reference"


@pytest.mark.parametrize("T", [1, 7, 4096])
def test_rms_norm(T):
    x = torch.randn(T, 4096, device=DEV, dtype=torch.bfloat16) * 3
    w = torch.randn(4096, device=DEV, dtype=torch.bfloat16)
    _assert_bf16_close(rms_norm(x, w, 1e-6), norm_ref.rms_norm.reference(x, w, 1e-6))
    res = torch.randn_like(x)
    y, s = fused_add_rms_norm(x, res, w, 1e-6)
    y_ref, s_ref = norm_ref.fused_add_rms_norm.reference(x, res, w, 1e-6)
    assert torch.equal(s, s_ref)
    _assert_bf16_close(y, y_ref)


def _qk(T: int):
    qkv = torch.randn(T, (HQ + 2 * HKV) * D, device=DEV, dtype=torch.bfloat16)
    q = qkv[:, : HQ * D].view(T, HQ, D)
    k = qkv[:, HQ * D: (HQ + HKV) * D].view(T, HKV, D)
    positions = torch.randint(0, 40960, (T,), device=DEV)
    cache = rope_ref.rotary_cos_sin_cache(D, 40960, 1_000_000.0, device=DEV)
    return qkv, q, k, positions, cache


@pytest.mark.parametrize("T", [1, 33, 8192])
def test_rotary_and_qk_norm_rope(T):
    qkv, q, k, positions, cache = _qk(T)
    v_before = qkv[:, (HQ + HKV) * D:].clone()
    q_ref, k_ref = rope_ref.apply_rotary.reference(q, k, positions, cache)
    apply_rotary(q, k, positions, cache)
    _assert_bf16_close(q, q_ref, atol=2 ** -6)
    _assert_bf16_close(k, k_ref, atol=2 ** -6)
    assert torch.equal(qkv[:, (HQ + HKV) * D:], v_before)

    _, q, k, positions, cache = _qk(T)
    qw = torch.randn(D, device=DEV, dtype=torch.bfloat16)
    kw = torch.randn(D, device=DEV, dtype=torch.bfloat16)
    q_ref, k_ref = rope_ref.qk_norm_rope.reference(q, k, qw, kw, 1e-6, positions, cache)
    qk_norm_rope(q, k, qw, kw, 1e-6, positions, cache)
    _assert_bf16_close(q, q_ref, atol=2 ** -6)
    _assert_bf16_close(k, k_ref, atol=2 ** -6)


@pytest.mark.parametrize("T", [1, 300, 4096])
def test_silu_and_mul(T):
    x = torch.randn(T, 2 * 12288, device=DEV, dtype=torch.bfloat16) * 4
    _assert_bf16_close(silu_and_mul(x), act_ref.silu_and_mul.reference(x))
