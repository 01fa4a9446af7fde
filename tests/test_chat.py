import json

import pytest
from PIL import Image

from stepserve.api.chat import render_chat, template_iterates_content
from stepserve.errors import InvalidRequestError

# a template that places image parts itself, the way multimodal templates (Step3-VL-10B's included) do
PARTS_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}<im_patch>{% else %}{{ c.text }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    from tests.fake_engine import tiny_tokenizer

    return tiny_tokenizer()


def test_text_and_generation_prompt(tok):
    prompt, images = render_chat([{"role": "user", "content": "What is 15% of 240?"}], tok, None)
    assert images == []
    assert prompt.endswith("<|im_start|>user\nWhat is 15% of 240?<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_images_in_place_and_in_order_across_messages(tok):
    pil = Image.new("RGB", (4, 4))
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://a/1.png"}},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                     {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "image", "image": pil}]},
    ]
    for template in (None, PARTS_TEMPLATE):
        prompt, images = render_chat(messages, tok, template)
        assert images == ["https://a/1.png", "data:image/png;base64,AAAA", pil]
        assert "user\n<im_patch><im_patch>Compare.<|im_end|>" in prompt
        assert "user\nand <im_patch><|im_end|>" in prompt


def test_content_format_detection(tok):
    assert template_iterates_content(PARTS_TEMPLATE)
    assert not template_iterates_content(tok.chat_template)


def test_tools_and_tool_turns(tok):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "What's the weather in Beijing?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_123", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"location": "Beijing", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_123", "content": "22 and sunny"},
    ]
    prompt, _ = render_chat(messages, tok, None, tools=tools)
    assert '"name": "get_weather"' in prompt.split("<|im_end|>")[0]  # the tool list in the system turn
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Beijing", "unit": "celsius"}}' in prompt
    assert "<tool_response>\n22 and sunny\n</tool_response>" in prompt


def test_arguments_reach_the_template_as_a_mapping(tok):
    seen = "{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.arguments.city }}{% endfor %}{% endfor %}"
    messages = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"city": "Paris"}'}}]}]
    assert render_chat(messages, tok, seen, add_generation_prompt=False)[0] == "Paris"


def test_chat_template_kwargs(tok):
    prompt, _ = render_chat([{"role": "user", "content": "hi"}], tok, None,
                            chat_template_kwargs={"enable_thinking": False})
    assert prompt.endswith("<think>\n</think>\n")


@pytest.mark.parametrize("messages,param", [
    ([], "messages"),
    ("hello", "messages"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "video_url"}]}], "messages[0].content[1].type"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0].image_url.url"),
    ([{"role": "user", "content": [{"type": "image"}]}], "messages[0].content[0].image"),
    ([{"role": "user", "content": "sneaky <im_patch>"}], "messages[0].content"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
     "messages[1].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls"),
])
def test_bad_messages_name_the_field(tok, messages, param):
    with pytest.raises(InvalidRequestError) as e:
        render_chat(messages, tok, None)
    assert e.value.param == param, e.value.message


def test_template_errors_are_client_errors(tok):
    with pytest.raises(InvalidRequestError, match="cannot render"):
        render_chat([{"role": "user", "content": "x"}], tok, "{{ raise_exception('no users here') }}")
    with pytest.raises(InvalidRequestError) as e:
        render_chat([{"role": "user", "content": "x"}], tok, None, chat_template_kwargs={"tokenize": True})
    assert e.value.param == "chat_template_kwargs.tokenize"


def test_template_dropping_images_is_reported(tok):
    only_text = "{% for m in messages %}{% for c in m.content %}{{ c.text }}{% endfor %}{% endfor %}"
    with pytest.raises(InvalidRequestError, match="placed 0 image"):
        render_chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}},
                                                  {"type": "text", "text": "t"}]}], tok, only_text)


def test_messages_are_not_mutated(tok):
    messages = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]}]
    before = json.dumps(messages)
    render_chat(messages, tok, None)
    assert json.dumps(messages) == before
