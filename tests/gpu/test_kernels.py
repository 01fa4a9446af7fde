"""Triton kernels vs the plain-torch references on the GPU, bf16 at Qwen3-8B sizes (32 q heads, 8 kv heads,
head_dim 128), fresh random inputs each case. Attention is compared with the reference run in float32.
Then PDL on vs off (each kernel, and a graph-captured chain of them), and last the tiny decoder through the
runner's decode graphs against its plain-torch layers.
"""

from __future__ import annotations

import functools
import itertools
import importlib.util
from pathlib import Path

import pytest
import torch

from stepserve.kernels import (apply_rotary, decode_attention, extend_attention, fused_add_rms_norm,
                               paged_attention, pdl, qk_norm_rope, qk_norm_rope_store_kv, rms_norm, silu_and_mul)
from stepserve.kernels.paged_attention import StepKV
from stepserve.layers import activation as act_ref
from stepserve.layers import attention
from stepserve.layers import norm as norm_ref
from stepserve.layers import rotary as rope_ref
from stepserve.layers.attention import build_context, forward_context, paged_attention_reference

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
    for _ in range(5):
        kv_lens = torch.randint(1, max_pages * page_size + 1, (batch,)).tolist()
        perm = torch.randperm(batch * max_pages).view(batch, max_pages).to(torch.int32)
        ctx.kv_lens.copy_(torch.tensor(kv_lens, dtype=torch.int32))
        ctx.block_tables.copy_(perm)
        q.copy_(torch.randn_like(q))
        graph.replay()
        new = build_context([1] * batch, kv_lens, perm.tolist(), page_size, device=DEV)
        assert _rel_err(out, _reference(q, kv_cache, new)) < 1e-2


@pytest.mark.parametrize("kv_dtype,kv_scale", [(torch.bfloat16, 1.0), (torch.float8_e4m3fn, 0.05)])
@pytest.mark.parametrize("batch,max_kv,num_splits", [(1, 1536, None), (1, 1536, 64), (5, 3001, 7), (64, 2048, None)])
def test_decode_with_qk_norm_rope_and_store(kv_dtype, kv_scale, batch, max_kv, num_splits):
    """The decode kernel doing Qwen3's q/k norm, rotation and K/V store (`step_kv`) against the rotary-and-store
    reference followed by the attention reference: output, and the cache everywhere."""
    page_size = 16
    kv_lens = torch.randint(1, max_kv + 1, (batch,)).tolist()
    kv_lens[0] = max_kv
    _, kv_cache, ctx = _paged_case([1] * batch, kv_lens, page_size, kv_dtype=kv_dtype, kv_scale=kv_scale)
    qkv, q, k, positions, cos_sin = _qk(batch)
    v = qkv[:, (HQ + HKV) * D:].view(batch, HKV, D)
    positions.copy_(torch.tensor(kv_lens, device=DEV) - 1)
    qw, kw = torch.randn(2, D, device=DEV, dtype=torch.bfloat16)
    cache_ref, qkv_before = kv_cache.clone(), qkv.clone()
    q_rot = attention.qk_norm_rope_store_kv.reference(q, k, v, qw, kw, 1e-6, positions, cos_sin, cache_ref,
                                                      ctx.slot_mapping, kv_scale)
    out = decode_attention(q, kv_cache, ctx, SCALE, num_splits=num_splits,
                           step_kv=StepKV(k, v, qw, kw, 1e-6, positions, cos_sin))
    assert torch.equal(qkv, qkv_before)
    assert _rel_err(out, _reference(q_rot, cache_ref, ctx)) < 1e-2
    if kv_dtype == torch.bfloat16:
        _assert_bf16_close(kv_cache, cache_ref, atol=2 ** -6)
    else:
        torch.testing.assert_close(kv_cache.float(), cache_ref.float(), rtol=2 ** -3, atol=2 ** -6)


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


