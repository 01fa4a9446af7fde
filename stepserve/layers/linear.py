"""Linear layers whose weights come from the checkpoint: created uninitialized, filled by the loader.

`MergedLinear` stacks several checkpoint matrices along the output dim (q/k/v, gate/up) so one GEMM
computes them all; `load_weight(..., shard=i)` copies the i-th of them into its rows. A layer built with
`activation="silu_and_mul"` returns silu(gate) * up of its [gate | up] output (half its width): on CUDA a
decode batch gets it from the GEMV's epilogue, without the 2I-wide intermediate. Block-fp8 variants live in
`layers/quant.py` and load through the same `load_weight` interface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stepserve.errors import ModelLoadError
from stepserve.layers.activation import activate, check_activation
from stepserve.layers.dispatch import dispatched


@dispatched
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """x @ weight.T + bias, then `activation` (layers.activation.ACTIVATIONS; None: none); on CUDA, decode-sized x
    (a few rows) goes to a bandwidth-bound skinny kernel with the activation in its epilogue."""
    return activate(F.linear(x, weight, bias), activation)


@torch.library.custom_op("stepserve::add_linear_", mutates_args=("out",))
def add_linear_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """out += x @ weight.T in one GEMM (cuBLAS adds out in its epilogue) for out [M, N], x [M, K], weight [N, K]:
    a residual stream whose branch ends in a bias-free linear. An op, so that a compiled graph updates out in
    place: Inductor would write the sum to a new buffer and copy it back into out, two more passes."""
    out.addmm_(x, weight.t())


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
        check_activation(activation, self.output_sizes)
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.activation)

    def load_weight(self, param_name: str, tensor: torch.Tensor, source: str, shard: int | None = None) -> None:
        """Copy checkpoint tensor `source` into `self.<param_name>` (or its rows of shard `shard`)."""
        copy_weight(shard_rows(getattr(self, param_name).data, self.output_sizes, shard), tensor, source)


class MergedLinear(Linear):
    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, activation: str | None = None):
        check_activation(activation, output_sizes)
        super().__init__(in_features, sum(output_sizes), bias, activation)
        self.output_sizes = list(output_sizes)
