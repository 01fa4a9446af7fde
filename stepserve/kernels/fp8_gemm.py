"""Block-scaled fp8 GEMM for the block-fp8 linear layers (`stepserve.layers.quant`), with its reference.

out[M, N] = x[M, K] @ W[N, K].T (+ bias), W float8_e4m3fn with a float32 scale per 128 x 128 block. x is
quantized per token per 128 columns inside the kernel (scale = amax / 448, as the weights are), so each
128-wide K step is one fp8 tensor-core dot whose fp32 result is scaled by (x group scale) x (W block scale)
and accumulated in fp32; the output is written in x's dtype. torch._scaled_mm cannot do this: it takes
per-tensor or per-row/column scales, not 128 x 128 blocks.

One kernel, two tilings (`default_config`):
- M > 64 (prefill): 64/128 x 128 output tiles, grouped along M so W tiles are reused from L2; one K pass.
- M <= 64 (decode): one 16..64-row tile covers every token, so W, the only large operand, is read once;
  64-column tiles with the K loop split over programs so every SM streams its share of W. The fp32
  partials [splits, M, N] are summed by a second small kernel (deterministic, unlike atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stepserve.kernels.paged_attention import _num_sms
from stepserve.layers.quant import (BLOCK, FP8_DTYPE, FP8_MAX, cdiv, dequantize_fp8_blockwise,
                                    quantize_fp8_per_token_group)

SMALL_M = 64


def fp8_gemm_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's math in plain torch: per-token-group fp8 activations, exact fp8 products, fp32 sums."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_fp8_per_token_group(x2)
    a = xq.float() * xs.repeat_interleave(BLOCK, 1)[:, : x2.shape[1]]
    out = a @ dequantize_fp8_blockwise(weight, weight_scale_inv, torch.float32).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


@triton.jit
def _fp8_gemm_kernel(x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K,
                     stride_xm, stride_wn, stride_wsn, stride_om, stride_split,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, FP8_MAX: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    # Consecutive programs walk down GROUP_M row tiles before moving right: they share W tiles in L2.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    kb_start = split * per_split
    kb_end = tl.minimum(kb_start + per_split, k_blocks)

    cols = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn
    ws_rows = ws_ptr + (offs_n // BLOCK_K) * stride_wsn  # weight blocks are BLOCK_K rows tall too
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kb in range(kb_start, kb_end):
        k = kb * BLOCK_K + cols
        k_ok = k < K
        a = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(a), 1)
        a_scale = tl.where(amax > 0, amax / FP8_MAX, 1.0)
        a_q = (a / a_scale[:, None]).to(tl.float8e4nv)
        w = tl.load(w_cols + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        w_scale = tl.load(ws_rows + kb, mask=n_ok, other=0.0)
        acc += tl.dot(a_q, w) * (a_scale[:, None] * w_scale[None, :])

    out_off = offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(out_ptr + split * stride_split + out_off, acc, mask=ok)


@triton.jit
def _sum_splits_kernel(part_ptr, bias_ptr, out_ptr, M, N, stride_om, HAS_BIAS: tl.constexpr,
                       SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(SPLIT_K):  # a fixed order: the sum does not depend on timing
        acc += tl.load(part_ptr + s * M * N + offs, mask=ok, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + (offs // N) * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=ok)


def default_config(M: int, N: int, K: int, num_sms: int) -> dict:
    """Tile sizes and launch options for an [M, K] x [N, K].T GEMM (see the module docstring)."""
    if M <= SMALL_M:
        block_n = 64
        tiles = cdiv(N, block_n)
        # About two programs per SM, each still streaming at least 4 K blocks (64 KB of W) of its tile.
        split_k = max(1, min(cdiv(2 * num_sms, tiles), cdiv(K, BLOCK) // 4))
        return {"block_m": max(16, triton.next_power_of_2(M)), "block_n": block_n, "split_k": split_k,
                "group_m": 1, "num_warps": 4, "num_stages": 4}
    block_m = 64 if M <= 128 else 128
    block_n = 128 if cdiv(M, block_m) * cdiv(N, 128) >= num_sms else 64
    return {"block_m": block_m, "block_n": block_n, "split_k": 1, "group_m": 8,
            "num_warps": 8 if block_m * block_n >= 128 * 128 else 4, "num_stages": 3}


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
             bias: torch.Tensor | None = None, **config) -> torch.Tensor:
    """Drop-in for `stepserve.layers.quant.fp8_linear` on CUDA: x [..., K] -> [..., N] in x's dtype.

    `config` overrides entries of `default_config` (block_m, block_n, split_k, group_m, num_warps, num_stages).
    """
    K = x.shape[-1]
    N = weight.shape[0]
    assert weight.dtype == FP8_DTYPE and weight.shape[1] == K and weight.stride(-1) == 1, (weight.dtype, weight.shape)
    assert weight_scale_inv.shape == (cdiv(N, BLOCK), cdiv(K, BLOCK)) and weight_scale_inv.dtype == torch.float32
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.view(*x.shape[:-1], N)
    cfg = default_config(M, N, K, _num_sms(x.device)) | config
    split_k = cfg["split_k"]
    target = out if split_k == 1 else torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
    grid = (cdiv(M, cfg["block_m"]) * cdiv(N, cfg["block_n"]), split_k)
    has_bias = bias is not None
    _fp8_gemm_kernel[grid](
        x2, weight, weight_scale_inv, bias if has_bias else x2, target, M, N, K,
        x2.stride(0), weight.stride(0), weight_scale_inv.stride(0), N, M * N,
        HAS_BIAS=has_bias, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=BLOCK, SPLIT_K=split_k,
        GROUP_M=cfg["group_m"], FP8_MAX=FP8_MAX, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split_k > 1:
        _sum_splits_kernel[(cdiv(M * N, 1024),)](target, bias if has_bias else target, out, M, N, N,
                                                 HAS_BIAS=has_bias, SPLIT_K=split_k, BLOCK=1024, num_warps=4)
    return out.view(*x.shape[:-1], N)
