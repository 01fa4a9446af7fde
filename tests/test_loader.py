"""Checkpoint loading (names, shards, errors, dummy weights), tokenizer and chat template of the tiny model."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepserve.errors import ModelLoadError
from stepserve.layers.attention import build_context, forward_context
from stepserve.loader import (load_chat_template, load_model, load_tokenizer, resolve_dtype, resolve_model_dir)
from stepserve.models.registry import model_class
from stepserve.testing import (CHAT_TEMPLATE, MARKUP_TOKENS, SPECIAL_TOKENS, attach_kv_cache, checkpoint_shapes,
                               tiny_checkpoint)


@pytest.fixture(scope="module")
def single_file_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("single") / "ckpt", shards=1)


def checkpoint_tensors(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        out |= load_file(shard)
    return out


def param_rows(model, name: str) -> torch.Tensor:
    """The part of a model parameter that checkpoint tensor `name` fills."""
    target, shard = model._packed_target(name)
    param = model.get_parameter(target)
    if shard is None:
        return param
    sizes = model.get_submodule(target.rpartition(".")[0]).output_sizes
    return param[sum(sizes[:shard]): sum(sizes[:shard + 1])]


def rewrite(src, dst, change) -> None:
    """Copy the single-file checkpoint `src` to `dst`, with its tensor dict edited by `change`."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"))


def test_sharded_checkpoint_round_trips(tiny_model_dir):
    assert (tiny_model_dir / "model.safetensors.index.json").is_file()
    assert len(list(tiny_model_dir.glob("*.safetensors"))) == 2
    model = load_model(tiny_model_dir, torch.float32, "cpu")
    tensors = checkpoint_tensors(tiny_model_dir)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert set(tensors) == set(checkpoint_shapes(config)) == model.checkpoint_names()
    for name, tensor in tensors.items():
        if ".out_proj." in name or ".c_proj." in name:
            continue  # the tower's, folded with their layer scales after loading (test_vision checks them)
        assert torch.equal(param_rows(model, name), tensor.float()), name


def test_single_file_loads_the_same_weights(tiny_model_dir, single_file_dir):
    a = load_model(tiny_model_dir, torch.bfloat16, "cpu")
    b = load_model(single_file_dir, "bfloat16", "cpu")
    assert next(b.parameters()).dtype == torch.bfloat16
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_missing_tensor_is_named(single_file_dir, tmp_path):
    gone = "model.layers.1.self_attn.k_proj.weight"
    rewrite(single_file_dir, tmp_path / "ckpt", lambda t: t.pop(gone))
    with pytest.raises(ModelLoadError, match=f"lacks 1 tensors: {gone}"):
        load_model(tmp_path / "ckpt", torch.float32, "cpu")


def test_unexpected_tensor_is_reported(single_file_dir, tmp_path, caplog):
    extra = "vision_model.transformer.resblocks.0.attn.bogus"
    rewrite(single_file_dir, tmp_path / "extra", lambda t: t.update({extra: torch.zeros(3)}))
    with caplog.at_level(logging.WARNING, logger="stepserve.loader"):
        load_model(tmp_path / "extra", torch.float32, "cpu")
    assert extra in caplog.text and "unexpected" in caplog.text
    # Together with a missing one (a renamed tensor), both are in the error.
    renamed = lambda t: t.update({"model.norm.scale": t.pop("model.norm.weight")})  # noqa: E731
    rewrite(single_file_dir, tmp_path / "renamed", renamed)
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight.*unexpected tensors: model\.norm\.scale"):
        load_model(tmp_path / "renamed", torch.float32, "cpu")


