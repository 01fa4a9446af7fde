"""The Triton kernels run under Triton's CPU interpreter on tiny shapes, against the plain-torch references.

Two bugs of the triton 3.9 CPU interpreter (compiled GPU code has neither) shape these tests: it computes
a bfloat16 `tl.dot` wrongly (off by ~1e10) and it rounds float32 -> bfloat16 toward zero instead of to
nearest. So everything runs in float16 here (an fp8 cache is read into float16), where the interpreter
rounds like torch; tests/gpu/test_kernels.py covers bfloat16 on the device.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

from triton_interpret import interpreted_triton  # before anything imports triton

import pytest  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")  # lse of empty KV splits
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from stepserve.layers import activation as act_ref  # noqa: E402
from stepserve.layers import norm as norm_ref  # noqa: E402
from stepserve.layers import rotary as rope_ref  # noqa: E402
from stepserve.engine import sampling  # noqa: E402
from stepserve.layers.attention import build_context, paged_attention_reference  # noqa: E402


@pytest.fixture(scope="module")
def kern():
    interpreted_triton()
    # import_module: the package re-exports the function `paged_attention` under the module's name.
    return SimpleNamespace(**{m: importlib.import_module(f"stepserve.kernels.{m}")
                              for m in ("activation", "fp8_gemm", "layer_norm", "linear_gelu", "paged_attention",
                                        "rmsnorm", "rope2d", "rotary", "top_p")})


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _paged_case(q_lens, kv_lens, *, num_heads=4, num_kv_heads=2, head_dim=32, page_size=4,
                kv_dtype=torch.float16, kv_scale=1.0):
    """Random q and a KV cache whose pages are shuffled, so a wrong page lookup cannot pass."""
    pages_per_seq = [(kv + page_size - 1) // page_size for kv in kv_lens]
    total = sum(pages_per_seq) + 2
    perm = torch.randperm(total).tolist()
    tables, i = [], 0
    for n in pages_per_seq:
        tables.append(perm[i:i + n])
        i += n
    kv_cache = (torch.randn(2, total, page_size, num_kv_heads, head_dim) / kv_scale).to(kv_dtype)
    ctx = build_context(q_lens, kv_lens, tables, page_size, kv_scale=kv_scale)
    q = torch.randn(sum(q_lens), num_heads, head_dim, dtype=torch.float16)
    return q, kv_cache, ctx


@pytest.mark.parametrize("kv_dtype,kv_scale", [(torch.float16, 1.0), (torch.float8_e4m3fn, 0.37)])
@pytest.mark.parametrize("num_splits", [1, 3, 20, None])
def test_decode_attention(kern, kv_dtype, kv_scale, num_splits):
    # 20 splits of 16 keys: most are empty for every sequence, and 20 is not a power of two.
    q, kv_cache, ctx = _paged_case([1, 1, 1], [1, 13, 45], num_heads=6, num_kv_heads=2,
                                   kv_dtype=kv_dtype, kv_scale=kv_scale)
    ref = paged_attention_reference(q.float(), kv_cache, ctx, 0.25)
    out = kern.paged_attention.decode_attention(q, kv_cache, ctx, 0.25, num_splits=num_splits, block_n=16)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert _rel_err(out, ref) < 2e-3


def test_decode_padded_sequence_gives_zeros(kern):
    """A CUDA-graph batch padded with kv_len 0 sequences must stay finite (all splits empty)."""
    q, kv_cache, ctx = _paged_case([1, 1], [9, 1])
    ctx.kv_lens[1] = 0
    for splits in (1, 4):
        out = kern.paged_attention.decode_attention(q, kv_cache, ctx, 0.2, num_splits=splits, block_n=16)
        assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("kv_dtype,kv_scale", [(torch.float16, 1.0), (torch.float8_e4m3fn, 2.0)])
@pytest.mark.parametrize("num_heads,num_kv_heads,page_size", [(4, 2, 4), (6, 2, 8), (2, 2, 4)])
def test_extend_attention(kern, kv_dtype, kv_scale, num_heads, num_kv_heads, page_size):
    # A fresh prefill, a decode, a chunk after a cached prefix, and a chunk spanning several q tiles.
    q_lens, kv_lens = [7, 1, 5, 19], [7, 10, 30, 40]
    q, kv_cache, ctx = _paged_case(q_lens, kv_lens, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                   page_size=page_size, kv_dtype=kv_dtype, kv_scale=kv_scale)
    ref = paged_attention_reference(q.float(), kv_cache, ctx, 0.2)
    out = kern.paged_attention.extend_attention(q, kv_cache, ctx, 0.2, block_m=16, block_n=16)
    assert _rel_err(out, ref) < 2e-3


def test_extend_attention_many_sequences(kern):
    # More sequences than the kernel's block of 16: each tile finds its sequence across blocks of the prefix sum.
    q_lens = torch.randint(1, 9, (37,)).tolist()
    kv_lens = [q + int(torch.randint(0, 12, ())) for q in q_lens]
    q, kv_cache, ctx = _paged_case(q_lens, kv_lens, num_heads=2, num_kv_heads=1, head_dim=16)
    ref = paged_attention_reference(q.float(), kv_cache, ctx, 0.2)
    out = kern.paged_attention.extend_attention(q, kv_cache, ctx, 0.2, block_m=4, block_n=16)
    assert _rel_err(out, ref) < 2e-3


def test_extend_attention_padded_as_a_prefill_graph_captures_it(kern):
    """A prefill graph's step: the real sequences, then empty ones (q offsets repeat the token count) up to the
    captured count, and padding rows after the real tokens. The real rows equal the reference; no tile reads
    or writes the padding rows."""
    from stepserve.layers.attention import ForwardContext

    q_lens, kv_lens = [1, 6, 9], [12, 6, 20]
    q, kv_cache, ctx = _paged_case(q_lens, kv_lens)
    ref = paged_attention_reference(q.float(), kv_cache, ctx, 0.2)
    T, seqs, rows = sum(q_lens), 8, 24
    cu = torch.cat([ctx.cu_q_lens, torch.full((seqs - len(q_lens),), T, dtype=torch.int32)])
    kv = torch.cat([ctx.kv_lens, torch.zeros(seqs - len(q_lens), dtype=torch.int32)])
    tables = torch.cat([ctx.block_tables, torch.zeros(seqs - len(q_lens), ctx.block_tables.shape[1], dtype=torch.int32)])
    padded = ForwardContext(cu, kv, tables, ctx.slot_mapping, rows, 64, [rows] + [0] * (seqs - 1), [64] + [0] * (seqs - 1))
    q_pad = torch.cat([q, torch.randn(rows - T, *q.shape[1:], dtype=q.dtype)])
    out = torch.full_like(q_pad, 7.0)
    kern.paged_attention.extend_attention(q_pad, kv_cache, padded, 0.2, out=out, block_m=16, block_n=16)
    assert _rel_err(out[:T], ref) < 2e-3
    assert (out[T:] == 7.0).all()


def test_paged_attention_dispatch_and_strided_q(kern):
    for q_lens, kv_lens in (([1, 1], [20, 3]), ([3, 1], [20, 3])):
        q, kv_cache, ctx = _paged_case(q_lens, kv_lens, page_size=16, head_dim=16)
        # q as a slice of a fused qkv projection: rows are strided.
        qkv = torch.randn(q.shape[0], 3 * q.shape[1] * q.shape[2], dtype=q.dtype)
        q = qkv[:, : q.shape[1] * q.shape[2]].view(q.shape)
        ref = paged_attention_reference(q.float(), kv_cache, ctx, 0.3)
        assert _rel_err(kern.paged_attention.paged_attention(q, kv_cache, ctx, 0.3), ref) < 2e-3


def test_pdl_is_off_on_the_interpreter_and_the_cpu(kern):
    from stepserve.kernels import pdl

    assert not pdl.enabled(torch.device("cpu"))
    assert not pdl.enabled(torch.device("cuda", 0))  # the interpreter, whatever the device


def test_default_num_splits():
    from stepserve.kernels.paged_attention import default_num_splits

    assert default_num_splits(256, 8, 8192, 132) == 1
    assert default_num_splits(1, 8, 100, 132) == 1  # too few keys to split
    assert 1 < default_num_splits(1, 8, 1536, 132) <= 12


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to one float16 rounding step (float32 sums and exp may differ in the last bit)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -10, atol=1e-6)


def test_rms_norm(kern):
    x = torch.randn(5, 3 * 48, dtype=torch.float16)[:, 48:96]  # strided rows
    w = torch.randn(48, dtype=torch.float16)
    _assert_close(kern.rmsnorm.rms_norm(x, w, 1e-6), norm_ref.rms_norm.reference(x, w, 1e-6))
    heads = torch.randn(3, 4 * 2 * 32, dtype=torch.float16)[:, : 4 * 32].view(3, 4, 32)  # q heads of a qkv
    w = torch.randn(32, dtype=torch.float16)
    _assert_close(kern.rmsnorm.rms_norm(heads, w, 1e-6), norm_ref.rms_norm.reference(heads, w, 1e-6))


def test_fused_add_rms_norm(kern):
    x = torch.randn(6, 100, dtype=torch.float16)
    res = torch.randn(6, 200, dtype=torch.float16)[:, ::2].contiguous()
    w = torch.randn(100, dtype=torch.float16)
    y, s = kern.rmsnorm.fused_add_rms_norm(x, res, w, 1e-5)
    y_ref, s_ref = norm_ref.fused_add_rms_norm.reference(x, res, w, 1e-5)
    assert torch.equal(s, s_ref)
    _assert_close(y, y_ref)


def _rope_inputs(T=5, hq=4, hk=2, d=32):
    qkv = torch.randn(T, (hq + 2 * hk) * d, dtype=torch.float16)
    q = qkv[:, : hq * d].view(T, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(T, hk, d)
    cache = rope_ref.rotary_cos_sin_cache(d, 64, 10000.0)
    positions = torch.randint(0, 64, (T,))
    return qkv, q, k, positions, cache


def test_apply_rotary_in_place(kern):
    qkv, q, k, positions, cache = _rope_inputs()
    v_before = qkv[:, 6 * 32:].clone()
    q_ref, k_ref = rope_ref.apply_rotary.reference(q, k, positions, cache)
    q_out, k_out = kern.rotary.apply_rotary(q, k, positions, cache)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    _assert_close(q, q_ref)
    _assert_close(k, k_ref)
    assert torch.equal(qkv[:, 6 * 32:], v_before)  # v untouched


@pytest.mark.parametrize("tokens,heads,head_dim", [(19, 4, 16), (3, 16, 96), (0, 2, 8)])
def test_rope2d_qk(kern, tokens, heads, head_dim):
    """The vision rotary of q and k read from a fused qkv row (strided views) against the reference; q and k
    themselves are left as they were. 16 x 96 is the tower's row: 768 pairs, three 256-pair tiles."""
    qkv = torch.randn(tokens, 3, heads, head_dim, dtype=torch.float16)
    q, k, _ = qkv.unbind(1)
    before = qkv.clone()
    angles = torch.rand(tokens, 1, head_dim // 2) * 30
    cos, sin = angles.cos(), angles.sin()
    out_q, out_k = kern.rope2d.rope2d_qk(q, k, cos, sin)
    ref_q, ref_k = rope_ref.rope2d_qk.reference(q, k, cos, sin)
    assert out_q.is_contiguous() and out_k.is_contiguous() and torch.equal(qkv, before)
    torch.testing.assert_close(out_q, ref_q, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out_k, ref_k, atol=2e-3, rtol=2e-3)


def test_rope2d_qk_other_layouts_take_the_reference(kern):
    """Angles in bf16 (`VisionOptions.rope_dtype`) or heads not packed in the row are the reference's."""
    q, k = torch.randn(2, 5, 2, 8, dtype=torch.float16).unbind(0)
    angles = torch.rand(5, 1, 4)
    for args in ((q, k, angles.cos().half(), angles.sin().half()),
                 (q.transpose(0, 1).contiguous().transpose(0, 1), k, angles.cos(), angles.sin())):
        got = kern.rope2d.rope2d_qk(*args)
        want = rope_ref.rope2d_qk.reference(*args)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_qk_norm_rope(kern):
    _, q, k, positions, cache = _rope_inputs(T=4, hq=6, hk=2, d=64)
    qw, kw = torch.randn(64, dtype=torch.float16), torch.randn(64, dtype=torch.float16)
    q_ref, k_ref = rope_ref.qk_norm_rope.reference(q, k, qw, kw, 1e-6, positions, cache)
    kern.rotary.qk_norm_rope(q, k, qw, kw, 1e-6, positions, cache)
    _assert_close(q, q_ref)
    _assert_close(k, k_ref)


@pytest.fixture
def exact_fp8_casts(monkeypatch):
    """The interpreter casts to float8e4nv rounding half up and dropping the carry into the exponent (31.9 ->
    16); the device rounds to nearest even, as torch does. Cast through torch in these tests."""
    import numpy as np
    from triton.runtime import interpreter

    cast = interpreter.InterpreterBuilder.create_fp_to_fp

    def torch_cast(self, src, dst_type, rounding_mode):
        if dst_type.scalar != triton.language.float8e4nv or src.dtype.scalar.primitive_bitwidth < 16:
            return cast(self, src, dst_type, rounding_mode)
        assert src.dtype.scalar != triton.language.bfloat16, "bfloat16 is stored as bits in the interpreter"
        data = torch.from_numpy(src.data.astype(np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return interpreter.TensorHandle(data, dst_type.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fp_to_fp", torch_cast)


@pytest.mark.parametrize("kv_dtype,kv_scale", [(torch.float16, 1.0), (torch.float16, 0.5),
                                               (torch.float8_e4m3fn, 1.0), (torch.float8_e4m3fn, 0.05)])
def test_qk_norm_rope_store_kv(kern, exact_fp8_casts, kv_dtype, kv_scale):
    """A prefill after a cached prefix, a decode, a fresh prefill, and two CUDA-graph padding rows that
    write their (equal) K/V to the scratch slot; pages shuffled. Against qk_norm_rope + store_kv."""
    from stepserve.layers import attention

    hq, hkv, d, page_size = 6, 2, 32, 4
    q_lens, kv_lens = [5, 1, 3], [9, 6, 3]
    pages = torch.randperm(8).tolist()
    ctx = build_context(q_lens, kv_lens, [pages[:3], pages[3:5], pages[5:6]], page_size)
    scratch = 8 * page_size  # the first slot of the page past the pool
    slots = torch.cat([ctx.slot_mapping, torch.tensor([scratch, scratch])])
    T = len(slots)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, dtype=torch.float16) * 4
    qkv[-1] = qkv[-2]  # padding rows carry stale, here equal, inputs
    q, k, v = (t.view(T, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    v[0, 0, :2] = torch.tensor([1000.0, -1000.0])  # past the fp8 range at any scale here
    cos_sin = rope_ref.rotary_cos_sin_cache(d, 64, 10000.0)
    positions = torch.randint(0, 64, (T,))
    positions[-1] = positions[-2]
    qw, kw = torch.randn(d, dtype=torch.float16), torch.randn(d, dtype=torch.float16)
    cache = (torch.randn(2, 9, page_size, hkv, d) * 4).to(kv_dtype)
    cache_ref, kv_before = cache.clone(), qkv[:, hq * d:].clone()

    q_ref = attention.qk_norm_rope_store_kv.reference(q, k, v, qw, kw, 1e-6, positions, cos_sin, cache_ref, slots,
                                                      kv_scale)
    out = kern.rotary.qk_norm_rope_store_kv(q, k, v, qw, kw, 1e-6, positions, cos_sin, cache, slots, kv_scale)
    assert out.data_ptr() == q.data_ptr()
    _assert_close(q, q_ref)
    assert torch.equal(qkv[:, hq * d:], kv_before)  # k and v are only read
    if kv_dtype == torch.float16:
        _assert_close(cache, cache_ref)
    else:  # the same values up to a rare flip of one rounding step (float32 sums, reciprocal of the scale)
        torch.testing.assert_close(cache.float(), cache_ref.float(), rtol=2 ** -3, atol=2 ** -9)
        assert (cache.float() == cache_ref.float()).float().mean() > 0.99
        assert cache[1].float().view(-1, d)[slots[0] * hkv, :2].tolist() == [448.0, -448.0]  # saturated


@pytest.mark.parametrize("kv_dtype,kv_scale", [(torch.float16, 1.0), (torch.float8_e4m3fn, 0.05)])
@pytest.mark.parametrize("num_splits", [1, 3, 20])
def test_decode_with_qk_norm_rope_and_store(kern, exact_fp8_casts, kv_dtype, kv_scale, num_splits):
    """The fused decode (`step_kv`): q and k normalized and rotated, the new K/V stored and attended, against
    qk_norm_rope_store_kv + paged attention. Sequences of 1 key (only the new one), a block-aligned length
    (the new key ends the first block), and one whose new key starts a block."""
    from stepserve.layers import attention

    hq, hkv, d, page_size = 6, 2, 32, 4
    kv_lens = [1, 16, 33, 7]
    q, kv_cache, ctx = _paged_case([1] * 4, kv_lens, num_heads=hq, num_kv_heads=hkv, head_dim=d,
                                   page_size=page_size, kv_dtype=kv_dtype, kv_scale=kv_scale)
    B = len(kv_lens)
    qkv = torch.randn(B, (hq + 2 * hkv) * d, dtype=torch.float16) * 4
    q, k, v = (t.view(B, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    cos_sin = rope_ref.rotary_cos_sin_cache(d, 64, 10000.0)
    positions = torch.tensor(kv_lens) - 1
    qw, kw = torch.randn(d, dtype=torch.float16), torch.randn(d, dtype=torch.float16)
    cache_ref, qkv_before = kv_cache.clone(), qkv.clone()

    q_rot = attention.qk_norm_rope_store_kv.reference(q, k, v, qw, kw, 1e-6, positions, cos_sin, cache_ref,
                                                      ctx.slot_mapping, kv_scale)
    ref = paged_attention_reference(q_rot.float(), cache_ref, ctx, 0.25)
    step_kv = kern.paged_attention.StepKV(k, v, qw, kw, 1e-6, positions, cos_sin)
    out = kern.paged_attention.decode_attention(q, kv_cache, ctx, 0.25, step_kv=step_kv, num_splits=num_splits,
                                                block_n=16)
    assert torch.equal(qkv, qkv_before)  # q, k and v are only read
    assert _rel_err(out, ref) < 2e-3
    if kv_dtype == torch.float16:
        _assert_close(kv_cache, cache_ref)
    else:  # as in test_qk_norm_rope_store_kv: a rare flip of one rounding step
        torch.testing.assert_close(kv_cache.float(), cache_ref.float(), rtol=2 ** -3, atol=2 ** -9)
        assert (kv_cache.float() == cache_ref.float()).float().mean() > 0.99


@pytest.mark.parametrize("decodes", [0, 1, 33])  # a prefill; one decode ahead of it; a mixed step split in two
def test_qk_norm_rope_attend_extend_path(kern, decodes):
    """Prefill chunks through `qk_norm_rope_attend` (rotary kernel + extend; past MIN_MIXED_DECODES leading
    decodes, those through the decode kernel) equal the layer's reference, output and cache."""
    from stepserve.layers import attention

    assert decodes < 33 or decodes >= kern.paged_attention.MIN_MIXED_DECODES
    hq, hkv, d = 4, 2, 32
    g = torch.Generator().manual_seed(decodes)
    dec_kv = torch.randint(1, 40, (decodes,), generator=g).tolist()
    q_lens, kv_lens = [1] * decodes + [5, 1, 3], dec_kv + [9, 4, 3]
    q, kv_cache, ctx = _paged_case(q_lens, kv_lens, num_heads=hq, num_kv_heads=hkv, head_dim=d)
    T = sum(q_lens)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, dtype=torch.float16, generator=g)
    q, k, v = (t.view(T, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    cos_sin = rope_ref.rotary_cos_sin_cache(d, 64, 10000.0)
    positions = torch.tensor([n - 1 for n in dec_kv] + [4, 5, 6, 7, 8, 3, 0, 1, 2])
    qw, kw = torch.randn(d, dtype=torch.float16), torch.randn(d, dtype=torch.float16)
    cache_ref = kv_cache.clone()
    ref = attention.qk_norm_rope_attend.reference(q.clone(), k, v, qw, kw, 1e-6, positions, cos_sin, cache_ref,
                                                  ctx, 0.3)
    out = kern.paged_attention.qk_norm_rope_attend(q, k, v, qw, kw, 1e-6, positions, cos_sin, kv_cache, ctx, 0.3)
    assert _rel_err(out, ref) < 2e-3
    assert _rel_err(out[decodes:], ref[decodes:]) < 2e-3
    _assert_close(kv_cache, cache_ref)


def test_silu_and_mul(kern):
    x = torch.randn(3, 2 * 2 * 40, dtype=torch.float16)[:, : 2 * 40] * 3  # strided rows, I not a power of 2
    _assert_close(kern.activation.silu_and_mul(x), act_ref.silu_and_mul.reference(x))
    x3 = torch.randn(2, 3, 64, dtype=torch.float16)
    _assert_close(kern.activation.silu_and_mul(x3), act_ref.silu_and_mul.reference(x3))


@pytest.mark.parametrize("programs", [None, 3])  # one tile per program; 3 programs walking 15 tiles
@pytest.mark.parametrize("subtile", [True, False])
@pytest.mark.parametrize("has_bias", [True, False])
def test_linear_gelu(kern, programs, subtile, has_bias):
    # Ragged M and N (70 = 4 x 16 + 6, 80 = 2 x 32 + 16) and K (48 = 3 x 16): every edge of the tiling.
    x, w = torch.randn(70, 48, dtype=torch.float16), torch.randn(80, 48, dtype=torch.float16) / 7
    bias = torch.randn(80, dtype=torch.float16) if has_bias else None
    # The interpreter has no inline PTX: the exact sigmoid stands in for tanh.approx (tested on the device).
    cfg = kern.linear_gelu.GemmConfig(bm=16, bn=32, bk=16, group_m=2, ctas_per_sm=0, subtile=subtile,
                                      fast_gelu=False)
    out = kern.linear_gelu.linear_gelu(x, w, bias, config=cfg, programs=programs)
    ref = act_ref.quick_gelu(torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float()))
    assert _rel_err(out, ref) < 2e-3
    plain = kern.linear_gelu.linear_gelu(x, w, bias, gelu=False, config=cfg, programs=programs)
    assert _rel_err(plain, torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())) < 2e-3


@pytest.mark.parametrize("rows,width", [(7, 48), (3, 1536)])  # several rows per program; one ragged long row
@pytest.mark.parametrize("add", [True, False])
def test_scaled_add_layer_norm_(kern, rows, width, add):
    """x += gamma * y in place (add; else x untouched: its GEMM added the branch), then the norm of x + shift."""
    g = torch.Generator().manual_seed(4)
    x, y = (torch.randn(rows, width, generator=g) * 3 + 1).to(torch.float16), torch.randn(rows, width, generator=g).half()
    gamma, weight, bias = (torch.randn(width, generator=g).half() for _ in range(3))
    shift = torch.randn(width, generator=g)
    ref_x = x.float()
    ref_h = norm_ref.scaled_add_layer_norm_.reference(ref_x, y.float() if add else None, gamma.float(), shift,
                                                      weight.float(), bias.float(), 1e-5)
    before = x.clone()
    h = kern.layer_norm.scaled_add_layer_norm_(x, y if add else None, gamma if add else None, shift, weight, bias, 1e-5)
    assert h.dtype == torch.float16 and x.dtype == torch.float16
    assert _rel_err(x, ref_x) < 1e-3 and _rel_err(h, ref_h) < 2e-3
    assert add != torch.equal(x, before)


@pytest.mark.parametrize("rows,width", [(7, 48), (5, 1536)])  # ragged 128-column groups; rows padded to 8
def test_scaled_add_layer_norm_quantized(kern, rows, width):
    """quantize=True: the same sum; the norm as `Fp8Rows`, quantized per token per 128 columns as the W8A8 GEMM
    would quantize the unquantized norm, rows padded to ROW_ALIGN with zeros and scale 1."""
    from stepserve.layers.quant import ROW_ALIGN, cdiv, dequantize_rows, quantize_fp8_per_token_group

    g = torch.Generator().manual_seed(5)
    x, y = (torch.randn(rows, width, generator=g) * 3 + 1).half(), torch.randn(rows, width, generator=g).half()
    gamma, weight, bias = (torch.randn(width, generator=g).half() for _ in range(3))
    shift = torch.randn(width, generator=g)
    x_q = x.clone()
    h = kern.layer_norm.scaled_add_layer_norm_(x, y, gamma, shift, weight, bias, 1e-5)
    hq = kern.layer_norm.scaled_add_layer_norm_(x_q, y, gamma, shift, weight, bias, 1e-5, quantize=True)
    padded, groups = cdiv(rows, ROW_ALIGN) * ROW_ALIGN, cdiv(width, 128)
    assert torch.equal(x_q, x) and hq.rows == rows and hq.dtype == torch.float16
    assert hq.q.shape == (padded, width) and hq.scales.shape == (padded, groups) and hq.scales.stride() == (1, padded)
    _, ref_scales = quantize_fp8_per_token_group(h.float())
    assert torch.allclose(hq.scales[:rows], ref_scales, rtol=1e-6)
    assert not hq.q[rows:].float().any() and torch.equal(hq.scales[rows:], torch.ones(padded - rows, groups))
    # The codes are those of the GEMM's own quantization of the unquantized norm, bit for bit (against torch's
    # the interpreter's fp32 -> fp8 rounding is off at exponent carries: see test_fp8.exactly_quantizable;
    # tests/gpu compares the rounding itself).
    ref_q, _ = kern.fp8_gemm.quantize_groups(h, padded)
    assert torch.equal(hq.q.view(torch.uint8), ref_q.view(torch.uint8))
    assert _rel_err(dequantize_rows(hq), h) < 0.1


def test_top_p_cut_is_the_sorted_rows_cut(kern):
    """The search kernel returns the very value the sort path gathers, ties, -inf and spiky rows included."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(18, 700, generator=g) * torch.linspace(0.5, 8.0, 18)[:, None]
    rows[1, ::3] = float("-inf")  # banned tokens
    rows[2, 100:160] = rows[2].max()  # a tie at the top holding much of the mass
    rows[4] = rows[4].round()  # many ties everywhere
    rows[5, 7] = 40.0  # one token holds all but ~1e-12 of the mass
    top_p = torch.rand(18, generator=g) * 0.98 + 0.01
    top_p[5] = 0.999
    assert rows.shape[0] > kern.top_p._SORT_ROWS  # the search kernel runs, not the sort it falls back to
    cut = kern.top_p.top_p_cut(rows, top_p)
    ref = sampling.top_p_cut.reference(rows, top_p)
    assert cut.shape == (18, 1) and torch.equal(cut, ref)
    # what that cut keeps: less than top_p strictly above it, at least top_p with it
    probs = torch.softmax(rows.double(), dim=-1)
    assert ((probs * (rows > cut)).sum(-1) < top_p).all() and ((probs * (rows >= cut)).sum(-1) >= top_p - 1e-6).all()


def test_top_p_cut_search_narrows_to_one_key():
    """Passes that quarter the interval leave one key of the 2^32 - 2^24 between -inf and +inf."""
    from stepserve.kernels import top_p

    lo, hi = top_p._KEY_NEG_INF - 1, top_p._KEY_POS_INF
    for _ in range(top_p._PASSES):
        w = hi - lo
        keys = [lo, lo + w // 4, lo + w // 2, lo + w * 3 // 4, hi]  # the probes, as the kernel computes them
        hi = lo + max(b - a for a, b in zip(keys, keys[1:]))  # the worst case: the widest gap between them
    assert hi - lo == 1
    # and the keys are float order: -inf, -1, -0, +0, 1, +inf
    values = torch.tensor([float("-inf"), -1.0, -0.0, 0.0, 1.0, float("inf")])
    bits = values.view(torch.int32)
    keys = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).tolist()
    assert keys == sorted(keys) and len(set(keys)) == 6 and (keys[0], keys[-1]) == (top_p._KEY_NEG_INF, top_p._KEY_POS_INF)


def test_install_registers_every_layer_function():
    import stepserve.kernels as kernels
    from stepserve.layers import attention, dispatch, linear, quant

    layer_fns = {"rms_norm": norm_ref.rms_norm, "fused_add_rms_norm": norm_ref.fused_add_rms_norm,
                 "apply_rotary": rope_ref.apply_rotary, "qk_norm_rope": rope_ref.qk_norm_rope,
                 "qk_norm_rope_store_kv": attention.qk_norm_rope_store_kv,
                 "qk_norm_rope_attend": attention.qk_norm_rope_attend, "silu_and_mul": act_ref.silu_and_mul,
                 "fp8_linear": quant.fp8_linear, "fp8_mlp": quant.fp8_mlp, "linear": linear.linear, "top_p_cut": sampling.top_p_cut,
                 "scaled_add_layer_norm_": norm_ref.scaled_add_layer_norm_, "rope2d_qk": rope_ref.rope2d_qk}
    assert set(kernels.LAYER_KERNELS) == set(layer_fns)
    kernels.install_triton_kernels()
    try:
        assert all(dispatch._KERNELS[name] is kernels.LAYER_KERNELS[name] for name in layer_fns)
        assert attention.attention_backend() is kernels.paged_attention
        x = torch.randn(2, 8)
        assert torch.equal(norm_ref.rms_norm(x, torch.ones(8), 1e-6),
                           norm_ref.rms_norm.reference(x, torch.ones(8), 1e-6))  # CPU keeps the reference
    finally:
        kernels.install_triton_kernels(enable=False)
    assert attention.attention_backend() is paged_attention_reference
    assert not any(name in dispatch._KERNELS for name in layer_fns)


def test_watch_compiles_logs_later_builds(caplog):
    from stepserve.kernels.compile_log import watch_compiles

    runtime = triton.knobs.runtime
    watch_compiles()
    try:
        hook_args = dict(key="k", repr="_gemv_kernel[num_warps=4](x_ptr: *bf16)", fn=None, compile={},
                         is_manual_warmup=False, already_compiled=False)
        assert runtime.jit_cache_hook(**hook_args) is False  # never asks Triton to skip the build
        with caplog.at_level("WARNING", logger="stepserve.kernels.compile_log"):
            runtime.jit_post_compile_hook(**hook_args)
        assert "built a Triton kernel after start-up" in caplog.text and "_gemv_kernel" in caplog.text
    finally:
        watch_compiles(enable=False)
    assert runtime.jit_cache_hook is None and runtime.jit_post_compile_hook is None
