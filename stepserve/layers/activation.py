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


# Activations a linear layer can apply to its own output (`activation=` of the layers in layers/linear.py and
# layers/quant.py): each reads [gate | up] and returns half the width. On CUDA the skinny decode kernel fuses
# them into its epilogue.
GATED = {"silu_and_mul": silu_and_mul}


def activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    """x, or GATED[activation](x)."""
    return x if activation is None else GATED[activation](x)


def check_gated(activation: str | None, output_sizes: list[int]) -> None:
    """A layer with a gated activation must produce [gate | up]: one even-sized output or two equal ones."""
    if activation is None:
        return
    if activation not in GATED:
        raise ValueError(f"unknown activation {activation!r}; known: {sorted(GATED)}")
    if not (len(output_sizes) == 1 and output_sizes[0] % 2 == 0 or
            len(output_sizes) == 2 and output_sizes[0] == output_sizes[1]):
        raise ValueError(f"{activation} needs [gate | up] outputs of equal size, got {output_sizes}")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)
