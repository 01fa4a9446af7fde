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


# Activations a linear layer can apply to its own output (`activation=` of the layers in layers/linear.py and
# layers/quant.py). A gated one reads [gate | up] and returns half the width; on CUDA the skinny decode kernel
# fuses it into its epilogue. quick-GELU keeps the width; on CUDA a large GEMM applies it in its epilogue.
GATED = {"silu_and_mul": silu_and_mul}
ACTIVATIONS = GATED | {"quick_gelu": quick_gelu}


def activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    """x, or ACTIVATIONS[activation](x)."""
    return x if activation is None else ACTIVATIONS[activation](x)


def check_activation(activation: str | None, output_sizes: list[int]) -> None:
    """A known activation; a gated one needs [gate | up] outputs: one even-sized output or two equal ones."""
    if activation is None:
        return
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    if activation in GATED and not (len(output_sizes) == 1 and output_sizes[0] % 2 == 0 or
                                    len(output_sizes) == 2 and output_sizes[0] == output_sizes[1]):
        raise ValueError(f"{activation} needs [gate | up] outputs of equal size, got {output_sizes}")
