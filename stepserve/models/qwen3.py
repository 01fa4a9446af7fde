"""The Qwen3 dense decoder (Step3-VL-10B's language model), written against the paged `Attention` layer.

Tokens arrive as one flat batch [T] (several sequences, prefill chunks and decodes mixed); the
`ForwardContext` set by the caller tells attention where each sequence's pages are. q/k/v and gate/up are
fused into one GEMM each; `packed_modules_mapping` says how the checkpoint's separate matrices fill them.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

from stepserve.layers.attention import Attention
from stepserve.layers.linear import copy_weight
from stepserve.layers.norm import RMSNorm
from stepserve.layers.quant import Fp8Config, make_linear
from stepserve.layers.rotary import RotaryEmbedding
from stepserve.models.configs import TextConfig


@contextlib.contextmanager
def dtype_scope(dtype: torch.dtype):
    """Create parameters directly in `dtype` (so a bf16 model never exists in float32 first)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: TextConfig, rotary: RotaryEmbedding, quant: Fp8Config | None = None, prefix: str = ""):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = make_linear(quant, f"{prefix}.qkv_proj", cfg.hidden_size,
                                    [self.q_size, self.kv_size, self.kv_size])
        self.o_proj = make_linear(quant, f"{prefix}.o_proj", self.q_size, cfg.hidden_size)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.rotary_emb = rotary  # one cos/sin table shared by all layers
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        out = self.attn.qk_norm_rope_attend(q.view(-1, self.num_heads, self.head_dim),
                                            k.view(-1, self.num_kv_heads, self.head_dim),
                                            v.view(-1, self.num_kv_heads, self.head_dim), self.q_norm.weight,
                                            self.k_norm.weight, self.q_norm.eps, positions,
                                            self.rotary_emb.cos_sin_cache)
        return self.o_proj(out)


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: TextConfig, quant: Fp8Config | None = None, prefix: str = ""):
        super().__init__()
        # The SiLU-and-mul runs in the gate/up GEMM's epilogue at decode sizes (one kernel, no 2I-wide output).
        self.gate_up_proj = make_linear(quant, f"{prefix}.gate_up_proj", cfg.hidden_size, [cfg.intermediate_size] * 2,
                                        activation="silu_and_mul")
        self.down_proj = make_linear(quant, f"{prefix}.down_proj", cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, rotary: RotaryEmbedding, quant: Fp8Config | None = None, prefix: str = ""):
        super().__init__()
        self.self_attn = Qwen3Attention(cfg, rotary, quant, f"{prefix}.self_attn")
        self.mlp = Qwen3MLP(cfg, quant, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the MLP output and the residual stream before it; the next norm adds them."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Qwen3Model(nn.Module):
    def __init__(self, cfg: TextConfig, quant: Fp8Config | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))  # no init pass
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg, rotary, quant, f"model.layers.{i}")
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        return self.norm(hidden, residual)[0]


class Qwen3ForCausalLM(nn.Module):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    # Checkpoint leaf -> our parameter path below the same module, where a submodule of ours holds what the
    # checkpoint stores as a bare parameter (so that it can be a linear layer, fp8 or not).
    renamed_params: dict[str, str] = {}

    def __init__(self, config: TextConfig, dtype: torch.dtype = torch.float32, quant: Fp8Config | None = None):
        """quant: which linear layers hold block-fp8 weights (None: all in `dtype`)."""
        super().__init__()
        self.text_config = config
        self.num_layers, self.num_kv_heads = config.num_hidden_layers, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.hidden_size, self.vocab_size = config.hidden_size, config.vocab_size
        with dtype_scope(dtype):
            self.model = Qwen3Model(config, quant)
            self.lm_head = make_linear(quant, "lm_head", config.hidden_size, config.vocab_size)

    def get_input_embeddings(self, input_ids: torch.Tensor, mm_embeds: torch.Tensor | None = None,
                             mm_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [T, H] with the rows where `mm_mask` is True replaced by `mm_embeds`, in order."""
        embeds = self.model.embed_tokens(input_ids)
        if mm_embeds is None:
            return embeds
        # masked_scatter fills in order without a host sync (boolean indexing would need one).
        return embeds.masked_scatter(mm_mask.unsqueeze(-1), mm_embeds.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mm_embeds: torch.Tensor | None = None,
                mm_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, H] (paged attention: needs a ForwardContext)."""
        return self.model(positions, self.get_input_embeddings(input_ids, mm_embeds, mm_mask))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def _packed_target(self, name: str) -> tuple[str, int | None]:
        module, _, leaf = name.rpartition(".")
        if leaf in self.renamed_params:
            return f"{module}.{self.renamed_params[leaf]}", None
        for src, (dst, shard) in self.packed_modules_mapping.items():
            if f".{src}." in name:
                return name.replace(f".{src}.", f".{dst}."), shard
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into the parameters; returns the checkpoint names used (others are skipped)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target, shard = self._packed_target(name)
            param = params.get(target)
            if param is None:
                continue
            module_name, _, param_name = target.rpartition(".")
            module = self.get_submodule(module_name)
            if hasattr(module, "load_weight"):  # linear layers: merged shards, fp8 scales, quantize-on-load
                module.load_weight(param_name, tensor, name, shard)
            else:
                copy_weight(param.data, tensor, name)
            loaded.add(name)
        return loaded

    def checkpoint_names(self) -> set[str]:
        """The checkpoint tensor names that fill every parameter (fused ones expanded to their sources)."""
        sources: dict[str, list[str]] = {}
        for src, (dst, _) in self.packed_modules_mapping.items():
            sources.setdefault(dst, []).append(src)
        renamed_from = {dst: src for src, dst in self.renamed_params.items()}
        names = set()
        for pname, _ in self.named_parameters():
            module_name, _, leaf = pname.rpartition(".")
            if leaf in getattr(self.get_submodule(module_name), "computed_params", ()):
                continue
            dst = next((d for d in renamed_from if pname.endswith(f".{d}")), None)
            if dst is not None:
                names.add(pname.removesuffix(dst) + renamed_from[dst])
                continue
            for dst, srcs in sources.items():
                if f".{dst}." in pname:
                    names.update(pname.replace(f".{dst}.", f".{src}.") for src in srcs)
                    break
            else:
                names.add(pname)
        return names
