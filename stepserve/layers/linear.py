"""Linear layers whose weights come from the checkpoint: created uninitialized, filled by the loader.

`MergedLinear` stacks several checkpoint matrices along the output dim (q/k/v, gate/up) so one GEMM
computes them all; `load_shard` copies one of them into its rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stepserve.errors import ModelLoadError


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)

    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor, source: str) -> None:
        """Copy checkpoint tensor `source` into rows of shard `shard` of `self.<param_name>`."""
        start = sum(self.output_sizes[:shard])
        rows = getattr(self, param_name).data[start : start + self.output_sizes[shard]]
        if rows.shape != tensor.shape:
            raise ModelLoadError(f"tensor {source} has shape {tuple(tensor.shape)}, expected {tuple(rows.shape)}")
        rows.copy_(tensor)
