"""Skinny bf16 GEMM for decode (M <= SMALL_M_MAX tokens): out[M, N] = x[M, K] @ W[N, K].T (+ bias).

At M <= 8 a linear layer is a stream over W: every other operand is tiny (x is 64 KB at most, and stays in
L1/L2). The kernel's only job is to keep enough of W in flight to run at memory bandwidth, which cuBLAS's
GEMV does not (~77% of the copy ceiling at batch 1, docs/performance). Each program owns BLOCK_N output
columns (rows of W) and walks K in BLOCK_K steps with 16-byte loads along each contiguous row of W,
accumulating in float32. Two ways to do the arithmetic, chosen per shape by `default_config` (see
benchmarks/NOTES-gemv.md for the measurements):
- register ("fma", M == 1): plain loads, each thread multiplies its 16-byte vectors by the matching slice of
  x and sums them into one float32 per row; the cross-thread sum over K runs once, after the loop. Triton
  does not pipeline plain loads (num_stages has no effect on them, and ptxas sinks a hand-written
  prefetch below the arithmetic to save registers), so bytes in flight come from the loads a step issues
  before its first product and from occupancy: see `default_config`.
- tensor core ("dot", any M <= 16): x padded to 16 rows (masked, so the padding reads nothing), W as the
  left operand in [BLOCK_N, BLOCK_K] tiles, K-contiguous as stored; Triton pipelines the tiles through
  shared memory with 16-byte cp.async, `num_stages` deep (mma.sync at BLOCK_N 16/32, wgmma from 64).
Rows of W past N re-read row N - 1 rather than being masked, so W's loads carry no predicate; only the store
is masked. With split_k > 1 the K range is cut into that many parts whose float32 partials a second small
kernel sums in a fixed order (deterministic, unlike atomics).
The grid depends only on (M, N, K) and the config, and nothing syncs with the host: CUDA-graph safe.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from stepserve.kernels.fp8_gemm import _sum_splits_kernel
from stepserve.kernels.paged_attention import _num_sms

SMALL_M_MAX = 8
# The register path's W tile puts 32 lanes x 8 bf16 (one 16-byte vector each) along K per warp.
FMA_K_PER_WARP = 256


def linear_small_m_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's math in plain torch: float32 products and sums, one rounding to x's dtype."""
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, stride_split,
                 HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    # Rows past N re-read row N - 1 (their results are never stored), so W's loads need no predicate.
    w_rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]

    k_steps = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_steps, SPLIT_K)
    k_start = split * per_split * BLOCK_K
    k_end = tl.minimum(k_start + per_split * BLOCK_K, K)
    cols = tl.arange(0, BLOCK_K)
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K // 8), tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        offs_k = k + cols
        k_ok = offs_k < K
        if EVEN_K:
            w = tl.load(w_rows + offs_k[None, :], eviction_policy="evict_first")
        else:
            w = tl.load(w_rows + offs_k[None, :], mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
        if USE_DOT:
            # x rows past M are masked (not clamped): padding to 16 rows then costs no memory traffic.
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            acc = tl.dot(w, tl.trans(x), acc)  # [BLOCK_N, BLOCK_M]
        else:  # M == 1
            if EVEN_K:
                x = tl.load(x_ptr + offs_k)
            else:
                x = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0)
            # Each thread sums its own 8 products per row (one 16-byte vector): a quarter of the registers of
            # keeping every product, and still no cross-thread reduction inside the loop.
            prod = w.to(tl.float32) * x.to(tl.float32)[None, :]
            acc2 += tl.sum(tl.reshape(prod, (BLOCK_N, BLOCK_K // 8, 8)), axis=2)
    if USE_DOT:
        acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    else:
        acc = tl.sum(acc2, axis=1)[None, :]

    ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    out_off = offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(out_ptr + split * stride_split + out_off, acc, mask=ok)


def default_config(M: int, N: int, K: int, num_sms: int) -> dict:
    """Launch config for an [M, K] x [N, K].T product with M <= SMALL_M_MAX (see benchmarks/NOTES-gemv.md).

    M = 1 takes the register path with 8 rows of W per program: N / 8 programs (512 for the 4096-wide layers,
    ~19k for lm_head), so every SM streams W from ~4 resident programs and the last wave is short.
    Larger M takes the tensor-core path with 16 rows per program. Split-K only where programs < SMs."""
    if M == 1:
        # Two 16-byte vectors per row per thread: ptxas then issues 14 of a step's 16 loads before the first
        # product (at one vector it issues 4 of 8, then waits), ~28 KB in flight per program, 4 per SM.
        cfg = {"use_dot": False, "block_n": 8, "num_warps": 4, "num_stages": 1}
        cfg["block_k"] = 2 * FMA_K_PER_WARP * cfg["num_warps"]
    else:
        cfg = {"use_dot": True, "block_n": 16, "block_k": 256, "num_warps": 4, "num_stages": 4}
    tiles = triton.cdiv(N, cfg["block_n"])
    k_steps = triton.cdiv(K, cfg["block_k"])
    cfg["split_k"] = 1 if tiles >= num_sms else max(1, min(triton.cdiv(2 * num_sms, tiles), k_steps))
    return cfg


def linear_small_m(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   out: torch.Tensor | None = None, **config) -> torch.Tensor:
    """F.linear for at most SMALL_M_MAX rows of x ([..., K] -> [..., N] in x's dtype), float32 sums.

    `out` (contiguous [M, N], x's dtype) receives the result when given. `config` overrides entries of
    `default_config`: use_dot, block_n, block_k, split_k, num_warps, num_stages. The register path
    (use_dot=False) takes M == 1 only, and wants block_k = FMA_K_PER_WARP * num_warps (a multiple works
    too): then x's slice lands in the same threads as W's columns; any other value moves x through shared
    memory on every step."""
    K = x.shape[-1]
    N = weight.shape[0]
    assert weight.dim() == 2 and weight.shape[1] == K and weight.stride(-1) == 1, (weight.shape, weight.stride())
    assert weight.dtype == x.dtype, (weight.dtype, x.dtype)
    assert bias is None or (bias.shape == (N,) and bias.is_contiguous()), bias.shape
    x2 = x.reshape(math.prod(x.shape[:-1]), K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M > SMALL_M_MAX:
        raise ValueError(f"linear_small_m takes at most {SMALL_M_MAX} rows, got {M}")
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    assert out.shape == (M, N) and out.dtype == x.dtype and out.is_contiguous(), (out.shape, out.dtype)
    if M == 0 or N == 0:
        return out.view(*x.shape[:-1], N)
    if K == 0:
        out.copy_(bias.expand(M, N) if bias is not None else torch.zeros_like(out))
        return out.view(*x.shape[:-1], N)
    cfg = default_config(M, N, K, _num_sms(x.device)) | config
    split_k, block_n, block_k = cfg["split_k"], cfg["block_n"], cfg["block_k"]
    if not cfg["use_dot"] and M != 1:
        raise ValueError("the register path (use_dot=False) takes one row of x")
    target = out if split_k == 1 else torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
    has_bias = bias is not None
    _gemv_kernel[(triton.cdiv(N, block_n), split_k)](
        x2, weight, bias if has_bias else weight, target, M, N, K, x2.stride(0), weight.stride(0), N, M * N,
        HAS_BIAS=has_bias, USE_DOT=cfg["use_dot"], EVEN_K=K % block_k == 0, BLOCK_M=16 if cfg["use_dot"] else 1,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split_k > 1:
        _sum_splits_kernel[(triton.cdiv(M * N, 1024),)](target, bias if has_bias else target, out, M, N, N,
                                                        HAS_BIAS=has_bias, SPLIT_K=split_k, BLOCK=1024, num_warps=4)
    return out.view(*x.shape[:-1], N)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`layers.linear.linear` on CUDA: the skinny kernel for up to SMALL_M_MAX rows of bf16/fp16, else cuBLAS."""
    if x.numel() <= SMALL_M_MAX * x.shape[-1] and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype:
        return linear_small_m(x, weight, bias)
    return F.linear(x, weight, bias)
