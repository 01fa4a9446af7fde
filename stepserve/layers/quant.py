"""Block-fp8 linear layers in the DeepSeek-V3 layout, which FP8 checkpoints of Step3 models use.

A weight [out, in] is stored as float8_e4m3fn with one float32 `weight_scale_inv` per 128 x 128 block,
shape [ceil(out / 128), ceil(in / 128)]; the real weight is stored * scale_inv (the last block row / column
may be ragged). Activations are not stored. On CUDA (`kernels/fp8_gemm.py`) decode batches keep x in bf16
and dequantize W inside the skinny GEMV; larger batches quantize x per token per 128 columns for cuBLAS's
block-scaled fp8 GEMM (or dequantize W to bf16 where torch lacks it). Elsewhere `fp8_linear` dequantizes the
weight and calls F.linear.

Which modules are fp8 is `Fp8Config.is_fp8`: for a checkpoint, exactly those whose weights it stores in fp8
(and not named in its ignore lists); for `--quantization fp8` on a bf16 checkpoint (quantized at load) and
for dummy weights, the decoder layers' linears only, as vLLM does: the embedding, lm_head, vision tower and
projector stay in the activation dtype (`--quantize-vision` adds the vision blocks' qkv and MLPs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from stepserve.errors import ModelLoadError
from stepserve.layers.activation import activate, check_activation
from stepserve.layers.dispatch import dispatched
from stepserve.layers.linear import Linear, MergedLinear, copy_weight, shard_rows

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
BLOCK = 128  # weight blocks are BLOCK x BLOCK; activations are quantized in groups of BLOCK columns
DECODER_PREFIXES = ("model.layers.",)  # the decoder layers, in every HF decoder: what is quantized at load time
ROW_ALIGN = 4  # cuBLAS's block-scaled GEMM wants the activation's row count a multiple of this


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _blocks(t: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    """t [R, C] in float32, zero-padded to whole blocks and viewed as [R / br, br, C / bc, bc]."""
    r, c = t.shape
    pr, pc = cdiv(r, block_rows), cdiv(c, block_cols)
    padded = F.pad(t.float(), (0, pc * block_cols - c, 0, pr * block_rows - r))
    return padded.view(pr, block_rows, pc, block_cols)


def _quantize_blocks(t: torch.Tensor, block_rows: int, block_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = _blocks(t, block_rows, block_cols)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # an all-zero block stores zeros
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    r, c = t.shape
    return q.flatten(2).flatten(0, 1)[:r, :c].contiguous(), scale


def quantize_fp8_blockwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (float8 [out, in], float32 scale_inv [ceil(out/128), ceil(in/128)]), amax / 448 per block."""
    return _quantize_blocks(weight, BLOCK, BLOCK)


