"""Skinny GEMM for decode: out[M, N] = x[M, K] @ W[N, K].T (+ bias) for a few rows of x, W in bf16/fp16 or
block-fp8 (float8_e4m3fn with a float32 scale per 128 x 128 block, `stepserve.layers.quant`).

At M <= 8 a linear layer is a stream over W: every other operand is tiny (x is 64 KB at most, and stays in
L1/L2). The kernel's only job is to keep enough of W in flight to run at memory bandwidth, which cuBLAS's
GEMV does not (~77% of the copy ceiling at batch 1, docs/performance). Each program owns BLOCK_N output
columns (rows of W) and walks K in BLOCK_K steps with vector loads along each contiguous row of W,
accumulating in float32. Two ways to do the arithmetic, chosen per shape by
`default_config` (see benchmarks/NOTES-gemv.md for the measurements):
- register ("fma", M == 1): plain loads of 8 values (16 bytes of bf16, 8 of fp8), each thread multiplies its
  vectors by the matching slice of x and sums them into one float32 per row; the cross-thread sum over K runs once, after the loop. Triton
  does not pipeline plain loads (num_stages has no effect on them, and ptxas sinks a hand-written
  prefetch below the arithmetic to save registers), so bytes in flight come from the loads a step issues
  before its first product and from occupancy: see `default_config`.
- tensor core ("dot", up to MAX_ROWS rows): x padded to 16+ rows (masked, so the padding reads nothing), W as
  the left operand in [BLOCK_N, BLOCK_K] tiles, K-contiguous as stored; Triton pipelines the tiles through
  shared memory with 16-byte cp.async, `num_stages` deep (mma.sync at BLOCK_N 16/32, wgmma from 64).
fp8 weights are dequantized exactly: e4m3 values convert to float32 (or, for the tensor cores, to x's dtype,
which holds every e4m3 value), and each vector's (register path) or each <= 128-wide K step's (dot path)
float32 sum is multiplied by its block scale before it is accumulated. x stays in its dtype: this is
weight-only quantization, one rounding at the end, like the reference.

activation="silu_and_mul": W stacks [gate; up] (2N rows); each program reads its BLOCK_N gate rows and the
matching up rows as one 2 x BLOCK_N row tile and writes silu(gate) * up, so the 2N-wide product never goes
to memory and no second kernel runs (for the decoder MLP's gate_up projection).

Rows of W past N re-read row N - 1 (of their half) rather than being masked, so W's loads carry no
predicate; only the store is masked. With split_k > 1 the K range is cut into that many parts whose float32
partials a second small kernel sums in a fixed order (deterministic, unlike atomics), then adds the bias
and applies the activation. The grid depends only on the shapes and the config, and nothing syncs with the
host: CUDA-graph safe. On Hopper both kernels launch with PDL (`stepserve.kernels.pdl`): the register path
issues its first step's W loads (constant data) before it waits for the kernel that wrote x.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from stepserve.kernels import pdl
from stepserve.kernels.linear_gelu import linear_gelu_fits, linear_quick_gelu
from stepserve.kernels.paged_attention import _num_sms
from stepserve.layers.activation import activate
from stepserve.layers.quant import BLOCK as SCALE_BLOCK
from stepserve.layers.quant import FP8_DTYPE, dequantize_fp8_blockwise

# Decode batches up to this many rows take the skinny kernel (`linear`, `fp8_linear` on CUDA). Measured on the
# H100 as one CUDA graph of a decode step's linears (benchmarks/gemv.py, docs/benchmarks.md): at one row the
# register path wins (bf16 4.91 ms vs cuBLAS 5.77; fp8 2.93 ms); from 4 rows cuBLAS (bf16 5.78 ms vs 5.93,
# 6.61 with the fused SiLU) and cuBLAS's block-scaled fp8 GEMM (3.73 ms at 16 rows vs 5.2) beat the
# tensor-core path, which stays for the benchmarks' comparisons.
SMALL_M_MAX = 1
# What the tensor-core path accepts at all: benchmarks/fp8.py tries it above SMALL_M_MAX, and benchmarks/gemv.py
# --rows compares it with cuBLAS up to a full decode batch (128 rows: a 128-row x tile per pipeline stage).
MAX_ROWS = 128
FUSED_ACTIVATIONS = (None, "silu_and_mul")
# fp8 register-path configs that beat the rule at M = 1 on the H100, by (N, K) of Step3-VL-10B's decoder
# (benchmarks/gemv.py --sweep --fp8: qkv 11.2 -> 9.3 us, o_proj 6.9 -> 6.5, down 18.6 -> 17.6; a step's fp8
# linears 2.53 -> 2.41 ms). 8-byte fp8 loads keep less in flight per program than bf16's 16-byte ones, so
# these shapes want more programs (block_n 4) or more, shorter steps (block_k 1024).
FP8_M1_TUNED = {(6144, 4096): {"block_k": 1024}, (4096, 4096): {"block_n": 4}, (4096, 12288): {"block_n": 4}}
# The register path loads 8 values of W per thread at a time (16 bytes of bf16, 8 of fp8), as many as one
# 16-byte load of x: W and x then share a layout. 16 fp8 values per load would give W a layout of its own and
# move x through shared memory on every step.
FMA_VEC = 8
# A warp's W tile puts 32 lanes x FMA_VEC values along K.
FMA_K_PER_WARP = 32 * FMA_VEC


def linear_small_m_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                             weight_scale_inv: torch.Tensor | None = None,
                             activation: str | None = None) -> torch.Tensor:
    """The kernel's math in plain torch: the exact (dequantized) weight, float32 products and sums, the
    activation in float32, one rounding to x's dtype."""
    w = weight.float() if weight_scale_inv is None else dequantize_fp8_blockwise(weight, weight_scale_inv,
                                                                                 torch.float32)
    out = F.linear(x.float(), w, None if bias is None else bias.float())
    if activation == "silu_and_mul":
        gate, up = out.chunk(2, dim=-1)
        out = F.silu(gate) * up
    return out.to(x.dtype)


