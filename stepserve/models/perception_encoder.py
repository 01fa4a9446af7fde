"""PE-lang G/14 vision tower of Step3-VL-10B, with the two stride-2 conv downsamplers it owns.

pixels [B, 3, S, S] -> patches (grid g = S / 14) -> + absolute position embedding (bilinear-resized when
g differs from the trained 52) -> ln_pre -> pre-norm blocks with layer scale and 2D rotary attention ->
two 3x3 stride-2 convs -> [B, (g / 4)^2, 4 * width]. Module names follow the checkpoint, so its tensors
load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stepserve.layers.activation import quick_gelu
from stepserve.layers.quant import Fp8Config, make_linear
from stepserve.models.configs import VisionConfig


def rope2d_angles(grid: int, head_dim: int, theta: float) -> torch.Tensor:
    """float32 [grid, grid, head_dim / 2]: one angle per rotated pair; column angles, then row angles."""
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)
    pos = torch.arange(grid, dtype=torch.float32)
    col = torch.outer(pos, inv_freq)[None, :, :].expand(grid, grid, -1)
    row = torch.outer(pos, inv_freq)[:, None, :].expand(grid, grid, -1)
    return torch.cat([col, row], dim=-1)


def apply_rope2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [..., N, D] by angles whose cos/sin are [N, D / 2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, quant: Fp8Config | None = None, prefix: str = ""):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        # nn.MultiheadAttention's layout: q, k, v stacked along the output dim.
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * cfg.width))
        self.out_proj = make_linear(quant, f"{prefix}.out_proj", cfg.width, cfg.width, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, head_dim]
        o = F.scaled_dot_product_attention(apply_rope2d(q, cos, sin), apply_rope2d(k, cos, sin), v)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, -1))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig, quant: Fp8Config | None = None, prefix: str = ""):
        super().__init__()
        self.c_fc = make_linear(quant, f"{prefix}.c_fc", cfg.width, cfg.mlp_dim, bias=True)
        self.c_proj = make_linear(quant, f"{prefix}.c_proj", cfg.mlp_dim, cfg.width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(quick_gelu(self.c_fc(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, quant: Fp8Config | None = None, prefix: str = ""):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg, quant, f"{prefix}.attn")
        self.ls_1 = LayerScale(cfg.width)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg, quant, f"{prefix}.mlp")
        self.ls_2 = LayerScale(cfg.width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), cos, sin))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class PerceptionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, quant: Fp8Config | None = None, prefix: str = "vision_model"):
        """quant: which linears hold block-fp8 weights, by checkpoint name under `prefix` (None: none)."""
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.conv1 = nn.Conv2d(cfg.num_channels, w, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.grid * cfg.grid, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(VisionBlock(cfg, quant, f"{prefix}.transformer.resblocks.{i}")
                                                   for i in range(cfg.layers))
        self.vit_downsampler1 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.vit_downsampler2 = nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1)
        self.register_buffer("rope_angles", rope2d_angles(cfg.grid, cfg.head_dim, cfg.rope_theta), persistent=False)

    def compile_blocks(self) -> None:
        """Fuse each block's pointwise work (2D rope, quick-GELU, layer scale, norms) with torch.compile.

        All blocks share one compiled graph (shapes are dynamic), so this costs one compile, not 47.
        """
        for block in self.transformer.resblocks:
            block.compile(dynamic=True)

    def _position_embedding(self, grid: int) -> torch.Tensor:
        pos = self.positional_embedding
        if grid == self.cfg.grid:
            return pos
        full = pos.float().view(1, self.cfg.grid, self.cfg.grid, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(full, size=(grid, grid), mode="bilinear", align_corners=False, antialias=False)
        return resized.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, (S / 56)^2, 4 * width]."""
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))  # [B, w, g, g]
        b, w, grid, _ = x.shape
        x = self.ln_pre(x.flatten(2).transpose(1, 2) + self._position_embedding(grid))
        # A smaller grid (crops) uses the first rows/cols of the trained grid's angles, unscaled.
        angles = self.rope_angles[:grid, :grid].reshape(grid * grid, -1)
        cos, sin = angles.cos(), angles.sin()
        for block in self.transformer.resblocks:
            x = block(x, cos, sin)
        x = x.transpose(1, 2).reshape(b, w, grid, grid)
        x = self.vit_downsampler2(self.vit_downsampler1(x))
        return x.flatten(2).transpose(1, 2)
