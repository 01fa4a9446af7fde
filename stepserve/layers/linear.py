"""Linear layers whose weights come from the checkpoint: created uninitialized, filled by the loader.

`MergedLinear` stacks several checkpoint matrices along the output dim (q/k/v, gate/up) so one GEMM
computes them all; `load_weight(..., shard=i)` copies the i-th of them into its rows. A layer built with
`activation="silu_and_mul"` returns silu(gate) * up of its [gate | up] output (half its width): on CUDA a
decode batch gets it from the GEMV's epilogue, without the 2I-wide intermediate. Block-fp8 variants live in
`layers/quant.py` and load through the same `load_weight` interface.

Every linear layer also takes the decoder's residual stream (`project`): its input may be a `NormedInput`,
and with `residual=` it returns the stream with its output added. At one decode row on CUDA one GEMV does
the norm, the product and the add, so no norm kernel runs between the linears.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from stepserve.errors import ModelLoadError
from stepserve.layers.activation import activate, check_gated
from stepserve.layers.dispatch import dispatched, kernel_for
from stepserve.layers.norm import NormedInput, Residual


@dispatched
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """x @ weight.T + bias, then `activation` (layers.activation.GATED; None: none); on CUDA, decode-sized x
    (a few rows) goes to a bandwidth-bound skinny kernel with the activation in its epilogue."""
    return activate(F.linear(x, weight, bias), activation)


def project(layer: nn.Module, x: torch.Tensor | NormedInput, residual: Residual | None,
            dense: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | Residual:
    """A linear layer's forward: `dense(x)`, or with `residual` the stream plus that. The one-row CUDA kernel
    (kernels.gemv.fused_linear) takes x's pending RMSNorm and the add when it can; otherwise the norm is
    materialized and the output left pending for the next norm's fused add (same math, more kernels)."""
    normed = isinstance(x, NormedInput)
    h = x.h if normed else x
    if normed or residual is not None:
        fused = kernel_for("fused_linear", h)
        out = None if fused is None else fused(
            h, layer.weight, layer.bias, weight_scale_inv=getattr(layer, "weight_scale_inv", None),
            activation=layer.activation, norm=(x.weight, x.eps, x.sumsq) if normed else None,
            residual=None if residual is None else residual.h)
        if out is not None:
            return out if residual is None else Residual(out[0].view(residual.h.shape), sumsq=out[1])
    out = dense(x.materialize() if normed else x)
    if residual is None:
        return out
    assert residual.pending is None, "a stream with an output pending takes its norm before the next add"
    return Residual(residual.h, pending=out)


def copy_weight(dst: torch.Tensor, src: torch.Tensor, source: str) -> None:
    """Copy checkpoint tensor `source` into `dst`; a shape mismatch, or fp8 bytes going into a wider
    parameter (which would drop their block scales), is a ModelLoadError naming the tensor."""
    if dst.shape != src.shape:
        raise ModelLoadError(f"tensor {source} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    if src.element_size() == 1 and src.is_floating_point() and dst.element_size() != 1:
        raise ModelLoadError(f"tensor {source} is stored as {src.dtype}, but its module is not quantized "
                             f"(its parameter is {dst.dtype}); only linear layers can load fp8 weights")
    dst.copy_(src)


def shard_rows(param: torch.Tensor, output_sizes: list[int], shard: int | None,
               rows_per_entry: int = 1) -> torch.Tensor:
    """The rows of `param` that hold shard `shard` of a merged matrix (all rows when shard is None).

    A parameter with one entry per `rows_per_entry` output rows (block scales) takes ceil(size / that)."""
    if shard is None:
        return param
    start = sum(output_sizes[:shard]) // rows_per_entry
    return param[start: start + -(-output_sizes[shard] // rows_per_entry)]


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, activation: str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.output_sizes = [out_features]
        check_gated(activation, self.output_sizes)
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor | NormedInput, residual: Residual | None = None) -> torch.Tensor | Residual:
        return project(self, x, residual, lambda t: linear(t, self.weight, self.bias, self.activation))

    def load_weight(self, param_name: str, tensor: torch.Tensor, source: str, shard: int | None = None) -> None:
        """Copy checkpoint tensor `source` into `self.<param_name>` (or its rows of shard `shard`)."""
        copy_weight(shard_rows(getattr(self, param_name).data, self.output_sizes, shard), tensor, source)


class MergedLinear(Linear):
    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, activation: str | None = None):
        check_gated(activation, output_sizes)
        super().__init__(in_features, sum(output_sizes), bias, activation)
        self.output_sizes = list(output_sizes)
