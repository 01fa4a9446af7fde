"""Triton RMSNorm, optionally fused with the residual add: one program per row, one pass over memory.

Matches the references `stepserve.layers.norm.rms_norm` / `fused_add_rms_norm` bit for bit up to the
order of the float32 sum: statistics in float32, the normalized row rounded to x.dtype, then multiplied by
the weight and rounded again (Qwen3's order), and the residual sum rounded to x.dtype as torch's add does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stepserve.kernels import pdl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, sum_ptr, inner, n_cols, eps,
                     stride_xo, stride_xi, stride_ro, stride_ri,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0)
    # Rows of a [outer, inner, n_cols] view: covers q/k heads sliced out of a fused qkv projection.
    x_row = (row // inner) * stride_xo + (row % inner) * stride_xi
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = y_ptr.dtype.element_ty
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # a weight: no kernel writes it
    pdl.wait_for_predecessor(USE_PDL)
    x = tl.load(x_ptr + x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r_row = (row // inner) * stride_ro + (row % inner) * stride_ri
        x = x + tl.load(res_ptr + r_row + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(dtype)
        tl.store(sum_ptr + row * n_cols + cols, x, mask=mask)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    y = (x * rstd).to(dtype).to(tl.float32) * w
    tl.store(y_ptr + row * n_cols + cols, y.to(dtype), mask=mask)


def _rows_view(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """x as [outer, inner, H] without copying when possible: (view, inner, outer stride, inner stride)."""
    assert x.stride(-1) == 1, "rms_norm needs a contiguous last dim"
    if x.dim() == 2:
        return x, 1, x.stride(0), 0
    if x.dim() == 3:
        return x, x.shape[1], x.stride(0), x.stride(1)
    flat = x.reshape(-1, x.shape[-1])
    return flat, 1, flat.stride(0), 0


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_cols = x.shape[-1]
    assert weight.shape == (n_cols,) and weight.is_contiguous(), (weight.shape, n_cols)
    xv, inner, sxo, sxi = _rows_view(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = y.numel() // n_cols
    if residual is None:
        summed, rv, sro, sri = None, xv, 0, 0
    else:
        assert residual.shape == x.shape, (residual.shape, x.shape)
        rv, _, sro, sri = _rows_view(residual)
        summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows:
        block = triton.next_power_of_2(n_cols)
        use_pdl = pdl.enabled(x.device)
        _rms_norm_kernel[(rows,)](
            xv, rv, weight, y, summed if summed is not None else y, inner, n_cols, eps,
            sxo, sxi, sro, sri, HAS_RESIDUAL=residual is not None, BLOCK=block, USE_PDL=use_pdl,
            num_warps=min(16, max(1, block // 256)), launch_pdl=use_pdl)
    return y, summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x (any leading shape; rows may be strided); returns a new tensor."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; both outputs are new contiguous tensors."""
    y, summed = _launch(x, residual, weight, eps)
    return y, summed
