"""RMSNorm as Qwen3 computes it: statistics in float32, cast back to the input dtype, then the weight; and the
residual stream of a pre-norm decoder, whose adds and norms the decode GEMV can take over (`Residual`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stepserve.layers.dispatch import dispatched


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


@dataclass
class Residual:
    """The residual stream between sublayers: h, in one of three states.

    pending: a sublayer's output not yet added; the next norm adds it in its own pass (fused_add_rms_norm).
    sumsq: h is already summed, by the one-row decode GEMV that produced it (layers.linear.project), which
      also wrote partial sums of h**2: the next norm is then left to the GEMV that reads it (`NormedInput`).
    neither: plain h (the embeddings)."""
    h: torch.Tensor
    pending: torch.Tensor | None = None
    sumsq: torch.Tensor | None = None


@dataclass
class NormedInput:
    """rms_norm(h) not computed yet: the decode GEMV that consumes it normalizes h as it reads it, using the
    producer's partial sums of squares; anything else takes `materialize()`."""
    h: torch.Tensor
    sumsq: torch.Tensor
    weight: torch.Tensor
    eps: float

    def materialize(self) -> torch.Tensor:
        return rms_norm(self.h, self.weight, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def stream(self, s: Residual) -> tuple[torch.Tensor | NormedInput, Residual]:
        """(the normalized stream for the next linear, the stream with any pending output added)."""
        if s.sumsq is not None:
            return NormedInput(s.h, s.sumsq, self.weight, self.eps), s
        if s.pending is None:
            return rms_norm(s.h, self.weight, self.eps), s
        y, h = fused_add_rms_norm(s.pending, s.h, self.weight, self.eps)
        return y, Residual(h)
