"""config.json of Step3-VL-10B (`model_type` "step_robotics") as small dataclasses.

Absent keys take the defaults the HF config classes use (the vision defaults are the real model's; the text
defaults are Qwen2Config's, which StepFun's config class parses `text_config` with).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from stepserve.errors import ModelLoadError


@dataclass(frozen=True)
class VisionConfig:
    width: int = 1536
    layers: int = 47
    heads: int = 16
    num_channels: int = 3
    image_size: int = 728
    patch_size: int = 14
    mlp_ratio: float = 8960 / 1536
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def output_dim(self) -> int:
        """Channels after the two stride-2 downsamplers (width -> 2 width -> 4 width)."""
        return 4 * self.width

    @classmethod
    def from_dict(cls, d: dict) -> VisionConfig:
        # Variants this implementation does not build; the real checkpoint uses none of them.
        required = {"use_cls_token": False, "ues_cls_token": False, "use_ln_pre": True, "use_ln_post": False,
                    "use_abs_posemb": True, "use_rope2d": True, "hidden_act": "quick_gelu"}
        for key, want in required.items():
            if d.get(key, want) != want:
                raise ModelLoadError(f"vision_config.{key}={d[key]!r} is not supported (expected {want!r})")
        cfg = cls(**{k: d[k] for k in cls.__dataclass_fields__ if d.get(k) is not None})
        if cfg.width % cfg.heads or cfg.head_dim % 4:
            raise ModelLoadError("vision head_dim must be a multiple of 4 for the 2D rotary embedding")
        return cfg


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: one KV head per query head (no GQA)
    head_dim: int | None = None
    vocab_size: int = 151936
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_dict(cls, d: dict) -> TextConfig:
        d = dict(d)
        rope = d.get("rope_parameters") or {}  # transformers >= 5 writes rope_theta here
        if "rope_theta" not in d and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        scaling = d.get("rope_scaling") or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default" or \
                rope.get("rope_type", "default") != "default":
            raise ModelLoadError(f"text_config rope scaling {scaling or rope} is not supported")
        if d.get("hidden_act", "silu") != "silu" or d.get("attention_bias") or d.get("tie_word_embeddings"):
            raise ModelLoadError("text_config: only silu MLPs, no attention bias, untied embeddings are supported")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if d.get(k) is not None})


@dataclass(frozen=True)
class Step3VLConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 151679
    projector_bias: bool = False
    architectures: tuple[str, ...] = ("StepVLForConditionalGeneration",)
    model_type: str = "step_robotics"

    @classmethod
    def from_dict(cls, d: dict) -> Step3VLConfig:
        if d.get("projector_bias", False):
            raise ModelLoadError("projector_bias=true is not supported")
        if d.get("understand_projector_stride", 2) != 2:
            raise ModelLoadError("understand_projector_stride must be 2 (the downsampler strides are fixed)")
        return cls(vision=VisionConfig.from_dict(d.get("vision_config") or {}),
                   text=TextConfig.from_dict(d.get("text_config") or {}),
                   image_token_id=d.get("image_token_id", 151679),
                   architectures=tuple(d.get("architectures") or ("StepVLForConditionalGeneration",)),
                   model_type=d.get("model_type", "step_robotics"))


def read_config_dict(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
