"""Request and response shapes of the OpenAI API as SGLang serves it (pydantic v2).

Requests accept and ignore unknown fields (OpenAI clients send a few we do not use). Messages stay plain
dicts here: `api/chat.py` validates them, so the offline API and the server share one set of checks.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from stepserve.api.tools import validate_tools
from stepserve.engine.sampling_params import SamplingParams
from stepserve.errors import InvalidRequestError


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    type: Literal["text"] = "text"  # json_object / json_schema need constrained decoding, which we lack


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class _SamplingFields(_Request):
    """Fields shared by /v1/chat/completions and /v1/completions (SGLang's extra_body names included)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    separate_reasoning: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("tools")
    @classmethod
    def _check_tools(cls, tools: list[dict] | None) -> list[dict] | None:
        return validate_tools(tools) or None  # raises InvalidRequestError, which pydantic lets through

    @model_validator(mode="after")
    def _check_tool_choice(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if choice is None:
            self.tool_choice = "auto" if self.tools else "none"
        elif choice != "none" and not self.tools:
            raise InvalidRequestError(f"tool_choice {choice!r} needs a non-empty tools list", param="tool_choice")
        elif isinstance(choice, NamedToolChoice):
            names = [t["function"]["name"] for t in self.tools]
            if choice.function.name not in names:
                raise InvalidRequestError(f"tool_choice names {choice.function.name!r}, which is not in tools",
                                          param="tool_choice.function.name")
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_tools(self) -> list[dict] | None:
        """The tools the chat template shows the model: none for tool_choice none, only the named one."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools if t["function"]["name"] == self.tool_choice.function.name]
        return self.tools


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p or any(len(x) == 0 for x in p):
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        return list(p)


def to_sampling_params(req: ChatCompletionRequest | CompletionRequest, context_length: int,
                       prompt_len: int, vocab_size: int) -> SamplingParams:
    """The engine's SamplingParams for a request; output length checked against the context, logit_bias's
    keys against the vocabulary."""
    room = context_length - prompt_len
    if room < 1:
        raise InvalidRequestError(f"the prompt has {prompt_len} tokens, which leaves no room in the context of "
                                  f"{context_length} tokens", param="messages" if hasattr(req, "messages") else "prompt")
    limit = req.output_limit
    param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
    if limit is not None and limit > room:
        raise InvalidRequestError(f"{param} is too large: {limit} output tokens + {prompt_len} prompt tokens exceed "
                                  f"the context length of {context_length} tokens", param=param)
    given = {k: v for k, v in {
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty, "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty, "seed": req.seed}.items() if v is not None}
    return SamplingParams(n=req.n, max_tokens=room if limit is None else limit, min_tokens=req.min_tokens,
                          stop=req.stop or [], stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos,
                          logprobs=req.num_logprobs, skip_special_tokens=req.skip_special_tokens,
                          logit_bias=_logit_bias(req.logit_bias or {}, vocab_size), **given)


def _logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    """OpenAI's logit_bias (token id strings -> values) as token ids, each checked to be in the vocabulary."""
    out = {}
    for key, value in bias.items():
        token = int(key) if key.isascii() and key.isdigit() else -1
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}",
                                      param="logit_bias")
        out[token] = value
    return out


_FIELD = re.compile(r"[a-z_][a-z0-9_]*")  # OpenAI field names; union tags are type or class names
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def field_path(loc: tuple) -> str:
    """pydantic's error location as the field path a client wrote, e.g. `messages[0].content`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _FIELD.fullmatch(part) and part not in _TYPE_TAGS:
            out += ("." if out else "") + part
    return out


def validation_error(exc: ValidationError) -> InvalidRequestError:
    errors = exc.errors(include_url=False)
    err = max(errors, key=lambda e: len(e["loc"]))  # for a union, the member that got furthest says most
    param = field_path(err["loc"]) or None
    return InvalidRequestError(f"{param or 'body'}: {err['msg']}", param=param)


class ProfileRequest(_Request):
    """/start_profile's optional body (SGLang's fields that apply here)."""
    num_steps: int | None = Field(default=None, ge=1)
    with_stack: bool = False


def parse_request(cls: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


# --- responses --------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details={"cached_tokens": cached_tokens})


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "abort"] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "abort"] | None = None

    @field_serializer("delta")
    def _compact_delta(self, delta: DeltaMessage) -> dict:
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "stepserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
