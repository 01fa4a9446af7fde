"""The vision tower's residual add + LayerNorm (`layers.norm.scaled_add_layer_norm`) in one pass over memory.

Between its GEMMs a vision block adds a layer-scaled branch to the stream and normalizes the sum, twice per block.
Inductor fuses that into a reduction that loops over the row in two passes (rows of 1536 are past its threshold
for keeping a row in registers), so it reads the stream it just wrote a second time. Here a program keeps its
rows in registers: x and y are read once, the sum and the normalized rows written once. Statistics and the sum
are computed in float32; the sum is rounded once to the stream's dtype, as in Inductor's fusion.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scaled_add_layer_norm_kernel(x_ptr, y_ptr, gamma_ptr, w_ptr, b_ptr, s_ptr, h_ptr, rows, n_cols, eps,
                                  ROWS: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    col_ok = cols < n_cols
    mask = (r < rows) & col_ok
    offs = r.to(tl.int64) * n_cols + cols
    gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = (x + gamma * y).to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + offs, s, mask=mask)
    s = s.to(tl.float32)
    mean = tl.sum(s, 1) / n_cols
    d = tl.where(col_ok, s - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(d * d, 1) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs, (d * rstd[:, None] * w + b).to(h_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    assert x.shape == y.shape and x.dim() == 2, (x.shape, y.shape)
    x, y = x.contiguous(), y.contiguous()
    s, h = torch.empty_like(x), torch.empty_like(x)
    rows, n_cols = x.shape
    if rows:
        block = triton.next_power_of_2(n_cols)
        per_program = max(1, 2048 // block)  # a few short rows per program, one long row
        _scaled_add_layer_norm_kernel[(triton.cdiv(rows, per_program),)](
            x, y, gamma, weight, bias, s, h, rows, n_cols, eps, ROWS=per_program, BLOCK=block,
            num_warps=min(8, max(1, per_program * block // 256)))
    return s, h


@torch.library.custom_op("stepserve::scaled_add_layer_norm", mutates_args=())
def _scaled_add_layer_norm_op(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, y, gamma, weight, bias, eps)


@_scaled_add_layer_norm_op.register_fake
def _scaled_add_layer_norm_fake(x, y, gamma, weight, bias, eps):
    return torch.empty_like(x), torch.empty_like(x)


def scaled_add_layer_norm(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`layers.norm.scaled_add_layer_norm` for x, y [tokens, width] (any float dtype; new contiguous outputs)."""
    # A compiled graph (the vision blocks) calls the kernel as an opaque op: Inductor would fuse it back into
    # its own two-pass reduction.
    fn = _scaled_add_layer_norm_op if torch.compiler.is_compiling() else _launch
    return fn(x, y, gamma, weight, bias, eps)
