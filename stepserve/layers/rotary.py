"""Rotary position embeddings: the decoder's 1D rotary in NeoX layout (the head is split in two halves that rotate
together), and the vision tower's 2D rotary over adjacent pairs."""

from __future__ import annotations

import torch
from torch import nn

from stepserve.layers.dispatch import dispatched
from stepserve.layers.norm import rms_norm


def rotary_cos_sin_cache(head_dim: int, max_positions: int, theta: float,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """float32 [max_positions, head_dim]: cos of the head_dim/2 angles, then their sin."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@dispatched
def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] by the angles of `positions` [T] (computed in float32)."""
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2] each
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


@dispatched
def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head RMSNorm of q [T, Hq, D] and k [T, Hk, D] over D, then the rotation.

    One fused kernel on GPU when registered; otherwise the two steps, each on its own kernel or reference.
    """
    return apply_rotary(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), positions, cos_sin_cache)


def apply_rope2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [..., D] by angles whose cos/sin [..., D / 2] broadcast
    against x's pairs; computed in cos's dtype, returned in x's."""
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).to(x.dtype)


@dispatched
def rope2d_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision tower's 2D rotary of q and k [T, H, D] (views of its qkv GEMM's output) by per-token angles,
    cos / sin [T, 1, D / 2]; new tensors, q and k untouched."""
    return apply_rope2d(q, cos, sin), apply_rope2d(k, cos, sin)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin table, so `.to(device)` moves it with the model and layers can share it."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        # Not persistent: derived from the config, never in a checkpoint.
        self.register_buffer("cos_sin_cache", rotary_cos_sin_cache(head_dim, max_positions, theta),
                             persistent=False)