def test_wrong_shape_is_named(single_file_dir, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    rewrite(single_file_dir, tmp_path / "ckpt", lambda t: t.update({name: t[name][:-1].clone()}))
    with pytest.raises(ModelLoadError, match=name):
        load_model(tmp_path / "ckpt", torch.float32, "cpu")


def test_dummy_weights_need_only_the_config(tiny_model_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    model = load_model(tmp_path, torch.float32, "cpu", load_format="dummy", seed=1)
    again = load_model(tmp_path, torch.float32, "cpu", load_format="dummy", seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    attach_kv_cache(model, 16, 16)
    ids = torch.arange(50)
    with torch.inference_mode(), forward_context(build_context([50], [50], [[3, 1, 7, 2]], 16)):
        logits = model.compute_logits(model(ids, ids))
    assert torch.isfinite(logits).all() and logits.std() > 0.01
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(tmp_path, torch.float32, "cpu")


def test_unknown_architecture_and_options_are_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="StepVLForConditionalGeneration"):
        model_class({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    assert model_class({"model_type": "step_robotics"}).__name__ == "Step3VL10BForCausalLM"
    with pytest.raises(ModelLoadError, match="load_format"):
        load_model(tmp_path, torch.float32, "cpu", load_format="gguf")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path, torch.float32, "cpu")


def test_resolve_dtype_and_model_dir(tiny_model_dir, tmp_path, monkeypatch):
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ModelLoadError):
        resolve_dtype("int3", "cpu")
    assert resolve_model_dir(str(tiny_model_dir)) == tiny_model_dir
    with pytest.raises(ModelLoadError, match="not a directory"):
        resolve_model_dir(str(tmp_path / "nowhere"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    built_in = resolve_model_dir(None)
    assert built_in.parent == tmp_path / "cache" / "stepserve" and (built_in / "config.json").is_file()
    stamp = (built_in / "config.json").stat().st_mtime_ns
    assert resolve_model_dir(None) == built_in and (built_in / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in built_in.parent.iterdir()] == [built_in.name]  # no temp dirs left behind
    assert (built_in / "config.json").read_text() == (tiny_model_dir / "config.json").read_text()


def test_tokenizer_has_the_real_special_tokens(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + MARKUP_TOKENS}
    assert len(set(ids.values())) == len(ids) and tok.unk_token_id not in ids.values()
    assert config["image_token_id"] == ids["<im_patch>"]
    assert config["text_config"]["eos_token_id"] == [ids["<|endoftext|>"], ids["<|im_end|>"], ids["<im_patch>"]]
    assert len(tok) < config["text_config"]["vocab_size"]
    text = "<|im_start|>user\nWhat is in this image?<im_patch><|im_end|>"
    encoded = tok.encode(text, add_special_tokens=False)
    assert ids["<im_patch>"] in encoded and tok.decode(encoded) == text
    # <think> / <tool_call> survive skip_special_tokens so the parsers can see them; image tokens do not.
    assert tok.decode(tok.encode("<think>a</think><im_patch>", add_special_tokens=False),
                      skip_special_tokens=True) == "<think>a</think>"
    assert len(tok.encode("The quick brown fox", add_special_tokens=False)) < 8  # real merges, not bytes


def render(tok, messages, **kwargs) -> str:
    return tok.apply_chat_template(messages, tokenize=False, chat_template=CHAT_TEMPLATE, **kwargs)


def test_chat_template_turns_and_generation_prompt(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<im_patch>What is it?"},
            {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Sure?"}]
    turns = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<im_patch>What is it?<|im_end|>\n"
             "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n")
    assert render(tok, msgs) == turns
    assert render(tok, msgs, add_generation_prompt=True) == turns + "<|im_start|>assistant\n<think>\n"
    assert render(tok, msgs, add_generation_prompt=True, enable_thinking=False) == \
        turns + "<|im_start|>assistant\n<think>\n</think>\n"
    assert render(tok, msgs[1:2]) == "<|im_start|>user\n<im_patch>What is it?<|im_end|>\n"


def test_chat_template_tools(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    params = {"type": "object", "properties": {"city": {"type": "string"}}}
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": params}}
    call = lambda i, args: {"id": f"call_{i}", "type": "function",  # noqa: E731
                            "function": {"name": "get_weather", "arguments": args}}
    msgs = [{"role": "user", "content": "Weather in Paris and Rome?"},
            # OpenAI clients send arguments as a JSON string; a dict must render the same way.
            {"role": "assistant", "content": "",
             "tool_calls": [call(1, '{"city": "Paris"}'), call(2, {"city": "Rome"})]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "25C"}]
    text = render(tok, msgs, tools=[tool], add_generation_prompt=True)
    system, rest = text.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\n# Tools\n")
    assert "<tools>\n" + json.dumps(tool, ensure_ascii=False) + "\n</tools>" in system
    assert "<tool_call>" in system and "</tool_call>" in system
    assert rest == (
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n25C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n")
    with_system = render(tok, [{"role": "system", "content": "Be brief."}] + msgs[:1], tools=[tool])
    assert with_system.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")


def test_chat_template_sources(tiny_model_dir, tmp_path):
    assert load_chat_template(tiny_model_dir) == CHAT_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert load_chat_template(tmp_path) == "{{ messages }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert load_chat_template(tmp_path) == "D"
    (tmp_path / "mine.jinja").write_text("X")
    assert load_chat_template(tiny_model_dir, override_path=tmp_path / "mine.jinja") == "X"
    (tmp_path / "tokenizer_config.json").unlink()
    assert load_chat_template(tmp_path) is None


def test_real_dummy_checkpoint_pairs_real_sizes_with_the_tiny_tokenizer(tmp_path):
    from stepserve.models.configs import Step3VLConfig
    from stepserve.testing import real_config, real_dummy_checkpoint

    path = real_dummy_checkpoint(tmp_path / "real")
    assert not list(path.glob("*.safetensors"))
    config = json.loads((path / "config.json").read_text())
    tok = load_tokenizer(path)
    assert config["image_token_id"] == tok.convert_tokens_to_ids("<im_patch>")
    real = Step3VLConfig.from_dict(real_config())
    assert Step3VLConfig.from_dict(config).text == real.text and real.image_token_id == 151679
    sizes = (real.text.num_hidden_layers, real.text.hidden_size, real.vision.layers, real.vision.mlp_dim)
    assert sizes == (36, 4096, 47, 8960)
