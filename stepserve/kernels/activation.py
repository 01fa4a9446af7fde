"""Triton SwiGLU: silu(gate) * up from x = [gate | up] in one pass.

Matches `stepserve.layers.activation.silu_and_mul` (torch on x.dtype): silu is computed in float32 and
rounded to x.dtype before the multiply, as torch rounds between the two ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * inter + cols, (act * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] (2-D rows may be strided; the last dim must be contiguous) -> new [..., I]."""
    assert x.shape[-1] % 2 == 0 and x.stride(-1) == 1, (x.shape, x.stride())
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    T, inter = rows.shape[0], rows.shape[1] // 2
    out = torch.empty(T, inter, dtype=x.dtype, device=x.device)
    if T:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](rows, out, inter, rows.stride(0), BLOCK=block,
                                                             num_warps=4)
    return out.view(*x.shape[:-1], inter)
