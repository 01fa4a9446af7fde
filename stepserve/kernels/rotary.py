"""Triton NeoX rotary embedding, optionally fused with Qwen3's per-head q/k RMSNorm. Works IN PLACE.

`apply_rotary` matches `stepserve.layers.rotary.apply_rotary` (float32 rotation, one rounding) and
`qk_norm_rope` matches `rms_norm` (over head_dim, `stepserve.layers.norm`) followed by it. One program per
token handles all of its q and k heads, so the token's cos/sin row is read once. q and k are overwritten
and returned: they may be strided views (e.g. slices of a fused qkv output) with a contiguous last dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, stride_h, n_heads, w_ptr, eps, cos, sin, half_dims, half_ok,
                  HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, NORM: tl.constexpr):
    heads = tl.arange(0, BLOCK_HEADS)
    mask = (heads < n_heads)[:, None] & half_ok[None, :]
    lo_ptr = x_ptr + heads[:, None] * stride_h + half_dims[None, :]
    dtype = x_ptr.dtype.element_ty
    x1 = tl.load(lo_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(lo_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + half_dims, mask=half_ok, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + half_dims, mask=half_ok, other=0.0).to(tl.float32)[None, :]
        # Round where the reference rounds: after normalizing and after the weight.
        x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    tl.store(lo_ptr, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(lo_ptr + HALF, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, pos_ptr, cache_ptr, qw_ptr, kw_ptr, eps, num_q_heads, num_k_heads,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
                 NORM: tl.constexpr):
    tok = tl.program_id(0)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    half_dims = tl.arange(0, BLOCK_HALF)
    half_ok = half_dims < HALF
    cos = tl.load(cache_ptr + pos * stride_cache + half_dims, mask=half_ok, other=0.0)[None, :]
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + half_dims, mask=half_ok, other=0.0)[None, :]
    _rotate_heads(q_ptr + tok.to(tl.int64) * stride_qt, stride_qh, num_q_heads, qw_ptr, eps, cos, sin,
                  half_dims, half_ok, HALF, BLOCK_QH, NORM)
    _rotate_heads(k_ptr + tok.to(tl.int64) * stride_kt, stride_kh, num_k_heads, kw_ptr, eps, cos, sin,
                  half_dims, half_ok, HALF, BLOCK_KH, NORM)


def _launch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
            q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float) -> None:
    T, num_q_heads, head_dim = q.shape
    assert k.shape[0] == T and k.shape[2] == head_dim and positions.shape == (T,), (q.shape, k.shape)
    assert head_dim % 2 == 0 and cos_sin_cache.shape[-1] == head_dim, (head_dim, cos_sin_cache.shape)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1, "need a contiguous last dim"
    assert cos_sin_cache.dtype == torch.float32, cos_sin_cache.dtype
    assert positions.stride(0) == 1, "positions must be contiguous"
    if T == 0:
        return
    norm = q_weight is not None
    half = head_dim // 2
    _rope_kernel[(T,)](
        q, k, positions, cos_sin_cache, q_weight if norm else q, k_weight if norm else k, eps,
        num_q_heads, k.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_QH=triton.next_power_of_2(num_q_heads),
        BLOCK_KH=triton.next_power_of_2(k.shape[1]), NORM=norm, num_warps=4)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place by `positions` [T]; cos_sin_cache fp32 [P, D]."""
    _launch(q, k, positions, cos_sin_cache, None, None, 0.0)
    return q, k


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k over head_dim (weights [D]), then the rotation; in place."""
    assert q_weight.shape == k_weight.shape == (q.shape[-1],), (q_weight.shape, k_weight.shape)
    assert q_weight.is_contiguous() and k_weight.is_contiguous()
    _launch(q, k, positions, cos_sin_cache, q_weight, k_weight, eps)
    return q, k
