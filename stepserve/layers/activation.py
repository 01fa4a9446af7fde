"""Activations of the two towers: SwiGLU for the decoder MLP, quick-GELU for the vision MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stepserve.layers.dispatch import dispatched


@dispatched
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim -> silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)
