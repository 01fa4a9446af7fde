"""Chat messages -> prompt text (the model's jinja chat template) and the ordered list of image sources.

Every image part becomes one `<im_patch>` in the prompt, in place; `multimodal.processor.expand_prompt`
later swaps each for the image's token layout. Like SGLang, a template that iterates over message content
(Step3-VL-10B's own template handles image parts) receives OpenAI-style parts normalised to
`{"type": "image"}` / `{"type": "text", "text": ...}` and places the images itself; a template that only
knows string content receives the parts joined in order with each image as the literal `<im_patch>` (no
separator: the same text a part-iterating template writing `<im_patch>` would produce).
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import jinja2
import jinja2.nodes

from stepserve.errors import InvalidRequestError

IMAGE_PLACEHOLDER = "<im_patch>"
ROLES = {"system", "developer", "user", "assistant", "tool"}
# apply_chat_template's own parameters: a template kwarg with one of these names would collide
_RESERVED_KWARGS = {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}

ImageSource = Any  # http(s)/data:/file:// URL or path string, bytes, pathlib.Path or PIL image


@functools.lru_cache(maxsize=8)
def template_iterates_content(chat_template: str) -> bool:
    """Whether the template loops over `<msg>.content` (so it can place image parts itself)."""
    try:
        ast = jinja2.Environment().parse(chat_template)
    except jinja2.TemplateError:
        return False
    for loop in ast.find_all(jinja2.nodes.For):
        it = loop.iter
        while isinstance(it, jinja2.nodes.Filter) and it.node is not None:
            it = it.node
        if isinstance(it, jinja2.nodes.Getattr) and it.attr == "content":
            return True
        if isinstance(it, jinja2.nodes.Getitem) and isinstance(it.arg, jinja2.nodes.Const) and it.arg.value == "content":
            return True
    return False


def _bad(param: str, msg: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param} {msg}", param=param)


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise _bad(param, "must be a string")
    if IMAGE_PLACEHOLDER in value:
        raise _bad(param, f"must not contain the image placeholder {IMAGE_PLACEHOLDER}; send images as image parts")
    return value


def _image_source(part: dict, param: str) -> ImageSource:
    if part["type"] == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str) or not url:
            raise _bad(f"{param}.image_url.url", "must be a non-empty string")
        return url
    image = part.get("image", part.get("url"))
    if image is None or image == "":
        raise _bad(f"{param}.image", "is required for an image part")
    return image


def _content_parts(content: list, where: str, images: list[ImageSource]) -> list[dict]:
    parts = []
    for j, part in enumerate(content):
        param = f"{where}.content[{j}]"
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        if not isinstance(part, dict):
            raise _bad(param, "must be an object")
        kind = part.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _text(part.get("text"), f"{param}.text")})
        elif kind in ("image_url", "image"):
            images.append(_image_source(part, param))
            parts.append({"type": "image"})
        else:
            raise _bad(f"{param}.type", f"must be 'text', 'image_url' or 'image', got {kind!r}")
    return parts


def _tool_calls(calls: Any, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise _bad(f"{where}.tool_calls", "must be a list")
    out = []
    for k, call in enumerate(calls):
        param = f"{where}.tool_calls[{k}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"{param}.function", "must be an object with a string name")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except ValueError:
                raise _bad(f"{param}.function.arguments", "must be a JSON object encoded as a string") from None
        if not isinstance(args, dict):
            raise _bad(f"{param}.function.arguments", "must be a JSON object")
        # templates written for transformers (Qwen's included) expect the arguments as a mapping
        out.append({**call, "type": call.get("type", "function"), "function": {**fn, "arguments": args}})
    return out


def normalize_messages(messages: Any, iterate_content: bool) -> tuple[list[dict], list[ImageSource]]:
    """Validated copies of `messages` as the template sees them, and their images in order."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list")
    out, images = [], []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _bad(where, "must be an object")
        role = msg.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role", f"must be one of {sorted(ROLES)}, got {role!r}")
        if msg.get("content") is None and role != "assistant":  # only an assistant turn may be just tool calls
            raise _bad(f"{where}.content", f"is required in a {role} message")
        msg = {k: copy.copy(v) for k, v in msg.items() if v is not None}
        msg["role"] = "system" if role == "developer" else role
        content = msg.get("content", "")
        if isinstance(content, list):
            parts = _content_parts(content, where, images)
            if iterate_content and any(p["type"] == "image" for p in parts):
                content = parts
            else:
                content = "".join(IMAGE_PLACEHOLDER if p["type"] == "image" else p["text"] for p in parts)
        elif isinstance(content, str):
            _text(content, f"{where}.content")
        else:
            raise _bad(f"{where}.content", "must be a string or a list of content parts")
        msg["content"] = content
        if "tool_calls" in msg:
            if role != "assistant":
                raise _bad(f"{where}.tool_calls", "is only allowed in assistant messages")
            msg["tool_calls"] = _tool_calls(msg["tool_calls"], where)
        if "tool_call_id" in msg and not isinstance(msg["tool_call_id"], str):
            raise _bad(f"{where}.tool_call_id", "must be a string")
        out.append(msg)
    return out, images


def image_part_params(messages: list[dict]) -> list[str]:
    """The field path of each image part of valid `messages`, in the order `render_chat` returns the sources."""
    out = []
    for i, msg in enumerate(messages):
        content = msg.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, dict) and part.get("type") in ("image_url", "image"):
                field = "image_url.url" if part["type"] == "image_url" else "image"
                out.append(f"messages[{i}].content[{j}].{field}")
    return out


def render_chat(messages: list[dict], tokenizer: Any, chat_template: str | None, tools: list[dict] | None = None,
                add_generation_prompt: bool = True,
                chat_template_kwargs: dict | None = None) -> tuple[str, list[ImageSource]]:
    """Prompt text and image sources for `messages`; InvalidRequestError names the offending field."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise InvalidRequestError("the model has no chat template; use /v1/completions or pass --chat-template")
    kwargs = dict(chat_template_kwargs or {})
    for key in kwargs:
        if key in _RESERVED_KWARGS:
            raise _bad(f"chat_template_kwargs.{key}", "is not a template variable that can be set")
    msgs, images = normalize_messages(messages, template_iterates_content(template))
    try:
        prompt = tokenizer.apply_chat_template(msgs, tools=tools, chat_template=template, tokenize=False,
                                               add_generation_prompt=add_generation_prompt, **kwargs)
    except (jinja2.TemplateError, TypeError, ValueError) as e:
        # raise_exception() in a template, or messages the template cannot render: the client's to fix
        raise InvalidRequestError(f"the chat template cannot render these messages: {e}", param="messages") from e
    found = prompt.count(IMAGE_PLACEHOLDER)
    if found != len(images):
        raise InvalidRequestError(f"the chat template placed {found} image(s) but the messages hold {len(images)}",
                                  param="messages")
    return prompt, images
