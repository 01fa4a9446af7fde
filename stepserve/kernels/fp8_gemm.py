"""Block-fp8 linear layers on CUDA: `fp8_gemm` is the `fp8_linear` layer function's kernel; it picks a path
by the number of rows M of x (`fp8_path`, an explicit rule whose thresholds benchmarks/fp8.py measures):

- "skinny" (M <= SKINNY_MAX): kernels/gemv.py, weight-only. x stays in bf16; W is read once and dequantized
  exactly in registers (register path at M = 1, tensor cores above), float32 sums, one rounding. Decode is a
  stream over W, so this runs at memory bandwidth in fp8 bytes; it also fuses silu_and_mul.
- "scaled_mm" (larger M, where torch has it for this GPU: sm_90, torch >= 2.10 built with CUDA >= 12.9):
  cuBLAS's block-scaled fp8 GEMM (torch.nn.functional.scaled_mm with 1x128 activation groups and 128x128
  weight blocks, DeepSeek-V3's recipe). x is quantized per token per 128 columns by `quantize_groups` (scale
  amax / 448, as the weights are), and cuBLAS applies both scales per 128-wide K block in float32: fp8 tensor
  core rate for prefill.
- "dequant" (larger M elsewhere): W dequantized to x's dtype by one Triton pass, then cuBLAS bf16. Weight-only
  like the reference; costs one read of W and a write + read of its bf16 copy per call.

`fp8_gemm_w8a8` is the Triton block-scaled GEMM this module used for every M before (x quantized per token
group inside the kernel, each 128-wide K step one fp8 dot scaled in float32): benchmarks/fp8.py keeps it as a
candidate, since a better-tuned config of it could still win a range of M.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from stepserve.kernels.gemv import linear_small_m, sum_splits
from stepserve.kernels.paged_attention import _num_sms
from stepserve.layers.activation import activate
from stepserve.layers.quant import (BLOCK, FP8_DTYPE, FP8_MAX, ROW_ALIGN, Fp8Rows, cdiv, dequantize_fp8_blockwise,
                                    dequantize_rows, quantize_fp8_per_token_group)

# Rows up to which the skinny kernel beats the GEMMs: only its register path does (benchmarks/fp8.py and
# gemv.py on the H100: a step's four linears x 36 take 5.14 ms through the tensor-core path at M = 16 and
# 10.6 at 64, against 3.73 and 4.11 through scaled_mm; see kernels/gemv.py SMALL_M_MAX).
SKINNY_MAX = 1
SMALL_M = 64  # fp8_gemm_w8a8's decode tiling (one row tile, split-K) up to this many rows


def fp8_gemm_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """The W8A8 paths' math in plain torch: per-token-group fp8 activations, exact fp8 products, fp32 sums."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_fp8_per_token_group(x2)
    a = xq.float() * xs.repeat_interleave(BLOCK, 1)[:, : x2.shape[1]]
    out = a @ dequantize_fp8_blockwise(weight, weight_scale_inv, torch.float32).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


@torch.compiler.assume_constant_result  # a compiled graph (the vision tower) takes its answer as a constant
@functools.cache
def scaled_mm_supported(device: torch.device) -> bool:
    """Whether F.scaled_mm has the 1x128 x 128x128 block recipe here: PyTorch implements it through cuBLASLt
    (CUDA >= 12.9) on sm_90 only. Decided without a trial call, so the answer is the same during graph capture."""
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    return device.type == "cuda" and hasattr(F, "scaled_mm") and cuda >= (12, 9) and \
        torch.cuda.get_device_capability(device) == (9, 0)