def test_prefills_of_any_length_reuse_one_build():
    """Block-table widths and sequence counts that are 1 or multiples of 16 (a 1523-token prompt has 96 pages), or
    batches of more than 16 sequences, must not build the extend kernel again: each build cost a user's request
    ~1 s on the H100. (Decode runs in CUDA graphs captured at start-up.)"""
    import triton

    builds = []
    hook = triton.knobs.runtime.jit_post_compile_hook
    for q_lens in ([300], [5, 7]):  # compiled here, if this process has not already
        extend_attention(*_paged_case(q_lens, [q + 3 for q in q_lens], 16), SCALE)
    triton.knobs.runtime.jit_post_compile_hook = lambda *, repr, **_: builds.append(repr)
    try:
        for q_lens in ([1523], [255, 1], [16] * 16, [1, 2, 3], [250, 260], [3] * 40):
            q, kv_cache, ctx = _paged_case(q_lens, [q + 3 for q in q_lens], 16)
            out = extend_attention(q, kv_cache, ctx, SCALE)
            assert _rel_err(out, _reference(q, kv_cache, ctx)) < 1e-2
    finally:
        triton.knobs.runtime.jit_post_compile_hook = hook
    assert builds == []


@pytest.mark.parametrize("kv_dtype,kv_scale", [(torch.bfloat16, 1.0), (torch.float8_e4m3fn, 0.05)])
def test_mixed_steps_split_decodes_without_new_builds(kv_dtype, kv_scale):
    """Prefill chunks after 32+ decodes (qk_norm_rope_attend: the decodes through the decode kernel, the chunks
    through rotary-and-store + extend) against the reference, output and cache; after one such step, other
    decode counts (so other offsets into the step's metadata, odd ones included) build no kernel again."""
    import triton

    from stepserve.kernels.paged_attention import MIN_MIXED_DECODES, qk_norm_rope_attend

    builds = []
    hook = triton.knobs.runtime.jit_post_compile_hook
    for i, decodes in enumerate([96, MIN_MIXED_DECODES, 33, 95, 50]):
        q_lens = [1] * decodes + [1437, 300]
        kv_lens = torch.randint(100, 2500, (decodes,)).tolist() + [1437, 900]
        _, kv_cache, ctx = _paged_case(q_lens, kv_lens, 16, kv_dtype=kv_dtype, kv_scale=kv_scale)
        T = sum(q_lens)
        qkv, q, k, positions, cos_sin = _qk(T)
        v = qkv[:, (HQ + HKV) * D:].view(T, HKV, D)
        positions.copy_(torch.tensor([n - 1 for n in kv_lens[:decodes]] + list(range(1437)) + list(range(600, 900)),
                                     device=DEV))
        qw, kw = torch.randn(2, D, device=DEV, dtype=torch.bfloat16)
        cache_ref = kv_cache.clone()
        ref = attention.qk_norm_rope_attend.reference(q.clone(), k, v, qw, kw, 1e-6, positions, cos_sin, cache_ref,
                                                      ctx, SCALE)
        if i >= 1:
            triton.knobs.runtime.jit_post_compile_hook = lambda *, repr, **_: builds.append(repr)
        try:
            out = qk_norm_rope_attend(q, k, v, qw, kw, 1e-6, positions, cos_sin, kv_cache, ctx, SCALE)
        finally:
            triton.knobs.runtime.jit_post_compile_hook = hook
        assert _rel_err(out[:decodes], ref[:decodes]) < 1e-2, decodes
        assert _rel_err(out[decodes:], ref[decodes:]) < 1e-2, decodes
        if kv_dtype == torch.bfloat16:
            _assert_bf16_close(kv_cache, cache_ref, atol=2 ** -6)
        else:  # one fp8 step (2^-3 relative), or for a small rotated k one bf16 step of its O(1) terms, scaled
            torch.testing.assert_close(kv_cache.float(), cache_ref.float(), rtol=2 ** -3, atol=2 ** -8 / kv_scale)
            assert (kv_cache.float() == cache_ref.float()).float().mean() > 0.99
    assert builds == []


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


@pytest.mark.parametrize("kv_dtype,kv_scale", [(torch.bfloat16, 1.0), (torch.float8_e4m3fn, 1.0),
                                               (torch.float8_e4m3fn, 0.05)])
