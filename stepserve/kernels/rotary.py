"""Triton NeoX rotary embedding, optionally fused with Qwen3's per-head q/k RMSNorm and the KV-cache store.

`apply_rotary` matches `stepserve.layers.rotary.apply_rotary` (float32 rotation, one rounding) and
`qk_norm_rope` matches `rms_norm` (over head_dim, `stepserve.layers.norm`) followed by it; both work IN PLACE
on q and k, which may be strided views (e.g. slices of a fused qkv output) with a contiguous last dim.
`qk_norm_rope_store_kv` matches `stepserve.layers.attention.qk_norm_rope_store_kv`: q is normalized and
rotated in place, the rotated k and v go straight to their cache slots (k and v themselves are only read).
One program per token handles all of its heads, so the token's cos/sin row and cache slot are read once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stepserve.kernels import pdl


@triton.jit
def _load_weight(w_ptr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, NORM: tl.constexpr):
    """A norm weight's two halves, [1, BLOCK_HALF] float32 each; zeros (which nothing reads) without NORM."""
    if NORM:
        dims = tl.arange(0, BLOCK_HALF)
        w1 = tl.load(w_ptr + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    else:
        w1 = tl.zeros([1, BLOCK_HALF], tl.float32)
        w2 = w1
    return w1, w2


@triton.jit
def _norm_rotate(lo_ptr, mask, w1, w2, eps, cos, sin, HALF: tl.constexpr, NORM: tl.constexpr):
    """A token's heads (lo_ptr: their first halves), normalized (NORM) and rotated: two halves in x's dtype."""
    dtype = lo_ptr.dtype.element_ty
    x1 = tl.load(lo_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(lo_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        # Round where the reference rounds: after normalizing and after the weight.
        x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    return (x1 * cos - x2 * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)


@triton.jit
def _to_cache(x, scale, cache_dtype, fp8_max, SATURATE: tl.constexpr):
    """As `store_kv` converts: divide by the cache scale (a correctly rounded float32 division, as torch's,
    so the value in x's dtype, and the fp8 rounding after it, match the reference), saturate for fp8, cast."""
    x = tl.math.div_rn(x.to(tl.float32), scale).to(x.dtype)
    if SATURATE:
        x = tl.minimum(tl.maximum(x, -fp8_max), fp8_max)
    return x.to(cache_dtype)


# A mixed step passes the positions and slots after its leading decodes: an odd count of them leaves these int64
# pointers 8-byte aligned, which would otherwise be a second build (0.5 s, on a user's request).
@triton.jit(do_not_specialize_on_alignment=["pos_ptr", "slot_ptr"])
def _rope_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, qw_ptr, kw_ptr, eps, num_q_heads, num_k_heads,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
                 cache_ptr, slot_ptr, kv_scale, fp8_max, stride_kv, stride_page, stride_slot, stride_ch,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
                 NORM: tl.constexpr, STORE: tl.constexpr, PAGE_SIZE: tl.constexpr, SATURATE: tl.constexpr,
                 USE_PDL: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    half_dims = tl.arange(0, BLOCK_HALF)
    half_ok = half_dims < HALF
    qw1, qw2 = _load_weight(qw_ptr, HALF, BLOCK_HALF, NORM)
    kw1, kw2 = _load_weight(kw_ptr, HALF, BLOCK_HALF, NORM)
    # Positions and slots are step inputs (an earlier kernel may write them), so the wait comes before them.
    pdl.wait_for_predecessor(USE_PDL)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + half_dims, mask=half_ok, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + half_dims, mask=half_ok, other=0.0)[None, :]

    q_heads = tl.arange(0, BLOCK_QH)[:, None]
    q_ok = (q_heads < num_q_heads) & half_ok[None, :]
    q_lo = q_ptr + tok * stride_qt + q_heads * stride_qh + half_dims[None, :]
    q1, q2 = _norm_rotate(q_lo, q_ok, qw1, qw2, eps, cos, sin, HALF, NORM)
    tl.store(q_lo, q1, mask=q_ok)
    tl.store(q_lo + HALF, q2, mask=q_ok)

    kv_heads = tl.arange(0, BLOCK_KH)[:, None]
    kv_ok = (kv_heads < num_k_heads) & half_ok[None, :]
    k_lo = k_ptr + tok * stride_kt + kv_heads * stride_kh + half_dims[None, :]
    k1, k2 = _norm_rotate(k_lo, kv_ok, kw1, kw2, eps, cos, sin, HALF, NORM)
    if STORE:
        slot = tl.load(slot_ptr + tok)
        dst = (cache_ptr + (slot // PAGE_SIZE) * stride_page + (slot % PAGE_SIZE) * stride_slot
               + kv_heads * stride_ch + half_dims[None, :])
        dtype = cache_ptr.dtype.element_ty
        tl.store(dst, _to_cache(k1, kv_scale, dtype, fp8_max, SATURATE), mask=kv_ok)
        tl.store(dst + HALF, _to_cache(k2, kv_scale, dtype, fp8_max, SATURATE), mask=kv_ok)
        v_lo = v_ptr + tok * stride_vt + kv_heads * stride_vh + half_dims[None, :]
        v1 = tl.load(v_lo, mask=kv_ok, other=0.0)
        v2 = tl.load(v_lo + HALF, mask=kv_ok, other=0.0)
        tl.store(dst + stride_kv, _to_cache(v1, kv_scale, dtype, fp8_max, SATURATE), mask=kv_ok)
        tl.store(dst + stride_kv + HALF, _to_cache(v2, kv_scale, dtype, fp8_max, SATURATE), mask=kv_ok)
    else:
        tl.store(k_lo, k1, mask=kv_ok)
        tl.store(k_lo + HALF, k2, mask=kv_ok)


def _launch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
            q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
            v: torch.Tensor | None = None, kv_cache: torch.Tensor | None = None,
            slot_mapping: torch.Tensor | None = None, kv_scale: float = 1.0) -> None:
    T, num_q_heads, head_dim = q.shape
    assert k.shape[0] == T and k.shape[2] == head_dim and positions.shape == (T,), (q.shape, k.shape)
    assert head_dim % 2 == 0 and cos_sin_cache.shape[-1] == head_dim, (head_dim, cos_sin_cache.shape)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1, "need a contiguous last dim"
    assert cos_sin_cache.dtype == torch.float32, cos_sin_cache.dtype
    assert positions.stride(0) == 1, "positions must be contiguous"
    store = kv_cache is not None
    if store:
        assert v.shape == k.shape and v.stride(-1) == 1, (v.shape, k.shape)
        assert kv_cache.shape[0] == 2 and kv_cache.shape[3:] == k.shape[1:], (kv_cache.shape, k.shape)
        assert kv_cache.stride(-1) == 1 and slot_mapping.shape == (T,) and slot_mapping.stride(0) == 1
        assert kv_cache.element_size() > 1 or kv_cache.dtype == torch.float8_e4m3fn, kv_cache.dtype
        cache_args = (kv_cache, slot_mapping, kv_scale, torch.finfo(torch.float8_e4m3fn).max,
                      *kv_cache.stride()[:4])
        page_size, saturate = kv_cache.shape[2], kv_cache.element_size() == 1
    else:  # STORE off: the cache arguments are never read
        v, cache_args, page_size, saturate = k, (k, positions, 1.0, 0.0, 0, 0, 0, 0), 1, False
    if T == 0:
        return
    norm = q_weight is not None
    half = head_dim // 2
    use_pdl = pdl.enabled(q.device)
    _rope_kernel[(T,)](
        q, k, v, positions, cos_sin_cache, q_weight if norm else q, k_weight if norm else k, eps,
        num_q_heads, k.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin_cache.stride(0), *cache_args,
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_QH=triton.next_power_of_2(num_q_heads),
        BLOCK_KH=triton.next_power_of_2(k.shape[1]), NORM=norm, STORE=store, PAGE_SIZE=page_size,
        SATURATE=saturate, USE_PDL=use_pdl, num_warps=4, launch_pdl=use_pdl)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place by `positions` [T]; cos_sin_cache fp32 [P, D]."""
    _launch(q, k, positions, cos_sin_cache, None, None, 0.0)
    return q, k


def _check_weights(q: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor) -> None:
    assert q_weight.shape == k_weight.shape == (q.shape[-1],), (q_weight.shape, k_weight.shape)
    assert q_weight.is_contiguous() and k_weight.is_contiguous()


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k over head_dim (weights [D]), then the rotation; in place."""
    _check_weights(q, q_weight, k_weight)
    _launch(q, k, positions, cos_sin_cache, q_weight, k_weight, eps)
    return q, k


def qk_norm_rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                          k_weight: torch.Tensor, eps: float, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                          kv_cache: torch.Tensor, slot_mapping: torch.Tensor, kv_scale: float = 1.0) -> torch.Tensor:
    """`qk_norm_rope` of q (in place) and k, with the rotated k and v [T, Hkv, D] written to `slot_mapping`
    of kv_cache [2, pages, page_size, Hkv, D] (an fp8 cache stores value / kv_scale, saturated); returns q."""
    _check_weights(q, q_weight, k_weight)
    _launch(q, k, positions, cos_sin_cache, q_weight, k_weight, eps, v, kv_cache, slot_mapping, kv_scale)
    return q