def fp8_path(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> str:
    """The rule `fp8_gemm` follows: "skinny" up to SKINNY_MAX rows of bf16/fp16, then "scaled_mm" where it is
    supported and the shape is whole 128 blocks (cuBLAS's scale layouts), else "dequant"."""
    if M <= SKINNY_MAX and dtype in (torch.bfloat16, torch.float16):
        return "skinny"
    if N % BLOCK == 0 and K % BLOCK == 0 and scaled_mm_supported(device):
        return "scaled_mm"
    return "dequant"


def fp8_gemm(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
             bias: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """`stepserve.layers.quant.fp8_linear` on CUDA: x [..., K] -> [..., N] in x's dtype, by `fp8_path`. An
    `Fp8Rows` x goes to cuBLAS as it is where the path is scaled_mm (else it is dequantized first)."""
    if isinstance(x, Fp8Rows):
        if fp8_path(x.rows, weight.shape[0], weight.shape[1], x.dtype, x.q.device) == "scaled_mm":
            return activate(fp8_scaled_mm(x, weight, weight_scale_inv, bias), activation)
        x = dequantize_rows(x)
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    path = fp8_path(x2.shape[0], weight.shape[0], K, x.dtype, x.device)
    if path == "skinny":
        return linear_small_m(x, weight, bias, weight_scale_inv=weight_scale_inv, activation=activation)
    if path == "scaled_mm":
        out = fp8_scaled_mm(x2, weight, weight_scale_inv, bias)
    else:
        out = F.linear(x2, dequantize_fp8(weight, weight_scale_inv, x.dtype), bias)
    out = activate(out, activation)
    return out.view(*x.shape[:-1], out.shape[-1])


def fp8_mlp(x: torch.Tensor | Fp8Rows, fc_weight: torch.Tensor, fc_scale_inv: torch.Tensor,
            fc_bias: torch.Tensor | None, proj_weight: torch.Tensor, proj_scale_inv: torch.Tensor,
            proj_bias: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """`stepserve.layers.quant.fp8_mlp` on CUDA. On the scaled_mm path the first GEMM's output stays without its
    bias and activation; the quantization of the second GEMM's input applies both in the same pass (on the vision
    MLP's [tokens, 8960] hidden, one read in bf16 and one write in fp8 instead of Inductor's two passes)."""
    lead = None if isinstance(x, Fp8Rows) else x.shape[:-1]
    x2 = x if lead is None else x.reshape(-1, x.shape[-1])
    M, device = (x.rows, x.q.device) if lead is None else (x2.shape[0], x.device)
    paths = {fp8_path(M, w.shape[0], w.shape[1], x.dtype, device) for w in (fc_weight, proj_weight)}
    if paths != {"scaled_mm"} or activation not in (None, "quick_gelu"):
        return fp8_gemm(fp8_gemm(x, fc_weight, fc_scale_inv, fc_bias, activation), proj_weight, proj_scale_inv,
                        proj_bias)
    hidden = fp8_scaled_mm(x2, fc_weight, fc_scale_inv)
    out = fp8_scaled_mm(hidden, proj_weight, proj_scale_inv, proj_bias, x_bias=fc_bias, x_activation=activation)
    return out if lead is None else out.view(*lead, out.shape[-1])


# -- scaled_mm: activation quantization + cuBLAS ------------------------------------------------------------
@triton.jit
def _quantize_groups_kernel(x_ptr, bias_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_sk, FP8_MAX: tl.constexpr,
                            GROUPS: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr):
    row = tl.program_id(0)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = g[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # [GROUPS, BLOCK]
    x_cols = tl.where(row < M, K, 0)  # rows M.. are padding: zeros with scale 1
    x = tl.load(x_ptr + row.to(tl.int64) * stride_xm + cols, mask=cols < x_cols, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=cols < x_cols, other=0.0).to(tl.float32)
    if GELU:  # quick-GELU, rounded to x's dtype first as the unfused layer's output would be
        x = (x * tl.sigmoid(1.702 * x)).to(x_ptr.dtype.element_ty).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.where(amax > 0, amax / FP8_MAX, 1.0)
    q = x / scale[:, None]
    tl.store(q_ptr + row.to(tl.int64) * K + cols, q.to(q_ptr.dtype.element_ty), mask=cols < K)
    tl.store(s_ptr + g * stride_sk + row, scale, mask=g < tl.cdiv(K, BLOCK))


def quantize_groups(x: torch.Tensor, rows: int, bias: torch.Tensor | None = None,
                    activation: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """activate(x + bias) for x [M, K] -> fp8 [rows, K] and float32 scales [rows, K / 128] (column-major, as
    cuBLAS wants them, from the Triton kernel); rows >= M are zero (cuBLAS wants the row count a multiple of
    4). Same math as `quantize_fp8_per_token_group`; activation: None or "quick_gelu"."""
    M, K = x.shape
    if activation not in (None, "quick_gelu"):
        raise ValueError(f"quantize_groups applies no activation {activation!r}")
    if torch.compiler.is_compiling() and bias is None and activation is None:
        # Inside a compiled graph, plain torch ops: Inductor fuses them into the kernel that produces x (a layer
        # norm, quick-GELU), so the activation is read once in bf16 and written once in fp8.
        return quantize_fp8_per_token_group(F.pad(x, (0, 0, 0, rows - M)))
    fn = quantize_groups_op if torch.compiler.is_compiling() else _quantize_groups
    return fn(x, rows, bias, activation)


def _quantize_groups(x: torch.Tensor, rows: int, bias: torch.Tensor | None,
                     activation: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    q = torch.empty(rows, K, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(cdiv(K, BLOCK), rows, dtype=torch.float32, device=x.device)
    # 8 groups, 2 warps, 1 stage: the fastest of 14 configs on the vision MLP's hidden (H100, [20960, 8960] with
    # bias + quick-GELU: 236 us, at 2.4 TB/s; 4 warps 274 us, 16 groups 255 us).
    groups = 8
    _quantize_groups_kernel[(rows, cdiv(cdiv(K, BLOCK), groups))](
        x, bias, q, s, M, K, x.stride(0), s.stride(0), FP8_MAX=FP8_MAX, GROUPS=groups, BLOCK=BLOCK,
        HAS_BIAS=bias is not None, GELU=activation == "quick_gelu", num_warps=2, num_stages=1)
    return q, s.t()


# Compiled graphs (the vision tower) call the fused bias + activation + quantization as one opaque kernel: Inductor
# splits it into two passes (the group maxima, then the activation again and the quantization).
quantize_groups_op = torch.library.custom_op("stepserve::quantize_groups", _quantize_groups, mutates_args=())


@quantize_groups_op.register_fake
def _quantize_groups_fake(x, rows, bias, activation):
    return (x.new_empty(rows, x.shape[1], dtype=FP8_DTYPE),
            x.new_empty(cdiv(x.shape[1], BLOCK), rows, dtype=torch.float32).t())


def fp8_scaled_mm(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                  bias: torch.Tensor | None = None, x_bias: torch.Tensor | None = None,
                  x_activation: str | None = None) -> torch.Tensor:
    """x [M, K] (K, N multiples of 128) -> [M, N] through F.scaled_mm's BlockWise1x128 x BlockWise128x128
    recipe; the same math as `fp8_gemm_reference`. x_bias / x_activation: the GEMM reads activate(x + x_bias),
    applied as x is quantized (see `quantize_groups`). An `Fp8Rows` x is already quantized."""
    if isinstance(x, Fp8Rows):
        assert x_bias is None and x_activation is None, "an Fp8Rows activation is already quantized"
        q, s, M, dtype = x
    else:
        M, dtype = x.shape[0], x.dtype
        q, s = quantize_groups(x if x.stride(-1) == 1 else x.contiguous(), cdiv(M, ROW_ALIGN) * ROW_ALIGN, x_bias,
                               x_activation)
    # Dynamo cannot trace F.scaled_mm: a compiled graph calls it as an opaque op (eager skips the op's overhead).
    mm = block_scaled_mm if torch.compiler.is_compiling() else _block_scaled_mm
    return mm(q, s, weight, weight_scale_inv, dtype, bias)[:M]


def _block_scaled_mm(q: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                     out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    s = s.t().contiguous().t()  # cuBLAS reads activation scales column-major (a no-op for quantize_groups')
    # and the weight's as [K / 128 rounded up to 4, N / 128], column-major.
    ws = weight_scale_inv
    if ws.shape[1] % 4:
        ws = F.pad(ws, (0, -ws.shape[1] % 4))
    # The bias in cuBLAS's epilogue: a separate add pass costs as much as the fp8 GEMM saves (H100, the vision
    # qkv [20960, 1536] x [4608, 1536]: 322 us + 298 us for the add, against 351 us with it in the epilogue).
    return F.scaled_mm(q, weight.t(), s, F.ScalingType.BlockWise1x128, ws.t(), F.ScalingType.BlockWise128x128,
                       bias=bias, output_dtype=out_dtype)


block_scaled_mm = torch.library.custom_op("stepserve::block_scaled_mm", _block_scaled_mm, mutates_args=())


@block_scaled_mm.register_fake
def _block_scaled_mm_fake(q, s, weight, weight_scale_inv, out_dtype, bias=None):
    return q.new_empty(q.shape[0], weight.shape[0], dtype=out_dtype)


# -- dequant: W to bf16 once, then cuBLAS -----------------------------------------------------------------
@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = (rows < N)[:, None] & (cols < K)[None, :]
    w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :], mask=ok, other=0.0)
    scale = tl.load(s_ptr + tl.program_id(0) * stride_sn + tl.program_id(1))
    out = w.to(tl.float32) * scale
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_on + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=ok)


def dequantize_fp8(weight: torch.Tensor, weight_scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`dequantize_fp8_blockwise` in one pass: one program per 128 x 128 block."""
    N, K = weight.shape
    out = torch.empty(N, K, dtype=dtype, device=weight.device)
    _dequant_kernel[(cdiv(N, BLOCK), cdiv(K, BLOCK))](weight, weight_scale_inv, out, N, K, weight.stride(0),
                                                      weight_scale_inv.stride(0), out.stride(0), BLOCK=BLOCK,
                                                      num_warps=8)
    return out


# -- the Triton W8A8 GEMM -------------------------------------------------------------------------------
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


def default_config(M: int, N: int, K: int, num_sms: int) -> dict:
    """fp8_gemm_w8a8's tiles: M > 64 (prefill): 64/128 x 128 output tiles, grouped along M so W tiles are
    reused from L2, one K pass. M <= 64: one 16..64-row tile covers every token, so W is read once; 64-column
    tiles with the K loop split over programs so every SM streams its share of W."""
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


def fp8_gemm_w8a8(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                  bias: torch.Tensor | None = None, **config) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype with the math of `fp8_gemm_reference`, in one Triton kernel.

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
        sum_splits(target, bias, out)
    return out.view(*x.shape[:-1], N)
