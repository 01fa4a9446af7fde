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
def scaled_add_layer_norm_(x: torch.Tensor, y: torch.Tensor | None, gamma: torch.Tensor | None, shift: torch.Tensor,
                           weight: torch.Tensor, bias: torch.Tensor, eps: float,
                           quantize: bool = False) -> torch.Tensor | Fp8Rows:
    """layer_norm(x + shift) after x += gamma * y in place: a pre-norm block's layer-scaled residual add (none
    when y is None: a GEMM already added its branch to x) and the norm after it. x, y [tokens, width]; gamma,
    weight, bias [width]; shift float32 [width], the biases the stream x holds back (`PerceptionEncoder`'s
    folded layer scales). On CUDA one pass: each input read once, x written only when y is given.

    quantize: the norm feeds fp8 linears only. The CUDA kernel then returns it as `Fp8Rows`, quantized as the W8A8
    GEMM would quantize it; the reference, like `fp8_linear`'s (weight-only), returns it unquantized."""
    if y is not None:
        x.add_(gamma * y)
    return F.layer_norm(x.float() + shift, x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


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
