"""PE-lang G/14 vision tower of Step3-VL-10B, with the two stride-2 conv downsamplers it owns.

pixels [B, 3, S, S] -> patches (grid g = S / 14) -> + absolute position embedding (bilinear-resized when
g differs from the trained 52) -> ln_pre -> pre-norm blocks with layer scale and 2D rotary attention ->
two 3x3 stride-2 convs -> [B, (g / 4)^2, 4 * width]. Module names follow the checkpoint, so its tensors
load without renaming.

Inside the blocks the tokens of a batch are one flat [tokens, width] matrix, in the layout every GEMM reads
and writes: q/k/v stay the qkv GEMM's [tokens, heads, head_dim] rows, attention reads them through strided
views and writes [tokens, width] for out_proj, so no transpose copy is made around attention. `VisionOptions`
selects among implementations of the same function (all compared in `benchmarks/vision_tower.py --sweep`).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from stepserve.host_copy import to_device
from stepserve.layers import flash_attention4
from stepserve.layers.linear import Linear, add_linear_
from stepserve.layers.norm import scaled_add_layer_norm_
from stepserve.layers.quant import Fp8Config, Fp8Linear, Fp8Rows, fp8_mlp, make_linear
from stepserve.layers.rotary import rope2d_qk
from stepserve.models.configs import VisionConfig

_SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                  "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
_VARLEN_BACKENDS = ("varlen", "fa4")  # one launch over all sequences, located by cu_seqlens


@dataclass(frozen=True)
class VisionOptions:
    """How the tower runs on CUDA. CPU runs honour all but `attention` (always torch's choice there).

    attention: "auto" ("fa4" where it can run, else torch's SDPA choice), one SDPA backend ("cudnn", "flash",
        "efficient", "math"), or one varlen launch over all sequences of the batch, whatever their lengths:
        "varlen" (torch's FlashAttention-2) or "fa4" (FlashAttention-4, the `fa4` extra, Hopper GPUs).
    packed: the global views and the crops go through the blocks as one token batch (bigger GEMMs, half the
        launches) instead of one pass per resolution.
    rope_dtype: the dtype the 2D rotation is computed in.
    patch_embed: "conv" (cuDNN) or "gemm" (the non-overlapping 14x14 patches are a reshape, then one GEMM).
    channels_last: the downsampler convs read the tokens in place (NHWC is the blocks' output layout) and
        keep their weights in NHWC; otherwise the tokens are copied to NCHW first.
    compile_mode: torch.compile mode used by `compile_blocks` (None: the default mode).
    """

    attention: str = "auto"
    packed: bool = True  # measured on the H100: 168.4 vs 172.2 ms for two 1280x720 images (docs/benchmarks.md)
    rope_dtype: torch.dtype = torch.float32
    patch_embed: str = "gemm"
    channels_last: bool = True
    compile_mode: str | None = None

    def __post_init__(self):
        if self.attention not in ("auto", *_VARLEN_BACKENDS, *_SDPA_BACKENDS):
            raise ValueError(f"unknown vision attention {self.attention!r}")
        if self.patch_embed not in ("conv", "gemm"):
            raise ValueError(f"unknown patch_embed {self.patch_embed!r}")


DEFAULT_OPTIONS = VisionOptions()


def rope2d_angles(grid: int, head_dim: int, theta: float) -> torch.Tensor:
    """float32 [grid, grid, head_dim / 2]: one angle per rotated pair; column angles, then row angles."""
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)
    pos = torch.arange(grid, dtype=torch.float32)
    col = torch.outer(pos, inv_freq)[None, :, :].expand(grid, grid, -1)
    row = torch.outer(pos, inv_freq)[:, None, :].expand(grid, grid, -1)
    return torch.cat([col, row], dim=-1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: torch.Tensor, cu_seqlens: torch.Tensor | None,
            backend: str) -> list[torch.Tensor]:
    """Bidirectional attention within each sequence of a flat batch: q, k, v [T, heads, head_dim] (any strides
    with a contiguous last dim) -> the outputs [tokens, heads * head_dim] of consecutive groups of rows, one tensor
    for all of T (varlen backends) or one per group of sequences (SDPA backends).

    groups: CPU int64 [G, 2], rows (sequences, tokens per sequence), laid out back to back along T.
    cu_seqlens: int32 offsets of every sequence on q's device (backends "varlen" and "fa4" only).
    """
    t = q.shape[0]
    if backend in _VARLEN_BACKENDS and q.is_cuda:
        longest = int(groups[:, 1].max())
        if backend == "fa4":
            out = flash_attention4.varlen_attention(q, k, v, cu_seqlens, longest)
        else:
            from torch.nn.attention.varlen import varlen_attn

            out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, longest, longest)
        return [out.reshape(t, -1)]
    outs, start = [], 0
    use = sdpa_kernel(_SDPA_BACKENDS[backend]) if q.is_cuda and backend in _SDPA_BACKENDS else contextlib.nullcontext()
    with use:
        for count, length in groups.tolist():
            end = start + count * length
            # [count * length, heads, D] -> [count, heads, length, D] views; the kernels read these strides and
            # write the output in q's order, so reshaping it back to tokens is free.
            seqs = [x[start:end].unflatten(0, (count, length)).transpose(1, 2) for x in (q, k, v)]
            outs.append(F.scaled_dot_product_attention(*seqs).transpose(1, 2).reshape(end - start, -1))
            start = end
    return outs


# Both are opaque ops to torch.compile, so the compiled blocks do not copy q/k/v into another layout.
@torch.library.custom_op("stepserve::vision_attention", mutates_args=())
def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: torch.Tensor,
                     cu_seqlens: torch.Tensor | None, backend: str) -> torch.Tensor:
    """The attention of `_attend` as one contiguous [T, heads * head_dim] tensor."""
    outs = _attend(q, k, v, groups, cu_seqlens, backend)
    return (outs[0] if len(outs) == 1 else torch.cat(outs)).contiguous()


@vision_attention.register_fake
def _vision_attention_fake(q, k, v, groups, cu_seqlens, backend):
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


@torch.library.custom_op("stepserve::vision_attention_add_", mutates_args=("out",))
def vision_attention_add_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: torch.Tensor,
                          cu_seqlens: torch.Tensor | None, backend: str, weight: torch.Tensor,
                          out: torch.Tensor) -> None:
    """out += vision_attention(...) @ weight.T: the output projection adds the attention to the residual stream
    out [T, weight rows] in its GEMM. Each group's output is projected straight into its rows of out instead of
    being concatenated first (H100, two 720p images, per layer: the concatenation took 50 us, two GEMMs into
    slices 10 us more than one)."""
    start = 0
    for o in _attend(q, k, v, groups, cu_seqlens, backend):
        out[start:start + o.shape[0]].addmm_(o, weight.t())
        start += o.shape[0]


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, quant: Fp8Config | None = None, prefix: str = ""):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        # nn.MultiheadAttention's layout: q, k, v stacked along the output dim (the checkpoint's in_proj_weight).
        self.in_proj = make_linear(quant, f"{prefix}.in_proj", cfg.width, 3 * cfg.width, bias=True)
        # Quantized at load time, out_proj stays in bf16: at 1536 x 1536 its fp8 GEMM saves less than quantizing
        # its input costs (H100, two 720p images: 0.174 + 0.095 ms against 0.193). An fp8 checkpoint's loads as stored.
        out_quant = None if quant is not None and quant.quantize_on_load else quant
        self.out_proj = make_linear(out_quant, f"{prefix}.out_proj", cfg.width, cfg.width, bias=True)
        self.adds_to_stream = isinstance(self.out_proj, Linear)  # see PerceptionEncoder.fold_layer_scales

    def forward(self, h: torch.Tensor | Fp8Rows, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                groups: torch.Tensor, cu_seqlens: torch.Tensor | None, backend: str) -> torch.Tensor | None:
        """Attention over the norm h; adds its output to the stream x in place (None), or returns it."""
        qkv = self.in_proj(h)
        q, k, v = qkv.view(qkv.shape[0], 3, self.heads, self.head_dim).unbind(1)
        q, k = rope2d_qk(q, k, cos, sin)
        if self.adds_to_stream:
            vision_attention_add_(q, k, v, groups, cu_seqlens, backend, self.out_proj.weight, x)
            return None
        return self.out_proj(vision_attention(q, k, v, groups, cu_seqlens, backend))


class LayerScale(nn.Module):
    """The per-channel scale of a residual branch (in its last linear's rows once folded, else applied by
    `scaled_add_layer_norm_`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(dim))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig, quant: Fp8Config | None = None, prefix: str = ""):
        super().__init__()
        # On CUDA the GEMM applies quick-GELU in its epilogue (the pre-activation never reaches memory).
        self.c_fc = make_linear(quant, f"{prefix}.c_fc", cfg.width, cfg.mlp_dim, bias=True, activation=cfg.hidden_act)
        self.c_proj = make_linear(quant, f"{prefix}.c_proj", cfg.mlp_dim, cfg.width, bias=True)
        self.adds_to_stream = isinstance(self.c_proj, Linear)  # see PerceptionEncoder.fold_layer_scales

    def forward(self, h: torch.Tensor | Fp8Rows, x: torch.Tensor) -> torch.Tensor | None:
        """The MLP of the norm h; adds its output to the stream x in place (None), or returns it."""
        fc, proj = self.c_fc, self.c_proj
        if isinstance(fc, Fp8Linear) and isinstance(proj, Fp8Linear):
            return fp8_mlp(h, fc.weight, fc.weight_scale_inv, fc.bias, proj.weight, proj.weight_scale_inv, proj.bias,
                           fc.activation)
        if self.adds_to_stream:
            add_linear_(x, fc(h), proj.weight)
            return None
        return proj(fc(h))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, quant: Fp8Config | None = None, prefix: str = ""):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg, quant, f"{prefix}.attn")
        self.ls_1 = LayerScale(cfg.width)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg, quant, f"{prefix}.mlp")
        self.ls_2 = LayerScale(cfg.width)
        # The biases the stream holds back before each norm (see PerceptionEncoder.fold_layer_scales).
        self.register_buffer("shift_1", torch.zeros(cfg.width, dtype=torch.float32), persistent=False)
        self.register_buffer("shift_2", torch.zeros(cfg.width, dtype=torch.float32), persistent=False)
        # A norm that feeds an fp8 linear comes out quantized for it (`Fp8Rows`): no bf16 copy of it is written.
        self.fp8_norms = (isinstance(self.attn.in_proj, Fp8Linear), isinstance(self.mlp.c_fc, Fp8Linear))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None, gamma: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, groups: torch.Tensor, cu_seqlens: torch.Tensor | None,
                backend: str) -> torch.Tensor | None:
        """Updates the stream x [tokens, width] in place: x += gamma * y (the block before's MLP output, when its
        GEMM did not add it itself; else None), then this block. Returns this block's MLP output for the next
        block to add (so that each residual add and the norm after it are one pass over the stream), or None
        when c_proj added it. gamma [width]; cos/sin [tokens, 1, head_dim / 2]; groups/cu_seqlens/backend: see
        `_attend`."""
        ln_1, ln_2 = self.ln_1, self.ln_2
        h = scaled_add_layer_norm_(x, y, gamma, self.shift_1, ln_1.weight, ln_1.bias, ln_1.eps, self.fp8_norms[0])
        attn = self.attn(h, x, cos, sin, groups, cu_seqlens, backend)
        h = scaled_add_layer_norm_(x, attn, self.ls_1.gamma, self.shift_2, ln_2.weight, ln_2.bias, ln_2.eps,
                                   self.fp8_norms[1])
        return self.mlp(h, x)