@triton.jit
def _silu_mul(gate, up):
    return gate / (1.0 + tl.exp(-gate)) * up


@triton.jit
def _block_scale(ws_ptr, first, second, part, kcol, SILU: tl.constexpr):
    """The fp8 scale of each row of the tile at scale column(s) kcol. A tile's rows of one half share a scale
    row (BLOCK_N divides the 128-row block), so this is one small load per half instead of one per row."""
    s = tl.load(ws_ptr + first + kcol)
    if SILU:
        s = tl.where(part == 0, s, tl.load(ws_ptr + second + kcol))
    return s


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_wsn, stride_om,
                 stride_split, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, SILU: tl.constexpr,
                 USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, VEC: tl.constexpr, SCALE_BLOCK: tl.constexpr, SPLIT_K: tl.constexpr,
                 USE_PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    ROWS: tl.constexpr = BLOCK_N * (1 + SILU)
    r = tl.arange(0, ROWS)
    part = r // BLOCK_N  # 0: the rows of the output (or the gate), 1: the up rows
    offs_n = pid_n * BLOCK_N + r % BLOCK_N  # the output column each row of the tile feeds
    pre_col = offs_n + part * N  # its column before the activation: W row, bias entry, split-K partial
    # Rows past N re-read row N - 1 of their half (their results are never stored): no predicate on W's loads.
    w_rows = w_ptr + (tl.minimum(offs_n, N - 1) + part * N).to(tl.int64)[:, None] * stride_wn  # [ROWS, 1]
    if HAS_SCALE:
        scale_first = (pid_n * BLOCK_N // SCALE_BLOCK) * stride_wsn
        scale_second = ((N + pid_n * BLOCK_N) // SCALE_BLOCK) * stride_wsn
        scale_cols = tl.cdiv(K, SCALE_BLOCK)

    k_steps = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_steps, SPLIT_K)
    k_start = split * per_split * BLOCK_K
    k_end = tl.minimum(k_start + per_split * BLOCK_K, K)
    cols = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    if USE_DOT:
        acc = tl.zeros((ROWS, BLOCK_M), tl.float32)
    else:
        acc2 = tl.zeros((ROWS, BLOCK_K // VEC), tl.float32)
    if USE_DOT:  # the pipeliner issues x's loads with W's ahead of the loop: wait for x's producer first
        pdl.wait_for_predecessor(USE_PDL)
    for k in range(k_start, k_end, BLOCK_K):
        offs_k = k + cols
        if not USE_DOT:  # VEC values per load however narrow W's values are (see FMA_VEC)
            offs_k = tl.max_contiguous(offs_k, VEC)
        k_ok = offs_k < K
        if EVEN_K:
            w = tl.load(w_rows + offs_k[None, :], eviction_policy="evict_first")
        else:
            w = tl.load(w_rows + offs_k[None, :], mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
        if USE_DOT:
            # x rows past M are masked (not clamped): padding to 16 rows then costs no memory traffic.
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if HAS_SCALE:  # BLOCK_K divides 128: the whole step has one scale column
                s = _block_scale(ws_ptr, scale_first, scale_second, part[:, None], k // SCALE_BLOCK, SILU)
                acc += tl.dot(w.to(x.dtype), tl.trans(x)) * s
            else:
                acc = tl.dot(w, tl.trans(x), acc)  # [ROWS, BLOCK_M]
        else:  # M == 1
            if k == k_start:  # the first step's W loads (constant data) are already in flight during the wait
                pdl.wait_for_predecessor(USE_PDL)
            if EVEN_K:
                x = tl.load(x_ptr + offs_k)[None, :]
            else:
                x = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0)[None, :]
            # Each thread sums its own products per row and vector: fewer registers than keeping every product,
            # no cross-thread reduction inside the loop, and one fp8 scale multiply per vector.
            prod = w.to(tl.float32) * x.to(tl.float32)
            vec_sums = tl.sum(tl.reshape(prod, (ROWS, BLOCK_K // VEC, VEC)), axis=2)
            if HAS_SCALE:
                kcol = (k + tl.arange(0, BLOCK_K // VEC) * VEC) // SCALE_BLOCK
                if not EVEN_K:  # vectors past K (their W reads as 0) may have no scale column
                    kcol = tl.minimum(kcol, scale_cols - 1)
                vec_sums *= _block_scale(ws_ptr, scale_first, scale_second, part[:, None], kcol[None, :], SILU)
            acc2 += vec_sums
    if not USE_DOT:
        acc = tl.sum(acc2, axis=1)[:, None]  # [ROWS, 1]
    pdl.wait_for_predecessor(USE_PDL)  # a split with no K steps still stores: it must have waited too

    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + pre_col, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        if SILU:
            gate, up = tl.split(tl.permute(tl.reshape(acc, (2, BLOCK_N, BLOCK_M)), (1, 2, 0)))
            acc = _silu_mul(gate, up)
        out_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = (out_n < N)[:, None] & m_ok[None, :]
        tl.store(out_ptr + offs_m[None, :] * stride_om + out_n[:, None], acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:  # float32 partials [SPLIT_K, M, N * (1 + SILU)], summed and activated by _sum_splits_kernel
        ok = (offs_n < N)[:, None] & m_ok[None, :]
        tl.store(out_ptr + split * stride_split + offs_m[None, :] * stride_om + pre_col[:, None], acc, mask=ok)


@triton.jit
def _sum_splits_kernel(part_ptr, bias_ptr, out_ptr, M, N, stride_om, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                       SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """out[m, n] = sum over splits of part[s, m, n] (+ bias[n]); with SILU, silu(that) * (the same at n + N)."""
    pdl.wait_for_predecessor(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    m = offs // N
    n = offs % N
    width = N * (1 + SILU)
    src = part_ptr + m * width + n
    acc = tl.zeros((BLOCK,), tl.float32)
    up = tl.zeros((BLOCK,), tl.float32)
    for s in range(SPLIT_K):  # a fixed order: the sum does not depend on timing
        acc += tl.load(src + s * M * width, mask=ok, other=0.0)
        if SILU:
            up += tl.load(src + s * M * width + N, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=ok, other=0.0).to(tl.float32)
        if SILU:
            up += tl.load(bias_ptr + N + n, mask=ok, other=0.0).to(tl.float32)
    if SILU:
        acc = _silu_mul(acc, up)
    tl.store(out_ptr + m * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=ok)


def sum_splits(partials: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, silu: bool = False) -> None:
    """out [M, N] = partials [split, M, N * (1 + silu)] summed over splits (+ bias), silu(gate) * up if silu."""
    M, N = out.shape
    has_bias = bias is not None
    use_pdl = pdl.enabled(out.device)
    _sum_splits_kernel[(triton.cdiv(M * N, 1024),)](partials, bias if has_bias else partials, out, M, N,
                                                    out.stride(0), HAS_BIAS=has_bias, SILU=silu,
                                                    SPLIT_K=partials.shape[0], BLOCK=1024, USE_PDL=use_pdl,
                                                    num_warps=4, launch_pdl=use_pdl)


def default_config(M: int, N: int, K: int, num_sms: int, fp8: bool = False, silu: bool = False) -> dict:
    """Launch config for an [M, K] x [N', K].T product with M <= MAX_ROWS rows, N output columns (N' = 2N
    with silu), bf16/fp16 or fp8 weights (see benchmarks/NOTES-gemv.md).

    M = 1 takes the register path with 8 rows of W per program (4 gate + 4 up with silu): N / 8 programs
    (512 for the 4096-wide layers, ~19k for lm_head), so every SM streams W from ~4 resident programs and
    the last wave is short. Larger M takes the tensor-core path with 16 rows per program (32 for fp8, whose
    steps are at most 128 wide: one scale column each). Split-K only where programs < SMs."""
    halves = 2 if silu else 1
    if M == 1:
        # Two loads per row per thread: ptxas then issues 14-16 of a step's 16 loads of W before the first
        # product: ~28 KB in flight per program in bf16 (16-byte loads; 120 registers, 4 programs per SM),
        # 16 KB in fp8 (8-byte loads; 96-103 registers, 4-5 per SM). See NOTES-gemv.md.
        cfg = {"use_dot": False, "block_n": 8 // halves, "block_k": 2 * FMA_K_PER_WARP * 4, "num_stages": 1}
        if fp8 and not silu:
            cfg |= FP8_M1_TUNED.get((N, K), {})
    elif fp8:
        cfg = {"use_dot": True, "block_n": 32 // halves, "block_k": 128, "num_stages": 6}
    else:
        cfg = {"use_dot": True, "block_n": 16 // halves, "block_k": 256, "num_stages": 4}
    cfg["num_warps"] = 4
    if cfg["use_dot"]:  # x's padded tile grows with M: keep the pipeline within ~64 KB, 3+ programs per SM
        x_rows, w_rows = max(16, triton.next_power_of_2(M)), halves * cfg["block_n"]
        stage_bytes = cfg["block_k"] * (2 * x_rows + w_rows * (1 if fp8 else 2))
        cfg["num_stages"] = max(2, min(cfg["num_stages"], (64 << 10) // stage_bytes))
    tiles = triton.cdiv(N, cfg["block_n"])
    k_steps = triton.cdiv(K, cfg["block_k"])
    cfg["split_k"] = 1 if tiles >= num_sms else max(1, min(triton.cdiv(2 * num_sms, tiles), k_steps))
    return cfg


def linear_small_m(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   weight_scale_inv: torch.Tensor | None = None, activation: str | None = None,
                   out: torch.Tensor | None = None, **config) -> torch.Tensor:
    """F.linear for at most MAX_ROWS rows of x ([..., K] -> [..., N] in x's dtype), float32 sums.

    weight: [N', K] in x's dtype, or float8_e4m3fn with `weight_scale_inv` [ceil(N'/128), ceil(K/128)].
    activation="silu_and_mul": weight stacks [gate; up], N' = 2N, and the result is silu(gate) * up.
    `out` (contiguous [M, N], x's dtype) receives the result when given. `config` overrides entries of
    `default_config`: use_dot, block_n, block_k, split_k, num_warps, num_stages. The register path
    (use_dot=False) takes M == 1 only, and wants block_k = FMA_K_PER_WARP * num_warps * (loads per row per
    thread): then x's slice lands in the same threads as W's columns; any other value moves x through shared
    memory on every step. The fp8 tensor-core path wants a block_k that divides 128."""
    if activation not in FUSED_ACTIVATIONS:  # applied to the result (so `out` cannot take it)
        assert out is None, activation
        return activate(linear_small_m(x, weight, bias, weight_scale_inv=weight_scale_inv, **config), activation)
    K = x.shape[-1]
    silu = activation == "silu_and_mul"
    fp8 = weight_scale_inv is not None
    assert weight.dim() == 2 and weight.shape[1] == K and weight.stride(-1) == 1, (weight.shape, weight.stride())
    assert weight.dtype == (FP8_DTYPE if fp8 else x.dtype), (weight.dtype, x.dtype)
    assert not silu or weight.shape[0] % 2 == 0, weight.shape
    N = weight.shape[0] // (2 if silu else 1)
    assert bias is None or (bias.shape == (weight.shape[0],) and bias.is_contiguous()), bias.shape
    x2 = x.reshape(math.prod(x.shape[:-1]), K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"linear_small_m takes at most {MAX_ROWS} rows, got {M}")
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    assert out.shape == (M, N) and out.dtype == x.dtype and out.is_contiguous(), (out.shape, out.dtype)
    if M == 0 or N == 0:
        return out.view(*x.shape[:-1], N)
    if K == 0:
        out.copy_(linear_small_m_reference(x2, weight, bias, weight_scale_inv=weight_scale_inv,
                                           activation=activation))
        return out.view(*x.shape[:-1], N)
    cfg = default_config(M, N, K, _num_sms(x.device), fp8, silu) | config
    split_k, block_n, block_k, use_dot = cfg["split_k"], cfg["block_n"], cfg["block_k"], cfg["use_dot"]
    if not use_dot and M != 1:
        raise ValueError("the register path (use_dot=False) takes one row of x")
    if fp8:
        assert weight_scale_inv.shape == (triton.cdiv(weight.shape[0], SCALE_BLOCK), triton.cdiv(K, SCALE_BLOCK))
        assert weight_scale_inv.dtype == torch.float32 and weight_scale_inv.stride(-1) == 1
        # One scale row per half of a row tile, one scale column per tensor-core step.
        assert SCALE_BLOCK % block_n == 0 and (not silu or N % block_n == 0), (block_n, N)
        assert not use_dot or SCALE_BLOCK % block_k == 0, block_k
    target = out if split_k == 1 else torch.empty(split_k, M, N * (1 + silu), dtype=torch.float32, device=x.device)
    has_bias = bias is not None
    use_pdl = pdl.enabled(x.device)
    _gemv_kernel[(triton.cdiv(N, block_n), split_k)](
        x2, weight, weight_scale_inv if fp8 else weight, bias if has_bias else weight, target, M, N, K,
        x2.stride(0), weight.stride(0), weight_scale_inv.stride(0) if fp8 else 0, target.stride(-2),
        M * N * (1 + silu), HAS_BIAS=has_bias, HAS_SCALE=fp8, SILU=silu, USE_DOT=use_dot, EVEN_K=K % block_k == 0,
        BLOCK_M=max(16, triton.next_power_of_2(M)) if use_dot else 1, BLOCK_N=block_n, BLOCK_K=block_k,
        VEC=FMA_VEC, SCALE_BLOCK=SCALE_BLOCK, SPLIT_K=split_k, USE_PDL=use_pdl, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], launch_pdl=use_pdl)
    if split_k > 1:
        sum_splits(target, bias, out, silu)
    return out.view(*x.shape[:-1], N)


def skinny(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` / `fp8_linear` on CUDA give x to the skinny kernel: a decode batch in bf16/fp16."""
    return x.numel() <= SMALL_M_MAX * x.shape[-1] and x.dtype in (torch.bfloat16, torch.float16) and \
        weight.dtype in (x.dtype, FP8_DTYPE)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """`layers.linear.linear` on CUDA: the skinny kernel for up to SMALL_M_MAX rows of bf16/fp16 (with a gated
    activation fused), a GEMM with quick-GELU in its epilogue, else cuBLAS and the activation kernel."""
    if skinny(x, weight):
        return linear_small_m(x, weight, bias, activation=activation)
    if activation == "quick_gelu" and linear_gelu_fits(x, weight, bias):
        return linear_quick_gelu(x, weight, bias)
    return activate(F.linear(x, weight, bias), activation)