@pytest.mark.parametrize("T", [1, 8, 33, 4096])
def test_qk_norm_rope_store_kv(T, kv_dtype, kv_scale):
    """Against qk_norm_rope + store_kv: q in place, k/v only read, the cache bit-equal almost everywhere
    (float32 sums may flip a rounding). The last tokens are CUDA-graph padding rows with equal inputs, all
    storing to the scratch slot; the others go to shuffled slots of a pool."""
    page_size, pad = 16, min(T - 1, 3)
    num_pages = T // page_size + 4
    slots = torch.randperm(num_pages * page_size, device=DEV)[:T]
    scratch = num_pages * page_size  # first slot of the extra page
    slots[T - pad:] = scratch
    qkv, q, k, positions, cos_sin = _qk(T)
    qkv[T - pad:] = qkv[T - 1]
    positions[T - pad:] = positions[T - 1]
    v = qkv[:, (HQ + HKV) * D:].view(T, HKV, D)
    qkv[:, (HQ + HKV) * D: (HQ + HKV) * D + 2] = 1e4  # past the fp8 range: saturates
    qw = torch.randn(D, device=DEV, dtype=torch.bfloat16)
    kw = torch.randn(D, device=DEV, dtype=torch.bfloat16)
    cache = torch.randn(2, num_pages + 1, page_size, HKV, D, device=DEV).to(kv_dtype)
    cache_ref, kv_before = cache.clone(), qkv[:, HQ * D:].clone()
    q_ref = attention.qk_norm_rope_store_kv.reference(q, k, v, qw, kw, 1e-6, positions, cos_sin, cache_ref,
                                                      slots, kv_scale)
    assert qk_norm_rope_store_kv(q, k, v, qw, kw, 1e-6, positions, cos_sin, cache, slots, kv_scale) is q
    _assert_bf16_close(q, q_ref, atol=2 ** -6)
    assert torch.equal(qkv[:, HQ * D:], kv_before)
    if kv_dtype == torch.bfloat16:
        _assert_bf16_close(cache, cache_ref, atol=2 ** -6)
    else:  # one fp8 step is 2^-3 relative
        torch.testing.assert_close(cache.float(), cache_ref.float(), rtol=2 ** -3, atol=2 ** -6)
        assert (cache.float() == cache_ref.float()).float().mean() > 0.99
        assert cache[1].float().view(-1, HKV, D)[slots[0], 0, :2].tolist() == [448.0, 448.0]


needs_pdl = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                               reason="PDL needs compute capability 9.0 or later")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _same_bits(got, want) -> bool:
    return len(got) == len(want) and all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, want))


