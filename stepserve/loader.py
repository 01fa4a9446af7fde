"""Model name -> local directory -> config, tokenizer, chat template and a model with its weights.

Weights stream from the safetensors shards one tensor at a time straight into parameters that were created
on the target device in the target dtype, so a model is never held twice (no CPU copy, no float32 copy).
Block-fp8 layers (`layers/quant.py`) are created in fp8 from the start: an fp8 checkpoint's tensors are
copied as stored, and with `quantization="fp8"` each bf16 tensor is quantized as it arrives.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm import tqdm

from stepserve.errors import ModelLoadError
from stepserve.layers.quant import DECODER_PREFIXES, Fp8Linear, fp8_config, fp8_summary, hf_quantization_config
from stepserve.models.configs import read_config_dict
from stepserve.models.registry import model_class

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "half": torch.float16,
           "fp16": torch.float16, "float32": torch.float32, "float": torch.float32, "fp32": torch.float32}
_HUB_PATTERNS = ["*.json", "*.jinja", "*.txt", "tokenizer*", "*.model"]


def resolve_dtype(name: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """"auto" is bfloat16 on CUDA and float32 elsewhere (CPU bf16 matmuls are slow and less exact)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose auto or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def resolve_model_dir(model: str | None, revision: str | None = None, download_weights: bool = True) -> Path:
    """None or "stepserve-tiny" -> the built-in tiny checkpoint; an existing directory -> itself; else a hub id."""
    from stepserve.testing import TINY_MODEL_NAME, tiny_checkpoint

    if model is None or model == TINY_MODEL_NAME:
        return tiny_checkpoint()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model path {model!r} is not a directory")
    from huggingface_hub import snapshot_download
    patterns = _HUB_PATTERNS + (["*.safetensors"] if download_weights else [])
    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=patterns))
    except Exception as e:  # the hub client raises many unrelated types (network, auth, missing repo)
        raise ModelLoadError(f"cannot download {model!r} (revision {revision}): {e}") from e


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer, PretrainedConfig
    try:
        # A blank config: the tokenizer files name their class, and `step_robotics` would otherwise need the
        # checkpoint's remote code just for AutoConfig.
        return AutoTokenizer.from_pretrained(str(model_dir), config=PretrainedConfig())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer from {model_dir}: {e}") from e


def load_chat_template(model_dir: str | Path, override_path: str | Path | None = None) -> str | None:
    """The override file, else chat_template.jinja, else tokenizer_config.json's chat_template, else None."""
    if override_path is not None:
        try:
            return Path(override_path).read_text()
        except OSError as e:
            raise ModelLoadError(f"cannot read chat template {override_path}: {e}") from e
    jinja = Path(model_dir) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = Path(model_dir) / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"{index.name} names shards that are not in {model_dir}: {absent}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {model_dir}")
    return files


