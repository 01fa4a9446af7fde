"""Step3-VL-10B: PE-lang vision tower -> linear projector -> Qwen3-8B decoder.

Parameter names equal the checkpoint's (`model.*`, `lm_head.weight`, `vision_model.*`,
`vit_large_projector.weight`) except the fused q/k/v and gate/up the decoder declares and the tower's
`attn.in_proj` (`renamed_params`).
"""

from __future__ import annotations

import torch

from stepserve.layers.quant import Fp8Config, make_linear
from stepserve.models.configs import Step3VLConfig
from stepserve.models.perception_encoder import PerceptionEncoder
from stepserve.models.qwen3 import Qwen3ForCausalLM, dtype_scope


class Step3VL10BForCausalLM(Qwen3ForCausalLM):
    config_class = Step3VLConfig
    # What `--quantize-vision` quantizes at load time: the tower's blocks (their qkv and MLPs; see VisionAttention).
    fp8_vision_prefixes = ("vision_model.transformer.resblocks.",)
    # The tower's qkv projection is a linear module (`attn.in_proj`), stored as nn.MultiheadAttention's parameters.
    renamed_params = {"in_proj_weight": "in_proj.weight", "in_proj_bias": "in_proj.bias"}

    def __init__(self, config: Step3VLConfig, dtype: torch.dtype = torch.float32, quant: Fp8Config | None = None):
        super().__init__(config.text, dtype, quant)
        self.config = config
        self.image_token_id = config.image_token_id
        with dtype_scope(dtype):
            self.vision_model = PerceptionEncoder(config.vision, quant, "vision_model")
            self.vit_large_projector = make_linear(quant, "vit_large_projector", config.vision.output_dim,
                                                   config.text.hidden_size)

    def encode_images(self, pixel_values: torch.Tensor, patch_pixel_values: torch.Tensor | None,
                      num_crops: list[int]) -> list[torch.Tensor]:
        """Per image [81 * crops + 169, H]: its crops' rows in crop order, then the global view's rows.

        The tower takes all global views and all crops together (one batch per resolution).
        """
        if len(num_crops) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} global views but num_crops has {len(num_crops)} entries")
        num_patches = 0 if patch_pixel_values is None else patch_pixel_values.shape[0]
        if sum(num_crops) != num_patches:
            raise ValueError(f"{num_patches} crops given but num_crops sums to {sum(num_crops)}")
        batches = [pixel_values, patch_pixel_values] if num_patches else [pixel_values]
        views, *crops = (self.vit_large_projector(f) for f in self.vision_model(batches))
        crops = crops[0].split(num_crops) if num_patches else [None] * len(num_crops)
        return [view if crop is None else torch.cat([crop.flatten(0, 1), view]) for view, crop in zip(views, crops)]