def quantize_fp8_per_token_group(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 [M, K], float32 scales [M, ceil(K/128)]): what the GEMM does to activations."""
    return _quantize_blocks(x, 1, BLOCK)


class Fp8Rows(NamedTuple):
    """An activation already quantized the way the W8A8 GEMM wants it, by the kernel that produced it (the vision
    tower's LayerNorm before an fp8 linear): the GEMM reads these instead of quantizing a bf16 copy.

    q: float8 [cdiv(rows, ROW_ALIGN) * ROW_ALIGN, K]; rows past `rows` are zeros with scale 1.
    scales: float32 [q.shape[0], ceil(K / 128)] (column-major on CUDA, as cuBLAS reads them).
    dtype: the dtype the unquantized activation had, which the linear returns."""

    q: torch.Tensor
    scales: torch.Tensor
    rows: int
    dtype: torch.dtype


def dequantize_rows(x: Fp8Rows) -> torch.Tensor:
    """The activation `x` holds, [rows, K] in its dtype (each value its fp8 code times its group's scale)."""
    q = x.q[: x.rows].float()
    return (q * x.scales[: x.rows].repeat_interleave(BLOCK, 1)[:, : q.shape[1]]).to(x.dtype)


def dequantize_fp8_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The real weight [out, in] in `dtype`: each 128 x 128 block of `weight` times its scale_inv."""
    out_features, in_features = weight.shape
    scale = scale_inv.repeat_interleave(BLOCK, 0)[:out_features].repeat_interleave(BLOCK, 1)[:, :in_features]
    return (weight.float() * scale).to(dtype)


@dispatched
def fp8_linear(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               bias: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """x [..., in] @ dequantized weight.T (+ bias), then `activation` (see layers.linear.linear) -> [..., out]
    in x's dtype (reference: weight-only dequant; an `Fp8Rows` x is dequantized first)."""
    if isinstance(x, Fp8Rows):
        x = dequantize_rows(x)
    return activate(F.linear(x, dequantize_fp8_blockwise(weight, weight_scale_inv, x.dtype), bias), activation)


@dispatched
def fp8_mlp(x: torch.Tensor | Fp8Rows, fc_weight: torch.Tensor, fc_scale_inv: torch.Tensor,
            fc_bias: torch.Tensor | None, proj_weight: torch.Tensor, proj_scale_inv: torch.Tensor,
            proj_bias: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """proj(activate(fc(x))) for two block-fp8 linears (the vision MLP's c_fc, c_proj). On CUDA the first one's
    bias and activation are applied where the second one's input is quantized (one pass over the hidden)."""
    hidden = fp8_linear.reference(x, fc_weight, fc_scale_inv, fc_bias, activation)
    return fp8_linear.reference(hidden, proj_weight, proj_scale_inv, proj_bias)


class Fp8Linear(nn.Module):
    """A linear layer with a block-fp8 weight; `output_sizes` > 1 entry merges several checkpoint matrices
    (each but the last a multiple of 128 rows, so every scale row belongs to one of them).

    quantize_on_load: the checkpoint holds the weight in a wider dtype, quantized as it is loaded (its
    scales are computed, not read). activation: as for layers.linear.Linear."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, quantize_on_load: bool = False,
                 activation: str | None = None):
        super().__init__()
        if any(size % BLOCK for size in output_sizes[:-1]):
            raise ModelLoadError(f"fp8 merged linear: shard sizes {output_sizes} are not multiples of {BLOCK}")
        check_activation(activation, output_sizes)
        self.activation = activation
        out_features = sum(output_sizes)
        self.in_features, self.out_features, self.output_sizes = in_features, out_features, list(output_sizes)
        self.quantize_on_load = quantize_on_load
        self.wide_dtype = torch.get_default_dtype()  # the model's dtype: this weight's dtype unquantized
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(cdiv(out_features, BLOCK), cdiv(in_features, BLOCK), dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @property
    def computed_params(self) -> tuple[str, ...]:
        """Parameters that do not come from the checkpoint."""
        return ("weight_scale_inv",) if self.quantize_on_load else ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.bias, self.activation)

    def _rows(self, param_name: str, shard: int | None) -> torch.Tensor:
        per_entry = BLOCK if param_name == "weight_scale_inv" else 1
        return shard_rows(getattr(self, param_name).data, self.output_sizes, shard, per_entry)

    def load_weight(self, param_name: str, tensor: torch.Tensor, source: str, shard: int | None = None) -> None:
        if param_name == "weight" and self.quantize_on_load:
            rows = self._rows("weight", shard)
            if rows.shape != tensor.shape:
                copy_weight(rows, tensor, source)  # raises the shape error
            q, scale = quantize_fp8_blockwise(tensor.to(rows.device))
            rows.copy_(q)
            self._rows("weight_scale_inv", shard).copy_(scale)
        else:
            copy_weight(self._rows(param_name, shard), tensor, source)

    def fill_uniform_(self, bound: float, generator: torch.Generator) -> None:
        """Dummy weights: the draws `weight.uniform_` makes for the unquantized layer, quantized."""
        weight = torch.empty(self.weight.shape, dtype=self.wide_dtype, device=self.weight.device)
        q, scale = quantize_fp8_blockwise(weight.uniform_(-bound, bound, generator=generator))
        self.weight.data.copy_(q)
        self.weight_scale_inv.data.copy_(scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, output_sizes={self.output_sizes}, bias={self.bias is not None}, "
                f"activation={self.activation}")


@dataclass(frozen=True)
class Fp8Config:
    """Decides, per linear module (named as in the checkpoint, fused ones by their fused name), whether it is fp8.

    stored_fp8: checkpoint tensor names stored in fp8; None when weights are quantized at load (a bf16
    checkpoint with --quantization fp8, or dummy weights), where `online_prefixes` picks the modules.
    ignored: the checkpoint config's `modules_to_not_convert` / `ignored_layers`; an entry matches whole
    dotted components of a name ("lm_head", "vision_model", "model.layers.0.mlp").
    packed: fused module leaf name -> the checkpoint leaf names it merges (the model's packing).
    """

    stored_fp8: frozenset[str] | None = None
    ignored: tuple[str, ...] = ()
    packed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    online_prefixes: tuple[str, ...] = DECODER_PREFIXES

    @property
    def quantize_on_load(self) -> bool:
        return self.stored_fp8 is None

    def _sources(self, module: str) -> list[str]:
        parent, _, leaf = module.rpartition(".")
        if leaf not in self.packed:
            return [module]
        return [f"{parent}.{src}" if parent else src for src in self.packed[leaf]]

    def _is_ignored(self, name: str) -> bool:
        return any(f".{entry}." in f".{name}." for entry in self.ignored)

    def is_fp8(self, module: str) -> bool:
        sources = self._sources(module)
        ignored = [self._is_ignored(s) for s in sources]
        if self.stored_fp8 is None:
            return not any(ignored) and module.startswith(self.online_prefixes)
        stored = [f"{s}.weight" in self.stored_fp8 for s in sources]
        if any(s and i for s, i in zip(stored, ignored)):
            raise ModelLoadError(f"the checkpoint stores {module} in fp8 but its quantization_config lists it "
                                 f"as not converted ({self.ignored})")
        if any(stored) and not all(stored):
            raise ModelLoadError(f"{module} merges {sources}, but only some of them are stored in fp8")
        return all(stored)


def make_linear(quant: Fp8Config | None, prefix: str, in_features: int, output_sizes: int | list[int],
                bias: bool = False, activation: str | None = None) -> nn.Module:
    """The linear layer for checkpoint module `prefix` (output_sizes: an int, or a list for a merged layer):
    Fp8Linear when `quant` says it is fp8, else Linear / MergedLinear. activation: see layers.linear.Linear
    (e.g. "silu_and_mul" on a [gate, up] merge: the layer returns silu(gate) * up)."""
    sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
    if quant is not None and quant.is_fp8(prefix):
        aligned = all(size % BLOCK == 0 for size in sizes[:-1])
        if aligned or not quant.quantize_on_load:  # a checkpoint's misaligned merge fails loudly in Fp8Linear
            return Fp8Linear(in_features, sizes, bias, quant.quantize_on_load, activation)
        log.warning("%s kept unquantized: its merged sizes %s are not multiples of %d", prefix, sizes, BLOCK)
    if len(sizes) == 1:
        return Linear(in_features, sizes[0], bias, activation)
    return MergedLinear(in_features, sizes, bias, activation)


def hf_quantization_config(hf_config: dict) -> dict | None:
    """config.json's `quantization_config` (top level, or in text_config), if any."""
    return hf_config.get("quantization_config") or (hf_config.get("text_config") or {}).get("quantization_config")


def fp8_config(qc: dict | None, quantization: str | None, stored_dtypes: dict[str, str] | None,
               packed_modules_mapping: dict[str, tuple[str, int]],
               online_prefixes: tuple[str, ...] = DECODER_PREFIXES) -> Fp8Config | None:
    """The Fp8Config for a checkpoint's `quantization_config` and the `--quantization` flag; None: no fp8.

    stored_dtypes: checkpoint tensor name -> safetensors dtype ("F8_E4M3", "BF16", ...); None for dummy weights.
    packed_modules_mapping: the model's {checkpoint leaf: (fused leaf, shard)}.
    online_prefixes: the modules quantized at load time when the checkpoint is not fp8 (see `Fp8Config`).
    """
    packed: dict[str, tuple[str, ...]] = {}
    for src, (dst, _) in sorted(packed_modules_mapping.items(), key=lambda kv: kv[1][1]):
        packed[dst] = packed.get(dst, ()) + (src,)
    if quantization not in (None, "fp8"):
        raise ModelLoadError(f"unknown quantization {quantization!r}; only fp8 (block-wise) is supported")
    if qc is None:
        return None if quantization is None else Fp8Config(packed=packed, online_prefixes=online_prefixes)
    method = qc.get("quant_method")
    if method != "fp8":
        raise ModelLoadError(f"checkpoint quantization {method!r} is not supported (only block-wise fp8)")
    if list(qc.get("weight_block_size") or []) != [BLOCK, BLOCK]:
        raise ModelLoadError(f"fp8 weight_block_size {qc.get('weight_block_size')} is not supported "
                             f"(only [{BLOCK}, {BLOCK}] block scales; per-tensor fp8 is not)")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        log.warning("activation_scheme %r: activations are quantized dynamically (per token, per 128 columns)",
                    qc["activation_scheme"])
    ignored = tuple(qc.get("modules_to_not_convert") or ()) + tuple(qc.get("ignored_layers") or ())
    stored = None
    if stored_dtypes is not None:
        stored = frozenset(name for name, dtype in stored_dtypes.items() if dtype.startswith("F8"))
        if not stored:
            raise ModelLoadError("config.json declares fp8 quantization but the checkpoint stores no fp8 tensors")
    return Fp8Config(stored_fp8=stored, ignored=ignored, packed=packed)


def fp8_summary(model: nn.Module, dtype: torch.dtype) -> str:
    """One line for the start-up log: how many layers are fp8 and the memory saved against `dtype`."""
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    params = sum(m.weight.numel() for m in layers)
    scales = sum(m.weight_scale_inv.numel() * 4 for m in layers)
    wide = torch.empty((), dtype=dtype).element_size()
    saved = params * (wide - 1) - scales
    return (f"fp8: {len(layers)} linear layers ({params / 1e9:.2f} B params) in float8_e4m3fn with 128x128 "
            f"block scales: {(params + scales) / 2**30:.2f} GiB instead of {params * wide / 2**30:.2f} GiB "
            f"in {dtype} (saved {saved / 2**30:.2f} GiB)")
