"""The towers' norms: RMSNorm as Qwen3 computes it (statistics in float32, cast back to the input dtype, then the
weight) for the decoder; the vision tower's layer-scaled residual add with the LayerNorm that follows it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stepserve.layers.dispatch import dispatched
from stepserve.layers.quant import Fp8Rows


@dispatched
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalize over the last dim of `x` (any leading shape)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@dispatched
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual stream of a pre-norm block in one pass."""
    summed = x + residual
    return rms_norm.reference(summed, weight, eps), summed


@dispatched
def scaled_add_layer_norm(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor, eps: float,
                          quantize: bool = False) -> tuple[torch.Tensor, torch.Tensor | Fp8Rows]:
    """(s, layer_norm(s)) for s = x + gamma * y: a pre-norm block's layer-scaled residual add and the norm after
    it; x, y [tokens, width], gamma / weight / bias [width]. On CUDA one pass: each input read once.

    quantize: the norm feeds fp8 linears only. The CUDA kernel then returns it as `Fp8Rows`, quantized as the W8A8
    GEMM would quantize it; the reference, like `fp8_linear`'s (weight-only), returns it unquantized."""
    s = x + gamma * y
    return s, F.layer_norm(s, s.shape[-1:], weight, bias, eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rms_norm(x), or with a residual the pair (rms_norm(x + residual), x + residual)."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)
