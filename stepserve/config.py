"""Every engine and server option in one place.

CLI flags are generated from these dataclasses (see `cli.py`): the field name with `_` -> `-` is the flag,
using SGLang's names for the options we share so that its commands work with the module name swapped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    model: str | None = field(default=None, metadata={"help": "HF hub id or local dir; none = built-in tiny model",
                                                         "aliases": ["--model-path"]})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer dir (default: the model's)"})
    revision: str | None = field(default=None, metadata={"help": "hub revision"})
    dtype: str = field(default="auto", metadata={"help": "auto | bfloat16 | float16 | float32"})
    device: str = field(default="auto", metadata={"help": "auto | cuda | cpu"})
    load_format: str = field(default="auto", metadata={"help": "auto | safetensors | dummy (random weights, no files)"})
    quantization: str | None = field(default=None, metadata={"help": "fp8 (block-wise, at load time)"})
    quantize_vision: bool = field(default=False, metadata={
        "help": "with --quantization fp8: the vision qkv and MLPs too (a faster encode; output moves ~2.4 %)"})
    kv_cache_dtype: str = field(default="auto", metadata={"help": "auto | fp8_e4m3"})
    vision_attention: str = field(default="auto", metadata={
        "help": "the vision tower's attention: auto (fa4 on Hopper with the fa4 extra installed, else torch's SDPA "
                "choice) | fa4 | cudnn | flash | efficient | math | varlen"})
    context_length: int | None = field(default=None, metadata={"help": "max prompt + output tokens"})
    mem_fraction_static: float = field(default=0.85, metadata={"help": "fraction of GPU memory for weights + KV"})
    page_size: int = field(default=16, metadata={"help": "tokens per KV page"})
    num_kv_pages: int | None = field(default=None, metadata={"help": "override the KV pool size (pages)"})
    max_running_requests: int = field(default=256, metadata={"help": "sequences decoded together at most"})
    chunked_prefill_size: int = field(default=8192, metadata={"help": "prefill tokens per step; <=0 disables chunking"})
    max_prefill_tokens: int = field(default=16384, metadata={"help": "tokens per step at most (prefill + decode)"})
    max_image_tokens_per_step: int = field(default=2048, metadata={
        "help": "image feature rows a step may start to encode (a 1280x720 image has 655; the step's first image "
                "always may; 0: no cap): caps how long the vision tower stalls decoding"})
    disable_radix_cache: bool = field(default=False, metadata={"help": "turn the prefix cache off"})
    encoder_cache_size: int = field(default=64, metadata={"help": "images whose vision embeddings stay cached"})
    cuda_graph_max_bs: int = field(default=256, metadata={"help": "largest decode batch captured in a CUDA graph"})
    cuda_graph_max_tokens: int = field(default=2048, metadata={
        "help": "largest prefill step (tokens, prompts and decodes) replayed from a CUDA graph when it runs no vision "
                "tower; 0: prefill steps run eagerly"})
    disable_cuda_graph: bool = field(default=False, metadata={"help": "run every step and the vision tower eagerly"})
    tp_size: int = field(default=1, metadata={"help": "tensor parallel size", "aliases": ["--tp"]})
    seed: int = field(default=0, metadata={"help": "seed for random (dummy) weights and unseeded sampling"})
    trust_remote_code: bool = field(default=False, metadata={"help": "accepted for compatibility; not needed"})
    chat_template: str | None = field(default=None, metadata={"help": "path to a jinja chat template"})


@dataclass
class ServerArgs(EngineConfig):
    host: str = field(default="127.0.0.1", metadata={"help": "bind address"})
    port: int = field(default=30000, metadata={"help": "bind port"})
    served_model_name: str | None = field(default=None, metadata={"help": "model name in the API"})
    api_key: str | None = field(default=None, metadata={"help": "require `Authorization: Bearer <key>`"})
    reasoning_parser: str | None = field(default=None, metadata={"help": "deepseek-r1"})
    tool_call_parser: str | None = field(default=None, metadata={"help": "hermes"})
    allowed_local_media_path: str | None = field(default=None, metadata={"help": "dir that file:// image URLs may read"})
    max_queued_requests: int = field(default=1024, metadata={"help": "waiting requests before 503"})
    max_image_bytes: int = field(default=20 * 1024 * 1024, metadata={"help": "largest image download / data: URL"})
    max_image_pixels: int = field(default=64 * 1024 * 1024, metadata={"help": "largest decoded image (W*H)"})
    image_fetch_timeout: float = field(default=10.0, metadata={"help": "seconds to fetch one image URL"})
    image_workers: int = field(default=-1, metadata={"help": "processes that decode and preprocess images "
                                                             "(0: threads; -1: up to 4 with a GPU, 0 without)"})
    log_level: str = field(default="info", metadata={"help": "debug | info | warning | error"})

    def engine_config(self) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        return EngineConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})
