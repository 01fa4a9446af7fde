"""The built-in tiny Step3-VL-10B-shaped checkpoint, and the real model's config.

`tiny_checkpoint()` writes a random checkpoint with the real file set (config.json with the real keys,
sharded safetensors with the real tensor names, generation_config.json, a small byte-level BPE tokenizer with
the real special tokens, chat_template.jinja), so the whole server runs on CPU in seconds. The tensor names
and shapes are listed here from the checkpoint's documented layout, independently of the model code, so
loading this checkpoint checks the model's names. Image geometry (728 views, 504 crops, patch 14) is real.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_MODEL_NAME = "stepserve-tiny"
TINY_VERSION = "1"  # bump whenever the files written below change, so stale caches are not reused

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<im_patch>", "<im_start>", "<im_end>",
                  "<patch_start>", "<patch_end>", "<patch_newline>"]
# Qwen3 marks these as non-special, so they survive detokenization with skip_special_tokens=True and the
# reasoning / tool-call parsers can see them.
MARKUP_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

_REAL_TOKEN_IDS = {"<|endoftext|>": 151643, "<|im_end|>": 151645, "<im_patch>": 151679}


def _step3_config(vision: dict, text: dict, ids: dict[str, int]) -> dict:
    """config.json of a Step3-VL-10B-shaped model; `ids` maps the special token strings to their ids."""
    eos = [ids["<|endoftext|>"], ids["<|im_end|>"], ids["<im_patch>"]]
    return {
        "architectures": ["StepVLForConditionalGeneration"],
        "model_type": "step_robotics",
        "im_end_token": "<im_end>", "im_patch_token": "<im_patch>", "im_start_token": "<im_start>",
        "image_token_len": 169, "patch_token_len": 81, "image_token_id": ids["<im_patch>"],
        "understand_projector_stride": 2, "use_im_start_end": "true", "vision_select_layer": -1,
        "projector_bias": False,
        "vision_config": {"image_size": 728, "patch_size": 14, "num_channels": 3, "pool_type": "none",
                          "output_dim": None, "use_cls_token": False, "use_ln_pre": True, "use_ln_post": False,
                          "use_abs_posemb": True, "use_rope2d": True, "ls_init_value": 0.1,
                          "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, **vision},
        "text_config": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
                        "attention_dropout": 0.0, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": eos,
                        "hidden_act": "silu", "max_position_embeddings": 65536, "rms_norm_eps": 1e-6,
                        "rope_scaling": None, "rope_theta": 1000000, "tie_word_embeddings": False,
                        "torch_dtype": "bfloat16", "use_cache": True, **text},
        "torch_dtype": "bfloat16",
    }


def real_config(token_ids: dict[str, int] | None = None) -> dict:
    """config.json of stepfun-ai/Step3-VL-10B (values from the reference sheet; used for dummy weights).

    `token_ids` replaces the real special token ids (to pair the real sizes with another tokenizer)."""
    vision = {"width": 1536, "layers": 47, "heads": 16, "mlp_ratio": 8960 / 1536}
    text = {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_window_layers": 36}
    return _step3_config(vision, text, token_ids or _REAL_TOKEN_IDS)


def checkpoint_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Step3-VL-10B checkpoint with its shape, as the real safetensors name them."""
    v, t = config["vision_config"], config["text_config"]
    w, grid, p = v["width"], v["image_size"] // v["patch_size"], v["patch_size"]
    mlp = int(w * v["mlp_ratio"])
    h, hd, inter, vocab = t["hidden_size"], t["head_dim"], t["intermediate_size"], t["vocab_size"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(t["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        shapes |= {pre + "self_attn.q_proj.weight": (q, h), pre + "self_attn.k_proj.weight": (kv, h),
                   pre + "self_attn.v_proj.weight": (kv, h), pre + "self_attn.o_proj.weight": (h, q),
                   pre + "self_attn.q_norm.weight": (hd,), pre + "self_attn.k_norm.weight": (hd,),
                   pre + "mlp.gate_proj.weight": (inter, h), pre + "mlp.up_proj.weight": (inter, h),
                   pre + "mlp.down_proj.weight": (h, inter),
                   pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,)}
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    shapes |= {"vision_model.conv1.weight": (w, v["num_channels"], p, p),
               "vision_model.positional_embedding": (grid * grid, w),
               "vision_model.ln_pre.weight": (w,), "vision_model.ln_pre.bias": (w,)}
    for i in range(v["layers"]):
        pre = f"vision_model.transformer.resblocks.{i}."
        shapes |= {pre + "attn.in_proj_weight": (3 * w, w), pre + "attn.in_proj_bias": (3 * w,),
                   pre + "attn.out_proj.weight": (w, w), pre + "attn.out_proj.bias": (w,),
                   pre + "ln_1.weight": (w,), pre + "ln_1.bias": (w,), pre + "ln_2.weight": (w,),
                   pre + "ln_2.bias": (w,), pre + "ls_1.gamma": (w,), pre + "ls_2.gamma": (w,),
                   pre + "mlp.c_fc.weight": (mlp, w), pre + "mlp.c_fc.bias": (mlp,),
                   pre + "mlp.c_proj.weight": (w, mlp), pre + "mlp.c_proj.bias": (w,)}
    shapes |= {"vision_model.vit_downsampler1.weight": (2 * w, w, 3, 3), "vision_model.vit_downsampler1.bias": (2 * w,),
               "vision_model.vit_downsampler2.weight": (4 * w, 2 * w, 3, 3),
               "vision_model.vit_downsampler2.bias": (4 * w,),
               "vit_large_projector.weight": (h, 4 * w)}
    return shapes


def random_checkpoint(config: dict, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random tensors for `checkpoint_shapes(config)`: matrices ~ N(0, 1/fan_in); norm and layer-scale
    weights near 1 and biases near 0 but never exactly, so a skipped weight or bias changes the output."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in checkpoint_shapes(config).items():
        noise = torch.randn(shape, generator=gen)
        if len(shape) > 1:
            value = noise / (torch.Size(shape[1:]).numel() ** 0.5)
        elif name.endswith("bias"):
            value = 0.1 * noise
        else:
            value = 1.0 + 0.1 * noise
        out[name] = value.to(dtype)
    return out


_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still speak in short sentences.
This is a picture of a cat sitting on a red chair near the window. The sky is blue and the sun is bright.
What is in this image? There are two dogs playing in the green grass, and a child is watching them.
Please describe the image in detail. The photo shows a city street at night with cars, lights and people.
How many apples are on the table? I can see three apples, one banana and a glass of water.
The weather today is sunny with a high of 25 degrees. Tomorrow it will rain in the morning.
Let me think step by step. First, I read the question. Then I look at the picture. Finally, I answer.
The answer is 42. The total is 3 + 4 = 7, and 10 - 2 = 8. The year was 2024 and the time was 9:30.
You are a helpful assistant. Answer the question of the user as well as you can, in a friendly way.
I would like to know the weather in Paris, London, Tokyo, Berlin and New York this week.
The function get_weather takes a location and a unit, such as celsius or fahrenheit, and returns the weather.
Call the tool with the arguments {"location": "Paris", "unit": "celsius"} and wait for the result.
The result of the tool was {"temperature": 18, "condition": "cloudy"}. Now I can answer the user.
Images are split into crops and a global view; each crop becomes a grid of patches for the vision model.
The train leaves the station at noon and arrives in the evening. People read books, talk and look outside.
She opened the door, walked into the kitchen, made a cup of tea and sat down to write a long letter.
Numbers: zero, one, two, three, four, five, six, seven, eight, nine, ten, hundred, thousand, million.
Colors: red, orange, yellow, green, blue, purple, black, white, gray, brown, pink and gold.
Animals: cat, dog, bird, fish, horse, cow, sheep, lion, tiger, bear, mouse, rabbit and elephant.
The model reads the text, looks at the image and writes an answer. It should be short, clear and correct.
If you are not sure, say that you do not know. Do not make up facts. Check your work before you answer.
Hello! How are you? I am fine, thank you. What can I do for you today? Tell me more about your question.
"""


def _train_tokenizer():
    """A deterministic byte-level BPE on the corpus above, with the real special tokens after its vocab."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    return tok


# Written for stepserve in the Qwen3 style of the real template: ChatML turns, an optional system turn that
# also lists the tools, hermes <tool_call> blocks, tool results as <tool_response> inside a user turn, and a
# generation prompt that opens the think block (closed at once when enable_thinking is false).
CHAT_TEMPLATE = r"""
{%- set has_tools = tools is defined and tools is not none and tools | length > 0 -%}
{%- set has_system = messages | length > 0 and messages[0].role == 'system' -%}
{%- if has_system or has_tools -%}
  {{- '<|im_start|>system\n' -}}
  {%- if has_system -%}{{- messages[0].content or '' -}}{%- endif -%}
  {%- if has_tools -%}
    {%- if has_system -%}{{- '\n\n' -}}{%- endif -%}
    {{- '# Tools\n\nYou can use the functions below when they help with the request. '
        ~ 'Their signatures, one JSON object per line, are inside <tools></tools>:\n<tools>' -}}
    {%- for tool in tools -%}{{- '\n' ~ (tool | tojson) -}}{%- endfor -%}
    {{- '\n</tools>\n\nTo call functions, write one block per call with the name and a JSON object of arguments:\n'
        ~ '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' -}}
  {%- endif -%}
  {{- '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
  {%- if message.role == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
    {{- '\n<tool_response>\n' ~ (message.content or '') ~ '\n</tool_response>' -}}
    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
  {%- elif not (loop.first and has_system) -%}
    {{- '<|im_start|>' ~ message.role ~ '\n' ~ (message.content or '') -}}
    {%- if message.role == 'assistant' and message.tool_calls -%}
      {%- for call in message.tool_calls -%}
        {%- set fn = call.function if call.function is defined else call -%}
        {%- if not loop.first or message.content -%}{{- '\n' -}}{%- endif -%}
        {{- '<tool_call>\n{"name": ' ~ (fn.name | tojson) ~ ', "arguments": ' -}}
        {{- fn.arguments if fn.arguments is string else (fn.arguments | tojson) -}}
        {{- '}\n</tool_call>' -}}
      {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n<think>\n' -}}
  {%- if enable_thinking is defined and enable_thinking is false -%}{{- '</think>\n' -}}{%- endif -%}
{%- endif -%}
""".strip() + "\n"


def tiny_config(token_ids: dict[str, int], tokenizer_size: int) -> dict:
    # Padded past the tokenizer like the real vocab (151936 rows for ~151.7k tokens).
    vocab = (tokenizer_size // 64 + 1) * 64
    vision = {"width": 64, "layers": 2, "heads": 4, "mlp_ratio": 2.0}
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": vocab, "max_position_embeddings": 4096,
            "max_window_layers": 3}
    return _step3_config(vision, text, token_ids)


def _write_tokenizer_files(out: Path) -> tuple[dict[str, int], int]:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja; returns the special ids and the size."""
    tok = _train_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 65536, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None,
    }, indent=2))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + MARKUP_TOKENS}, tok.get_vocab_size()


def _write_configs(out: Path, config: dict) -> None:
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "eos_token_id": config["text_config"]["eos_token_id"]},
        indent=2))


def _write_weights(out: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    from safetensors.torch import save_file

    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names, weight_map = list(tensors), {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s * len(names) // shards: (s + 1) * len(names) // shards]
        save_file({n: tensors[n] for n in part}, str(out / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _write_once(path: Path, write) -> Path:
    """Run `write(tmp_dir)` and rename the result to `path`, unless `path` already holds a checkpoint."""
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename into place: concurrent writers never expose a half-written dir.
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write(tmp)
        os.rename(tmp, path)
    except OSError:
        if not (path / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stepserve"


def tiny_checkpoint(path: str | Path | None = None, shards: int = 2) -> Path:
    """The tiny checkpoint's directory, written on first use (to `path`, or a per-version user cache)."""
    if path is None:
        path = _cache_dir() / (f"tiny-{TINY_VERSION}" if shards == 2 else f"tiny-{TINY_VERSION}-{shards}shard")

    def write(out: Path) -> None:
        ids, size = _write_tokenizer_files(out)
        config = tiny_config(ids, size)
        _write_configs(out, config)
        _write_weights(out, random_checkpoint(config), shards)

    return _write_once(Path(path), write)


def tiny_fp8_config(token_ids: dict[str, int], tokenizer_size: int) -> dict:
    """The tiny config with decoder sizes that exercise block fp8: merged shards on whole 128-row blocks
    (q 256, k 128, v 128, gate/up 256 each) and ragged blocks elsewhere (hidden 192), plus a DeepSeek-V3 style
    `quantization_config` (UNVERIFIED against the published FP8 checkpoints; see models.md A.9)."""
    config = tiny_config(token_ids, tokenizer_size)
    config["text_config"] |= {"hidden_size": 192, "intermediate_size": 256, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "head_dim": 64}
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128],
                                     "modules_to_not_convert": ["lm_head", "vit_large_projector"]}
    return config