def _norm_case():
    x, res = torch.randn(2, 7, 4096, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(4096, device=DEV, dtype=torch.bfloat16)
    return lambda: (rms_norm(x, w, 1e-6), *fused_add_rms_norm(x, res, w, 1e-6))


def _rope_case(kv_dtype):
    T, page_size = 33, 16
    qkv, _, _, positions, cos_sin = _qk(T)
    qw, kw = torch.randn(2, D, device=DEV, dtype=torch.bfloat16)
    cache = torch.randn(2, 4, page_size, HKV, D, device=DEV).to(kv_dtype)
    slots = torch.randperm(4 * page_size, device=DEV)[:T]

    def run():  # in place on copies, so every call starts from the same inputs
        x, c = qkv.clone(), cache.clone()
        q, k, v = (t.view(T, -1, D) for t in x.split([HQ * D, HKV * D, HKV * D], dim=-1))
        qk_norm_rope_store_kv(q, k, v, qw, kw, 1e-6, positions, cos_sin, c, slots, 0.05)
        apply_rotary(q, v, positions, cos_sin)
        return x, c
    return run


def _attention_case(kv_dtype):
    kv_scale = 0.05 if kv_dtype == torch.float8_e4m3fn else 1.0
    q, kv_cache, ctx = _paged_case([1] * 3, [1, 700, 3001], 16, kv_dtype=kv_dtype, kv_scale=kv_scale)
    qe, kve, ctxe = _paged_case([1, 300, 40], [900, 300, 100], 16, kv_dtype=kv_dtype, kv_scale=kv_scale)
    return lambda: (decode_attention(q, kv_cache, ctx, SCALE, num_splits=1),
                    decode_attention(q, kv_cache, ctx, SCALE, num_splits=7), extend_attention(qe, kve, ctxe, SCALE))


_PDL_CASES = {"norm": _norm_case,
              "rope bf16": functools.partial(_rope_case, torch.bfloat16),
              "rope fp8": functools.partial(_rope_case, torch.float8_e4m3fn),
              "attention bf16": functools.partial(_attention_case, torch.bfloat16),
              "attention fp8": functools.partial(_attention_case, torch.float8_e4m3fn)}


@needs_pdl
@pytest.mark.parametrize("case", _PDL_CASES.values(), ids=_PDL_CASES.keys())
def test_pdl_on_equals_off(monkeypatch, case):
    """Each kernel launched with PDL gives the bits it gives without (eager launches, one after another)."""
    run = case()
    monkeypatch.setenv("STEPSERVE_PDL", "0")
    assert not pdl.enabled(torch.device(DEV))
    off = run()
    monkeypatch.setenv("STEPSERVE_PDL", "1")
    assert pdl.enabled(torch.device(DEV))
    assert _same_bits(run(), off)


def _bench_kernels():
    """benchmarks/kernels.py, whose `decode_chain` --pdl-chain times: the test checks the very chain timed there."""
    path = Path(__file__).parents[2] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_pdl
@pytest.mark.parametrize("fused", [False, True], ids=["rope kernel", "rope in decode"])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_pdl_graph_chain_equals_off(monkeypatch, kv_dtype, fused):
    """Six layers of norm -> rope + KV store -> split decode -> reduce -> next norm, each reading the one before,
    captured in a graph with PDL off and on and replayed on new inputs: the hidden state, the residual and every
    cache as the chain launched eagerly without PDL leaves them, bit for bit. New inputs each replay make a
    kernel that read before its predecessor finished see the previous replay's values, and fail."""
    run, caches = _bench_kernels().decode_chain(6, 1000, 7, kv_dtype, fused)
    inputs = [torch.randn(2, 1, 4096, device=DEV, dtype=torch.bfloat16) for _ in range(4)]
    monkeypatch.setenv("STEPSERVE_PDL", "0")
    want = [[t.clone() for t in (*run(*x), *caches)] for x in inputs]
    for on in ("0", "1"):
        monkeypatch.setenv("STEPSERVE_PDL", on)
        x = inputs[-1].clone()
        run(*x)  # compiles this setting's kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run(*x)
        for new, expected in zip(inputs, want):
            x.copy_(new)
            graph.replay()
            assert _same_bits((*out, *caches), expected), f"STEPSERVE_PDL={on}"


def test_tiny_decoder_through_decode_graphs(tmp_path):
    """Prefill of three sequences, then two decode steps replayed from graphs captured for a 4k context
    (many KV splits, most empty) at batch 4, so one padding row stores to the scratch slot: Triton kernels
    against the plain-torch layers, bf16 and fp8 caches."""
    from stepserve.engine.cuda_graph import DecodeGraphs
    from stepserve.kernels import install_triton_kernels
    from stepserve.loader import load_model
    from stepserve.testing import attach_kv_cache, tiny_checkpoint

    model = load_model(tiny_checkpoint(tmp_path / "tiny"), torch.bfloat16, DEV)
    page, lens, context = 16, [40, 17, 70], 4096
    pages_per_seq = [(n + 2 + page - 1) // page for n in lens]
    perm = torch.randperm(sum(pages_per_seq)).tolist()
    tables = [perm[sum(pages_per_seq[:i]): sum(pages_per_seq[: i + 1])] for i in range(len(lens))]
    num_pages = len(perm)
    prompts = [torch.randint(0, 800, (n,), device=DEV) for n in lens]
    for kv_dtype, kv_scale in ((torch.bfloat16, 1.0), (torch.float8_e4m3fn, 0.05)):
        logits = {}
        for kernels in (False, True):
            install_triton_kernels(kernels)
            try:
                attach_kv_cache(model, num_pages + 1, page, kv_dtype)
                steps = []
                with torch.inference_mode():
                    ctx = build_context(lens, lens, tables, page, DEV, kv_scale=kv_scale)
                    positions = torch.cat([torch.arange(n, device=DEV) for n in lens])
                    with forward_context(ctx):
                        hidden = model(torch.cat(prompts), positions)
                    last = ctx.cu_q_lens[1:].long() - 1
                    steps.append(model.compute_logits(hidden[last]))
                    if kernels:
                        graphs = DecodeGraphs(model, 4, context // page, context, num_pages * page,
                                              torch.device(DEV), kv_scale)
                        graphs.capture()
                    for step in range(2):
                        tokens = steps[-1].argmax(-1) if not kernels else logits[False][step].argmax(-1)
                        kv = [n + step + 1 for n in lens]
                        ctx = build_context([1] * 3, kv, tables, page, DEV, kv_scale=kv_scale)
                        pos = torch.tensor([n - 1 for n in kv], device=DEV)
                        if kernels:
                            steps.append(graphs.run(tokens.tolist(), pos.tolist(), ctx.slot_mapping.tolist(), kv,
                                                    tables, [], [], None).clone())
                        else:
                            with forward_context(ctx):
                                steps.append(model.compute_logits(model(tokens, pos)))
                logits[kernels] = steps
            finally:
                install_triton_kernels(False)
        for got, want in zip(logits[True], logits[False]):
            # fp8 KV: the Triton attention and the reference round differently (0.0217 measured on the H100)
            assert _rel_err(got, want) < (2e-2 if kv_dtype == torch.bfloat16 else 4e-2), kv_dtype
            assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 2 / 3


def test_tiny_decoder_through_prefill_graphs(tmp_path):
    """Prefill and mixed steps replayed from the runner's prefill graphs (padded token counts, empty sequences
    past the step's) give the eager step's hidden states and cache, bf16 and fp8 caches; a step with more
    sequences than its capture holds is refused."""
    from stepserve.engine.cuda_graph import PrefillGraphs
    from stepserve.kernels import install_triton_kernels
    from stepserve.loader import load_model
    from stepserve.testing import attach_kv_cache, tiny_checkpoint

    model = load_model(tiny_checkpoint(tmp_path / "tiny"), torch.bfloat16, DEV)
    page, context, num_pages = 16, 512, 40
    tables = [list(range(0, 8)), list(range(8, 16)), list(range(16, 24)), list(range(24, 40))]
    # (q_lens, kv_lens, the sequences' page tables): a fresh prefill of three prompts; two decodes and a chunk
    # after a cached prefix; one 130-token chunk (pads to 256); a decode and three prompts.
    steps = [([40, 17, 70], [40, 17, 70], [0, 1, 2]), ([1, 1, 30], [41, 18, 100], [0, 1, 2]), ([130], [230], [3]),
             ([1, 5, 9, 3], [42, 22, 9, 3], [0, 1, 3, 2])]
    install_triton_kernels(True)
    try:
        for kv_dtype, kv_scale in ((torch.bfloat16, 1.0), (torch.float8_e4m3fn, 0.05)):
            attach_kv_cache(model, num_pages + 1, page, kv_dtype)
            graphs = PrefillGraphs(model.model, model.hidden_size, torch.bfloat16, 256, 8, context // page, context,
                                   num_pages * page, torch.device(DEV), kv_scale)
            graphs.capture()
            assert graphs.can_run(256, 8) and not graphs.can_run(257, 1) and not graphs.can_run(12, 9)
            for q_lens, kv_lens, which in steps:
                seq_tables = [tables[i] for i in which]
                positions = [p for q, kv in zip(q_lens, kv_lens) for p in range(kv - q, kv)]
                ids = torch.randint(0, 800, (len(positions),), device=DEV)
                caches = [layer.kv_cache.clone() for layer in model.attention_layers()]
                with torch.inference_mode():
                    ctx = build_context(q_lens, kv_lens, seq_tables, page, DEV, kv_scale=kv_scale)
                    with forward_context(ctx):
                        want = model(ids, torch.tensor(positions, device=DEV))
                    want_caches = [layer.kv_cache.clone() for layer in model.attention_layers()]
                    for layer, cache in zip(model.attention_layers(), caches):
                        layer.kv_cache.copy_(cache)
                    got = graphs.run(model.get_input_embeddings(ids), positions, ctx.slot_mapping.tolist(), q_lens,
                                     kv_lens, seq_tables).clone()
                assert _rel_err(got, want) < 1e-2, (kv_dtype, q_lens)
                for layer, expected in zip(model.attention_layers(), want_caches):
                    assert _rel_err(layer.kv_cache[:, :num_pages].float(), expected[:, :num_pages].float()) < 1e-2
    finally:
        install_triton_kernels(False)


@pytest.mark.parametrize("T", [1, 300, 4096])
def test_silu_and_mul(T):
    x = torch.randn(T, 2 * 12288, device=DEV, dtype=torch.bfloat16) * 4
    _assert_bf16_close(silu_and_mul(x), act_ref.silu_and_mul.reference(x))


@pytest.mark.parametrize("M", [20960, 1296, 1000, 65])  # two 720p images' tokens, a crop, ragged edges
@pytest.mark.parametrize("fast", [True, False])
def test_linear_gelu_at_vision_mlp_size(M, fast):
    """c_fc of the vision MLP (1536 -> 8960) with quick-GELU in the epilogue vs float32 (tanh.approx or the
    exact sigmoid), persistent and one tile per program."""
    from stepserve.kernels.linear_gelu import GemmConfig, linear_gelu

    x = torch.randn(M, 1536, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(8960, 1536, device=DEV, dtype=torch.bfloat16) / 1536 ** 0.5
    b = torch.randn(8960, device=DEV, dtype=torch.bfloat16)
    ref = act_ref.quick_gelu(torch.nn.functional.linear(x.float(), w.float(), b.float()))
    for cfg in (GemmConfig(fast_gelu=fast), GemmConfig(fast_gelu=fast, ctas_per_sm=0)):
        out = linear_gelu(x, w, b, config=cfg)
        assert _rel_err(out, ref) < 4e-3, cfg
        assert (out.float() - ref).abs().max() < 0.05, cfg


@pytest.mark.parametrize("M", [20960, 1296, 3])
@pytest.mark.parametrize("add", [True, False])
def test_scaled_add_layer_norm_at_vision_width(M, add):
    """The vision blocks' residual add + LayerNorm at width 1536 vs float32 (the sum rounded once to bf16, in
    place), and the norm alone of a stream its GEMM already added to; both after the held-back biases."""
    from stepserve.kernels.layer_norm import scaled_add_layer_norm_

    x, y = torch.randn(2, M, 1536, device=DEV, dtype=torch.bfloat16).unbind(0)
    gamma, weight, bias = torch.randn(3, 1536, device=DEV, dtype=torch.bfloat16).unbind(0)
    shift = torch.randn(1536, device=DEV)
    y = y * 4 if add else None
    ref_x = x.float()
    ref_h = norm_ref.scaled_add_layer_norm_.reference(ref_x, None if y is None else y.float(), gamma.float(), shift,
                                                      weight.float(), bias.float(), 1e-5)
    h = scaled_add_layer_norm_(x, y, gamma, shift, weight, bias, 1e-5)
    assert _rel_err(x, ref_x) < 4e-3 and _rel_err(h, ref_h) < 8e-3


@pytest.mark.parametrize("tokens", [20960, 1296, 5])
def test_rope2d_qk_at_vision_shapes(tokens):
    """The tower's 2D rotary of q and k (16 heads x 96, views of the qkv GEMM's rows) against the float32
    reference; the qkv rows are left as they were."""
    from stepserve.kernels.rope2d import rope2d_qk

    qkv = torch.randn(tokens, 3, 16, 96, device=DEV, dtype=torch.bfloat16)
    before = qkv.clone()
    q, k, _ = qkv.unbind(1)
    angles = torch.rand(tokens, 1, 48, device=DEV) * 60
    cos, sin = angles.cos(), angles.sin()
    got = rope2d_qk(q, k, cos, sin)
    want = rope_ref.rope2d_qk.reference(q.float(), k.float(), cos, sin)
    assert torch.equal(qkv, before)
    for g, w in zip(got, want):
        assert g.is_contiguous() and (g.float() - w).abs().max() < 0.02 and _rel_err(g, w) < 4e-3


def test_compiled_vision_block_takes_the_fused_kernels():
    """A vision block compiled (as the tower's are) with the kernels installed: c_fc is the GEMM with quick-GELU,
    out_proj and c_proj add their branches to the stream in their GEMMs, in place (`vision_attention_add_`,
    `add_linear_`), both norms are the one-pass kernel (the first also adding the block before's MLP output) and
    the rotary of q and k one kernel, opaque ops in one graph; what the block adds to the stream matches the eager
    reference path (cuBLAS, quick-GELU, torch's layer norm)."""
    from stepserve.kernels import install_triton_kernels
    from stepserve.models.configs import VisionConfig
    from stepserve.models.perception_encoder import VisionBlock

    torch.manual_seed(0)
    cfg = VisionConfig()
    with torch.device(DEV):
        block = VisionBlock(cfg).to(torch.bfloat16)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    x, y = torch.randn(2, 2 * 1296, cfg.width, device=DEV, dtype=torch.bfloat16).unbind(0)
    x = x / 20  # a stream small beside what the block adds: its bf16 rounding does not swamp the comparison
    angles = torch.rand(2 * 1296, cfg.head_dim // 2, device=DEV) * 30
    args = (y, block.ls_2.gamma, angles.cos()[:, None], angles.sin()[:, None], torch.tensor([[2, 1296]]), None,
            "auto")
    with torch.no_grad():
        want = x.clone()
        assert block(want, *args) is None
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    install_triton_kernels()
    try:
        with torch.no_grad():  # the ops have no backward (the engine runs the model without autograd too)
            torch._dynamo.reset()
            torch.compile(block, backend=capture, fullgraph=True, dynamic=True)(x.clone(), *args)
            torch._dynamo.reset()
            got = x.clone()
            assert torch.compile(block, fullgraph=True, dynamic=True)(got, *args) is None
    finally:
        install_triton_kernels(False)
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes]
    for op, count in (("linear_quick_gelu", 1), ("scaled_add_layer_norm_", 2), ("rope2d_qk", 1),
                      ("vision_attention_add_", 1), ("add_linear_", 1)):
        assert sum(op in t for t in targets) == count, (op, targets)
    assert _rel_err(got.float() - x.float(), want.float() - x.float()) < 1e-2


@pytest.mark.parametrize("head_dim", [96, 64])
def test_flash_attention4_vision_attention_matches_per_sequence_attention(head_dim):
    """The tower's attention op through FlashAttention-4 (one varlen launch) against the same op in float32
    math: the global views' and the crops' sequences back to back, v a strided view of the qkv GEMM's output as
    in the tower; with out_proj adding it to the stream, and without. Needs the `fa4` extra."""
    from stepserve.layers import flash_attention4
    from stepserve.models.perception_encoder import vision_attention, vision_attention_add_

    if not flash_attention4.available(torch.device(DEV)):
        pytest.skip("needs the fa4 extra on a Hopper GPU")
    torch.manual_seed(0)
    heads, groups = 16, torch.tensor([[2, 2704], [3, 1296]])
    lens = [n for count, n in groups.tolist() for _ in range(count)]
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEV)
    qkv = torch.randn(sum(lens), 3, heads, head_dim, device=DEV, dtype=torch.bfloat16)
    q, k, v = qkv.unbind(1)
    q, k = q.contiguous(), k.contiguous()
    weight = torch.randn(heads * head_dim, heads * head_dim, device=DEV, dtype=torch.bfloat16) / 40
    # A stream of the size of what attention adds to it (~0.02): its bf16 rounding does not swamp the comparison.
    stream = torch.randn(sum(lens), heads * head_dim, device=DEV, dtype=torch.bfloat16) / 50
    got, want = stream.clone(), stream.float()
    vision_attention_add_(q, k, v, groups, cu, "fa4", weight, got)
    vision_attention_add_(q.float(), k.float(), v.float(), groups, None, "math", weight.float(), want)
    assert _rel_err(got - stream, want - stream.float()) < 1e-2
    assert _rel_err(vision_attention(q, k, v, groups, cu, "fa4"),
                    vision_attention(q.float(), k.float(), v.float(), groups, None, "math")) < 1e-2