def _stream(files: list[Path], seen: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    for path in tqdm(files, desc="Loading safetensors shards", unit="shard", disable=len(files) < 2):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                seen.append(name)
                yield name, f.get_tensor(name)


def _listing(names: list[str], limit: int = 20) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _stored_dtypes(files: list[Path]) -> dict[str, str]:
    """Tensor name -> safetensors dtype ("BF16", "F8_E4M3", ...), from the shard headers only."""
    from safetensors import safe_open
    dtypes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            dtypes |= {name: f.get_slice(name).get_dtype() for name in f.keys()}
    return dtypes


def _split_kv_scales(weights: Iterable[tuple[str, torch.Tensor]],
                     kv_scales: dict[str, float]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass weights through, keeping fp8 KV-cache scales (`*.k_scale`, `*.v_scale`) in `kv_scales` instead."""
    for name, tensor in weights:
        if name.endswith((".k_scale", ".v_scale")):
            kv_scales[name] = float(tensor.float().max())
        else:
            yield name, tensor


def load_safetensors(model: torch.nn.Module, model_dir: Path) -> None:
    """Fill every parameter from the checkpoint; missing tensors are an error, extra ones a warning.

    KV-cache scales in the checkpoint set `model.kv_cache_scale`: the cache has one scale for all layers and
    both K and V, so it is their maximum (no stored value can overflow; the others lose a little precision).
    """
    seen: list[str] = []
    kv_scales: dict[str, float] = {}
    with torch.no_grad():
        loaded = model.load_weights(_split_kv_scales(_stream(_weight_files(model_dir), seen), kv_scales))
    loaded |= kv_scales.keys()
    if kv_scales:
        model.kv_cache_scale = max(kv_scales.values())
        log.info("fp8 KV cache scale %.4g (max of %d k/v scales in the checkpoint)", model.kv_cache_scale,
                 len(kv_scales))
    missing = sorted(model.checkpoint_names() - loaded)
    unexpected = sorted(set(seen) - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint {model_dir} lacks {len(missing)} tensors: {_listing(missing)}"
                             + (f"; unexpected tensors: {_listing(unexpected)}" if unexpected else ""))
    if unexpected:
        log.warning("ignoring %d unexpected checkpoint tensors: %s", len(unexpected), _listing(unexpected))


def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights of a trained model's scale: matrices uniform with std 1/sqrt(fan_in), norm weights 1,
    biases 0, layer scales 0.1, so bf16 activations stay finite through all layers. An fp8 layer gets the
    quantized draws of its unquantized twin, so fp8 and bf16 dummy models of one seed hold the same weights."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            if isinstance(module, Fp8Linear) and leaf != "bias":
                if leaf == "weight":
                    module.fill_uniform_((3.0 / p.shape[1]) ** 0.5, gen)
            elif p.dim() > 1:
                bound = (3.0 / p[0].numel()) ** 0.5
                p.uniform_(-bound, bound, generator=gen)
            else:
                p.fill_(0.0 if leaf == "bias" else 0.1 if leaf == "gamma" else 1.0)


def load_model(model_dir: str | Path, dtype: torch.dtype | str, device: torch.device | str,
               load_format: str = "auto", seed: int = 0, quantization: str | None = None,
               quantize_vision: bool = False) -> torch.nn.Module:
    """Build the model of `model_dir/config.json` on `device` and fill its weights.

    load_format: "auto" / "safetensors" read the shards; "dummy" reads no weight files (random weights;
    without a config.json it builds the real Step3-VL-10B size).
    quantization: "fp8" quantizes a bf16 checkpoint's decoder linears block-wise as they load; a checkpoint
    whose config has an fp8 `quantization_config` loads its fp8 layers as stored either way. quantize_vision:
    with quantization="fp8", the model's `fp8_vision_prefixes` (its vision blocks' qkv and MLPs) are quantized as well.
    """
    start = time.perf_counter()
    model_dir, device = Path(model_dir), torch.device(device)
    dtype = resolve_dtype(dtype, device)
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ModelLoadError(f"unknown load_format {load_format!r}; choose auto, safetensors or dummy")
    if load_format == "dummy" and not (model_dir / "config.json").is_file():
        from stepserve.testing import real_config
        hf_config = real_config()
    else:
        hf_config = read_config_dict(model_dir)
    cls = model_class(hf_config)
    qc = hf_quantization_config(hf_config)
    stored = _stored_dtypes(_weight_files(model_dir)) if qc is not None and load_format != "dummy" else None
    online = DECODER_PREFIXES
    if quantize_vision:
        if quantization != "fp8":
            raise ModelLoadError("quantize_vision needs quantization='fp8' (it quantizes a bf16 tower at load time)")
        if not getattr(cls, "fp8_vision_prefixes", ()):
            raise ModelLoadError(f"{cls.__name__} has no vision tower to quantize")
        online += cls.fp8_vision_prefixes
    quant = fp8_config(qc, quantization, stored, getattr(cls, "packed_modules_mapping", {}), online)
    with torch.device(device):
        model = cls(cls.config_class.from_dict(hf_config), dtype, **({"quant": quant} if quant is not None else {}))
    model.eval()
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        load_safetensors(model, model_dir)
    vision = getattr(model, "vision_model", None)
    if vision is not None:
        vision.fold_layer_scales()  # weights prepared for the tower's fused residual adds
    n_params = sum(p.numel() for p in model.parameters())
    log.info("loaded %s (%.2f B params, %s, %s, %s weights) in %.1f s", model_dir, n_params / 1e9, dtype,
             device, "dummy" if load_format == "dummy" else "checkpoint", time.perf_counter() - start)
    if quant is not None:
        log.info(fp8_summary(model, dtype))
    return model