def stored_in_fp8(name: str) -> bool:
    """The tensors the tiny fp8 checkpoint stores in fp8: decoder linears and vision MLPs. The vision attention
    is bf16 without being listed in `modules_to_not_convert`, so the loader must notice it from the dtype."""
    return name.endswith(".weight") and ((name.startswith("model.layers.") and "_proj." in name) or ".mlp.c_" in name)


def quantize_checkpoint(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Block-fp8 copies (weight + weight_scale_inv) of the tensors `stored_in_fp8` selects; others unchanged."""
    from stepserve.layers.quant import quantize_fp8_blockwise

    out = {}
    for name, tensor in tensors.items():
        if stored_in_fp8(name):
            out[name], out[name + "_scale_inv"] = quantize_fp8_blockwise(tensor)
        else:
            out[name] = tensor
    return out


def tiny_fp8_checkpoint(path: str | Path | None = None, shards: int = 2, quantized: bool = True) -> Path:
    """A tiny block-fp8 checkpoint (`tiny_fp8_config`, real tensor names plus `*.weight_scale_inv`); with
    quantized=False the same model's bf16 weights before quantization, without a quantization_config."""
    if path is None:
        path = _cache_dir() / f"tiny-fp8-{TINY_VERSION}-{shards}shard-{'fp8' if quantized else 'bf16'}"

    def write(out: Path) -> None:
        ids, size = _write_tokenizer_files(out)
        config = tiny_fp8_config(ids, size)
        tensors = random_checkpoint(config)
        if quantized:
            tensors = quantize_checkpoint(tensors)
        else:
            del config["quantization_config"]
        _write_configs(out, config)
        _write_weights(out, tensors, shards)

    return _write_once(Path(path), write)


def real_dummy_checkpoint(path: str | Path | None = None) -> Path:
    """A weightless directory for load_format="dummy" at the real size: the real config.json, with the token
    ids of the tiny tokenizer (also written), so prompts, images and stop tokens work end to end."""
    if path is None:
        path = _cache_dir() / f"real-dummy-{TINY_VERSION}"

    def write(out: Path) -> None:
        ids, _ = _write_tokenizer_files(out)
        _write_configs(out, real_config(ids))

    return _write_once(Path(path), write)


def attach_kv_cache(model: torch.nn.Module, num_pages: int, page_size: int,
                    dtype: torch.dtype | None = None) -> None:
    """Give every attention layer a zeroed paged cache [2, num_pages, page_size, kv_heads, head_dim]."""
    param = next(model.parameters())
    for attn in model.attention_layers():
        attn.kv_cache = torch.zeros(2, num_pages, page_size, model.num_kv_heads, model.head_dim,
                                    dtype=dtype or param.dtype, device=param.device)
