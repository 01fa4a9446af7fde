"""Hermes tool-call parser (Qwen convention): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

Rules, shared by the one-shot `parse` and the streaming object (one state machine, so a stream split
anywhere gives the same result as parsing the whole text):
- A block is a call when its body is a JSON object with a string "name" (one of the request's tools) and
  an optional object "arguments" (alias "parameters"), nothing else; arguments become
  `json.dumps(args, ensure_ascii=False)`. A block without `</tool_call>` at the end of the output counts
  when its JSON is complete.
- Anything else stays `content`, tags included; scanning resumes right after the bad `<tool_call>`.
- Whitespace before a call, a `<tool_calls>` / `</tool_calls>` wrapper directly around calls (the seed's
  Step3-VL output shows one) and whitespace at the end are consumed with the calls: `content` keeps only
  real text.
- Streaming sends a call's name once `{"name": "...", "arguments": {` has arrived (name checked), then
  argument fragments as they become final. The one case where the stream cannot match `parse`: a block
  whose JSON breaks after its name was sent (e.g. cut off by max_tokens); the call is then left as sent.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass

from stepserve.api.json_stream import CallJsonReader, loads_strict
from stepserve.api.reasoning import partial_tag_len
from stepserve.errors import InvalidRequestError

logger = logging.getLogger(__name__)

OPEN, CLOSE = "<tool_call>", "</tool_call>"
WRAP_OPEN, WRAP_CLOSE = "<tool_calls>", "</tool_calls>"
TOOL_NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_ARG_KEYS = ("arguments", "parameters")


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or new_call_id()

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    index: int
    id: str | None
    name: str | None
    arguments_delta: str


def validate_tools(tools: list[dict] | None) -> list[dict] | None:
    """Check OpenAI tool definitions; InvalidRequestError names the offending field."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise InvalidRequestError("tools must be a list", param="tools")
    seen = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequestError(f"{where} must be an object", param=where)
        if tool.get("type", "function") != "function":
            raise InvalidRequestError(f"{where}.type must be 'function'", param=f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequestError(f"{where}.function must be an object", param=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME_RE.fullmatch(name):
            raise InvalidRequestError(f"{where}.function.name must match [a-zA-Z0-9_-]{{1,64}}, got {name!r}",
                                      param=f"{where}.function.name")
        if name in seen:
            raise InvalidRequestError(f"{where}.function.name {name!r} is defined twice",
                                      param=f"{where}.function.name")
        seen.add(name)
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise InvalidRequestError(f"{where}.function.parameters must be a JSON schema of type 'object'",
                                      param=f"{where}.function.parameters")
        if params is not None:
            _check_schema(params, f"{where}.function.parameters")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise InvalidRequestError(f"{where}.function.description must be a string",
                                      param=f"{where}.function.description")
    return tools


_JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def _check_schema(schema: dict, where: str) -> None:
    """The JSON Schema keywords a template renders and a model follows must be well formed (a structural
    check, not a meta-schema validation): type, properties, items, required, enum."""
    def bad(key: str, what: str):
        return InvalidRequestError(f"{where}.{key} must be {what}, got {schema[key]!r}", param=f"{where}.{key}")

    kind = schema.get("type")
    if kind is not None and not (kind in _JSON_TYPES if isinstance(kind, str) else
                                 isinstance(kind, list) and kind and all(k in _JSON_TYPES for k in kind)):
        raise bad("type", f"one of {sorted(_JSON_TYPES)} or a list of them")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict) or not all(isinstance(v, dict) for v in props.values()):
            raise bad("properties", "an object mapping names to schemas")
        for name, sub in props.items():
            _check_schema(sub, f"{where}.properties.{name}")
    required = schema.get("required")
    if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        raise bad("required", "a list of property names")
    enum = schema.get("enum")
    if enum is not None and not (isinstance(enum, list) and enum):
        raise bad("enum", "a non-empty list")
    items = schema.get("items")
    if items is not None:
        if not isinstance(items, dict):
            raise bad("items", "a schema object")
        _check_schema(items, f"{where}.items")


def parse_call_body(body: str, names: frozenset[str] | None) -> ToolCall | None:
    """The call in one `<tool_call>` body, or None when the body is not a valid call."""
    try:
        obj = loads_strict(body)
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return None
        if names is not None and obj["name"] not in names:
            return None
        arg_keys = [k for k in obj if k != "name"]
        if len(arg_keys) > 1 or (arg_keys and arg_keys[0] not in _ARG_KEYS):
            return None
        args = obj[arg_keys[0]] if arg_keys else {}
        if not isinstance(args, dict):
            return None
        text = json.dumps(args, ensure_ascii=False)
        text.encode("utf-8")  # lone surrogates cannot go out over HTTP
        return ToolCall(obj["name"], text)
    except (ValueError, RecursionError):
        return None


class _Block:
    """A `<tool_call>` being read: what to restore if it is not a call, and the incremental reader."""

    def __init__(self, pending: str):
        self.pending = pending  # whitespace / wrapper before the tag: dropped if the block is a call
        self.reader = CallJsonReader()
        self.fed = 0  # body characters given to the reader
        self.broken = False  # reader failed after the name was sent
        self.index: int | None = None  # set once the name was sent
        self.sent_args = 0  # canonical argument pieces sent


class ToolCallStream:
    """Per-choice streaming state: `feed(delta) -> (content_delta, [ToolCallDelta])`, then `flush()`."""

    def __init__(self, names: frozenset[str] | None):
        self._names = names
        self._buf = ""
        self._after = ""  # "block": a call just ended (a </tool_calls> may follow) | "wrap": the wrapper did
        self._block: _Block | None = None
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += delta
        return self._advance(final=False)

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, list[ToolCallDelta]]:
        text: list[str] = []
        deltas: list[ToolCallDelta] = []
        while True:
            if self._block is not None:
                if not self._advance_block(final, text, deltas):
                    break
            elif not self._advance_text(final, text):
                break
        return "".join(text), deltas

    # --- text between calls ---------------------------------------------------------------------
    def _advance_text(self, final: bool, out: list[str]) -> bool:
        """Consume some text; False when nothing more can be decided now."""
        if self._after:
            rest = self._buf.lstrip()
            if self._after == "block" and rest.startswith(WRAP_CLOSE):
                self._buf = rest[len(WRAP_CLOSE):]
                self._after = "wrap"
                return True
            if not rest and final:
                self._buf = ""
            if not final and (not rest or self._after == "block" and WRAP_CLOSE.startswith(rest)):
                return False
            self._after = ""
        buf = self._buf
        if not buf:
            return False
        p = buf.find("<")
        if p < 0:
            keep = 0 if final else len(buf) - len(buf.rstrip())
            self._emit_text(len(buf) - keep, out)
            return False
        ws = len(buf[:p].rstrip())  # whitespace right before a tag belongs to the tag
        rest = buf[p:]
        if rest.startswith(OPEN):
            self._emit_text(ws, out)
            self._block = _Block(pending=self._buf[:p - ws])
            self._buf = self._buf[p - ws + len(OPEN):]
            return True
        if rest.startswith(WRAP_OPEN):
            inner = rest[len(WRAP_OPEN):]
            nxt = inner.lstrip()
            if nxt.startswith(OPEN):
                self._emit_text(ws, out)
                skipped = p - ws + len(WRAP_OPEN) + len(inner) - len(nxt)
                self._block = _Block(pending=self._buf[:skipped])
                self._buf = self._buf[skipped + len(OPEN):]
                return True
            if not final and OPEN.startswith(nxt):
                self._emit_text(ws, out)
                return False
            self._emit_text(p + len(WRAP_OPEN), out)
            return True
        if not final and (OPEN.startswith(rest) or WRAP_OPEN.startswith(rest)):
            self._emit_text(ws, out)
            return False
        self._emit_text(p + 1, out)
        return True

    def _emit_text(self, n: int, out: list[str]) -> None:
        out.append(self._buf[:n])
        self._buf = self._buf[n:]

    # --- inside <tool_call> ---------------------------------------------------------------------
    def _advance_block(self, final: bool, text: list[str], deltas: list[ToolCallDelta]) -> bool:
        """Read more of the open block; False when it needs more input."""
        b = self._block
        end = self._buf.find(CLOSE, max(0, b.fed - len(CLOSE)))
        if end >= 0 or final:
            body = self._buf if end < 0 else self._buf[:end]
            if self._finish_block(parse_call_body(body, self._names), text, deltas):
                self._buf = "" if end < 0 else self._buf[end + len(CLOSE):]
            return True
        if b.broken:
            return False
        limit = len(self._buf) - partial_tag_len(self._buf, CLOSE)
        try:
            b.reader.feed(self._buf[b.fed:limit])
        except (ValueError, RecursionError):
            if b.index is None:
                self._reject_block(text)
                return True
            b.broken = True
            logger.warning("tool call %d: arguments stopped being valid JSON after streaming began", b.index)
            return False
        finally:
            b.fed = limit
        r = b.reader
        named = r.name is not None and r.top_keys[0] == "name"
        if b.index is None and named and (not r.name or self._names is not None and r.name not in self._names):
            self._reject_block(text)
            return True
        if b.index is None and named and r.args_started and r.top_keys[1] in _ARG_KEYS:
            b.index = len(self.calls)
            self.calls.append(ToolCall(r.name, ""))
            deltas.append(ToolCallDelta(b.index, self.calls[-1].id, r.name, ""))
        if b.index is not None and b.sent_args < len(r.args):
            piece = "".join(r.args[b.sent_args:])
            b.sent_args = len(r.args)
            self.calls[b.index].arguments += piece
            deltas.append(ToolCallDelta(b.index, None, None, piece))
        return False

    def _finish_block(self, call: ToolCall | None, text: list[str], deltas: list[ToolCallDelta]) -> bool:
        """Close the block with its parsed call; False (and the tag back in the text) if it is not one."""
        b = self._block
        if b.index is None:
            if call is None:
                self._reject_block(text)
                return False
            self.calls.append(call)
            deltas.append(ToolCallDelta(len(self.calls) - 1, call.id, call.name, ""))
            deltas.append(ToolCallDelta(len(self.calls) - 1, None, None, call.arguments))
        else:
            sent = self.calls[b.index]
            if call is not None and call.name == sent.name and call.arguments.startswith(sent.arguments):
                rest = call.arguments[len(sent.arguments):]
                if rest:
                    sent.arguments += rest
                    deltas.append(ToolCallDelta(b.index, None, None, rest))
            else:
                logger.warning("tool call %d was streamed but its block is not a valid call", b.index)
        self._block = None
        self._after = "block"
        return True

    def _reject_block(self, text: list[str]) -> None:
        text.append(self._block.pending + OPEN)
        self._block = None


class HermesToolParser:
    def __init__(self, tools: list[dict] | None = None):
        validate_tools(tools)
        self.names = None if tools is None else frozenset(t["function"]["name"] for t in tools)

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.names)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        s = self.stream()
        s._buf = text
        content, _ = s.flush()
        return content or None, s.calls


_PARSERS = {"hermes": HermesToolParser, "qwen": HermesToolParser, "qwen25": HermesToolParser}


def get_tool_parser(name: str, tools: list[dict] | None) -> HermesToolParser:
    """The parser for `--tool-call-parser NAME`; ValueError naming the known parsers otherwise."""
    if name not in _PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(sorted(_PARSERS))}")
    return _PARSERS[name](tools)
