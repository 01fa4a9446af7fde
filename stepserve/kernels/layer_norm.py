"""The vision tower's residual add + LayerNorm (`layers.norm.scaled_add_layer_norm_`) in one pass over memory.

Between its GEMMs a vision block adds a layer-scaled branch to the stream and normalizes the sum, twice per block.
Inductor fuses that into a reduction that loops over the row in two passes (rows of 1536 are past its threshold
for keeping a row in registers), so it reads the stream it just wrote a second time. Here a program keeps its
rows in registers: x and y are read once, the sum written once (into x) and the normalized rows once. Where
the branch's GEMM has already added it to the stream (bf16 out_proj and c_proj, see `PerceptionEncoder`), only x
is read and the norm written: two passes instead of four. Statistics and the sum are computed in float32; the
sum is rounded once to the stream's dtype, as in Inductor's fusion, and the stream's held-back biases (`shift`)
are added to it in float32 before the statistics.

When an fp8 linear reads the norm (`quantize=True`), the rows are quantized for it here too (per token per 128
columns, as `kernels.fp8_gemm.quantize_groups` would): the norm is written once, in fp8, and never in bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stepserve.layers.quant import BLOCK as GROUP
from stepserve.layers.quant import FP8_DTYPE, FP8_MAX, ROW_ALIGN, Fp8Rows, cdiv


@triton.jit
def _scaled_add_layer_norm_kernel(x_ptr, y_ptr, gamma_ptr, shift_ptr, w_ptr, b_ptr, h_ptr, scale_ptr, rows, out_rows,
                                  n_cols, eps, stride_sk, ADD: tl.constexpr, ROWS: tl.constexpr,
                                  BLOCK: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr,
                                  FP8_MAX: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    col_ok = cols < n_cols
    mask = (r < rows) & col_ok
    offs = r.to(tl.int64) * n_cols + cols
    s = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if ADD:
        gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = (s.to(tl.float32) + gamma * y).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + offs, s, mask=mask)
    s = s.to(tl.float32) + tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
    mean = tl.sum(s, 1) / n_cols
    d = tl.where(col_ok, s - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(d * d, 1) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    h = d * rstd[:, None] * w + b
    if QUANT:
        # Rounded to the stream's dtype first, as the unfused norm's output; rows past `rows` (padding up to
        # out_rows) are zeros with scale 1.
        h = tl.where(mask, h.to(x_ptr.dtype.element_ty).to(tl.float32), 0.0)
        g = tl.reshape(h, (ROWS, BLOCK // GROUP, GROUP))
        amax = tl.max(tl.abs(g), 2)
        scale = tl.where(amax > 0, amax / FP8_MAX, 1.0)
        h = tl.reshape(g / scale[:, :, None], (ROWS, BLOCK))
        group = tl.arange(0, BLOCK // GROUP)[None, :]
        tl.store(scale_ptr + group * stride_sk + r, scale, mask=(r < out_rows) & (group * GROUP < n_cols))
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=(r < out_rows) & col_ok)


def _launch(x: torch.Tensor, y: torch.Tensor | None, gamma: torch.Tensor | None, shift: torch.Tensor,
            weight: torch.Tensor, bias: torch.Tensor, eps: float, quantize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x += gamma * y in place (y given; x contiguous), then (h, scales): h in x's dtype and scales empty, or
    (quantize) h in fp8 with its scales, column-major [rows padded to ROW_ALIGN, n_cols / GROUP] (both padded as
    `Fp8Rows` says)."""
    assert x.dim() == 2 and x.is_contiguous() and (y is None or y.shape == x.shape), (x.shape, x.stride())
    add = y is not None
    y = y.contiguous() if add else x
    rows, n_cols = x.shape
    out_rows = cdiv(rows, ROW_ALIGN) * ROW_ALIGN if quantize else rows
    h = torch.empty(out_rows, n_cols, dtype=FP8_DTYPE if quantize else x.dtype, device=x.device)
    scales = torch.empty(cdiv(n_cols, GROUP) if quantize else 0, out_rows, dtype=torch.float32, device=x.device)
    if out_rows:
        block = max(triton.next_power_of_2(n_cols), GROUP)
        # Two rows of 1536 per program with 4 warps: 45 us for the norm alone at two 720p images' 20960 rows (2.8
        # TB/s), where one row with 8 warps took 50 (H100; 89 us either way with the add, four passes).
        per_program = max(1, 4096 // block)
        _scaled_add_layer_norm_kernel[(triton.cdiv(out_rows, per_program),)](
            x, y, gamma if add else shift, shift, weight, bias, h, scales if quantize else h, rows, out_rows, n_cols,
            eps, scales.stride(0), ADD=add, ROWS=per_program, BLOCK=block, QUANT=quantize, GROUP=GROUP,
            FP8_MAX=FP8_MAX, num_warps=min(8, max(1, per_program * block // 1024)))
    return h, scales.t()


@torch.library.custom_op("stepserve::scaled_add_layer_norm_", mutates_args=("x",))
def _scaled_add_layer_norm_op(x: torch.Tensor, y: torch.Tensor | None, gamma: torch.Tensor | None,
                              shift: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                              quantize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, y, gamma, shift, weight, bias, eps, quantize)


@_scaled_add_layer_norm_op.register_fake
def _scaled_add_layer_norm_fake(x, y, gamma, shift, weight, bias, eps, quantize):
    rows, n_cols = x.shape
    out_rows = cdiv(rows, ROW_ALIGN) * ROW_ALIGN if quantize else rows
    return (x.new_empty(out_rows, n_cols, dtype=FP8_DTYPE if quantize else x.dtype),
            x.new_empty(cdiv(n_cols, GROUP) if quantize else 0, out_rows, dtype=torch.float32).t())


def scaled_add_layer_norm_(x: torch.Tensor, y: torch.Tensor | None, gamma: torch.Tensor | None, shift: torch.Tensor,
                           weight: torch.Tensor, bias: torch.Tensor, eps: float,
                           quantize: bool = False) -> torch.Tensor | Fp8Rows:
    """`layers.norm.scaled_add_layer_norm_` for a contiguous x [tokens, width] (any float dtype; a new
    contiguous norm)."""
    # A compiled graph (the vision blocks) calls the kernel as an opaque op: Inductor would fuse it back into
    # its own two-pass reduction.
    fn = _scaled_add_layer_norm_op if torch.compiler.is_compiling() else _launch
    h, scales = fn(x, y, gamma, shift, weight, bias, eps, quantize)
    return Fp8Rows(h, scales, x.shape[0], x.dtype) if quantize else h