def _fold(linear: Linear, gamma: torch.Tensor) -> torch.Tensor:
    """Scale linear's rows by gamma and zero its bias, in place; returns the bias it held back, gamma * b
    (float32)."""
    g = gamma.float()
    linear.weight.copy_(linear.weight.float() * g[:, None])
    if linear.bias is None:
        return torch.zeros_like(g)
    held = g * linear.bias.float()
    linear.bias.zero_()
    return held


def _run_block(block: VisionBlock, *args) -> torch.Tensor | None:
    # Compiled with the block as an argument, all 47 blocks share one graph (their weights are its inputs).
    return block(*args)


class PerceptionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, quant: Fp8Config | None = None, prefix: str = "vision_model",
                 options: VisionOptions = DEFAULT_OPTIONS):
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
        self.register_buffer("shift_out", torch.zeros(w, dtype=torch.float32), persistent=False)
        self.layer_scales_folded = False
        self._compiled_block: Callable | None = None
        self.configure(options)

    @torch.no_grad()
    def fold_layer_scales(self) -> None:
        """Once the weights are loaded: scale the rows of each block's out_proj and c_proj by their branch's layer
        scale, gamma * (h @ W.T + b) = h @ (gamma W).T + gamma b, so that each GEMM adds its branch to the stream
        itself (cuBLAS with beta = 1). The norm after it then reads the stream alone: two passes over memory
        instead of four (H100, two 720p images with FA4: the tower's kernels 142.7 -> 136.1 ms). The biases
        gamma b leave the linears (zeroed): the stream holds them back, and each norm adds their running sum
        (`shift_1`, `shift_2`, `shift_out`, float32). Only plain linears fold; an fp8 c_proj's output is still
        added, with its gamma, by the next norm."""
        if self.layer_scales_folded:
            raise RuntimeError("the vision tower's layer scales are already folded")
        shift = torch.zeros_like(self.shift_out)
        for block in self.transformer.resblocks:
            block.shift_1 = shift.clone()
            if block.attn.adds_to_stream:
                shift += _fold(block.attn.out_proj, block.ls_1.gamma)
            block.shift_2 = shift.clone()
            if block.mlp.adds_to_stream:
                shift += _fold(block.mlp.c_proj, block.ls_2.gamma)
        self.shift_out = shift
        self.layer_scales_folded = True

    def configure(self, options: VisionOptions) -> None:
        """Run the tower the way `options` says from now on (the same function); leaves the blocks eager."""
        self.options = options
        # Changing the weights' layout in place keeps their values, so this may follow weight loading.
        fmt = torch.channels_last if options.channels_last else torch.contiguous_format
        for conv in (self.vit_downsampler1, self.vit_downsampler2):
            conv.weight.data = conv.weight.data.contiguous(memory_format=fmt)
        self._compiled_block = None

    def compile_blocks(self, backend: str = "inductor") -> None:
        """Fuse each block's pointwise work (2D rope, quick-GELU, layer scale, norms) with torch.compile.

        Shapes are dynamic and the blocks share one graph, so this costs one compile for every batch, grid
        and block.
        """
        self._compiled_block = torch.compile(_run_block, dynamic=True, backend=backend,
                                             mode=self.options.compile_mode)

    def _position_embedding(self, grid: int) -> torch.Tensor:
        pos = self.positional_embedding
        if grid == self.cfg.grid:
            return pos
        full = pos.float().view(1, self.cfg.grid, self.cfg.grid, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(full, size=(grid, grid), mode="bilinear", align_corners=False, antialias=False)
        return resized.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> ln_pre(patches + positions) as [B * g * g, width], rows in raster order per image."""
        pixels = pixels.to(self.conv1.weight.dtype)
        b, c, size, _ = pixels.shape
        p = self.cfg.patch_size
        g = size // p
        if self.options.patch_embed == "gemm":
            patches = pixels[..., : g * p, : g * p].reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
            x = F.linear(patches.reshape(b, g * g, c * p * p), self.conv1.weight.flatten(1))
        else:
            x = self.conv1(pixels).flatten(2).transpose(1, 2)
        return self.ln_pre(x + self._position_embedding(g)).flatten(0, 1)

    def attention_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        """The attention kernel the blocks use for activations of `dtype` on `device` (`options.attention` with
        "auto" resolved)."""
        chosen = self.options.attention
        fa4 = dtype in (torch.bfloat16, torch.float16) and flash_attention4.available(device)
        if chosen == "auto" and fa4:
            return "fa4"
        if chosen == "fa4" and device.type == "cuda" and not fa4:
            raise RuntimeError("vision attention 'fa4' needs a Hopper GPU, bf16 or fp16 weights and the "
                               "flash-attn-4 package (pip install 'stepserve[fa4]')")
        return chosen

    def _blocks(self, x: torch.Tensor, seqs: list[tuple[int, int]]) -> torch.Tensor:
        """The blocks over x [T, width] holding `seqs` = [(images, grid)] back to back (x is updated in place)."""
        if not self.layer_scales_folded:
            raise RuntimeError("fold_layer_scales() must follow weight loading")
        # A smaller grid (crops) uses the first rows/cols of the trained grid's angles, unscaled.
        angles = torch.cat([self.rope_angles[:g, :g].reshape(g * g, 1, -1).repeat(b, 1, 1) for b, g in seqs])
        cos, sin = angles.cos().to(self.options.rope_dtype), angles.sin().to(self.options.rope_dtype)
        groups = torch.tensor([[b, g * g] for b, g in seqs])
        backend = self.attention_backend(x.device, x.dtype)
        cu_seqlens = None
        if backend in _VARLEN_BACKENDS:
            offsets = itertools.accumulate((g * g for b, g in seqs for _ in range(b)), initial=0)
            cu_seqlens = to_device(torch.tensor(list(offsets), dtype=torch.int32), x.device)
        run = self._compiled_block or _run_block
        blocks = self.transformer.resblocks
        # Nothing to add before the first block. Where the MLPs hand their output on (an fp8 c_proj), it gets zeros
        # and a gamma parameter as every later block does: None there would cost the compiled block a second graph.
        y = None if blocks[0].mlp.adds_to_stream else torch.zeros_like(x)
        gamma = blocks[0].ls_2.gamma
        for block in blocks:
            y = run(block, x, y, gamma, cos, sin, groups, cu_seqlens, backend)
            gamma = block.ls_2.gamma
        if y is not None:
            x.add_(gamma * y)
        return x.add_(self.shift_out)

    def _downsample(self, x: torch.Tensor, b: int, g: int) -> torch.Tensor:
        """[b * g * g, width] -> [b, (g / 4)^2, 4 * width]."""
        x = x.view(b, g, g, -1).permute(0, 3, 1, 2)  # NCHW sizes over NHWC memory: channels_last as it is
        if not self.options.channels_last:
            x = x.contiguous()
        x = self.vit_downsampler2(self.vit_downsampler1(x))
        return x.flatten(2).transpose(1, 2)

    def forward(self, pixel_groups: list[torch.Tensor]) -> list[torch.Tensor]:
        """Batches of square images [B_i, 3, S_i, S_i] (one size per batch) -> [B_i, (S_i / 56)^2, 4 * width]."""
        xs = [self._embed(pixels) for pixels in pixel_groups]
        seqs = [(pixels.shape[0], pixels.shape[-1] // self.cfg.patch_size) for pixels in pixel_groups]
        if self.options.packed:
            xs = self._blocks(torch.cat(xs), seqs).split([b * g * g for b, g in seqs])
        else:
            xs = [self._blocks(x, [seq]) for x, seq in zip(xs, seqs)]
        return [self._downsample(x, b, g) for x, (b, g) in zip(xs, seqs)]
