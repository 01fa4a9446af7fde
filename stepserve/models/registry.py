"""config.json `architectures` (or `model_type`) -> the model class that implements it."""

from __future__ import annotations

from torch import nn

from stepserve.errors import ModelLoadError
from stepserve.models.step3_vl_10b import Step3VL10BForCausalLM

_ARCHITECTURES: dict[str, type[nn.Module]] = {"StepVLForConditionalGeneration": Step3VL10BForCausalLM}
_MODEL_TYPES: dict[str, type[nn.Module]] = {"step_robotics": Step3VL10BForCausalLM}


def model_class(hf_config: dict) -> type[nn.Module]:
    for arch in hf_config.get("architectures") or []:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    model_type = hf_config.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise ModelLoadError(
        f"unsupported model: architectures={hf_config.get('architectures')}, model_type={model_type!r}; "
        f"supported architectures: {sorted(_ARCHITECTURES)}, model types: {sorted(_MODEL_TYPES)}")
