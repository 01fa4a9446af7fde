"""Incremental JSON reader for a tool call object `{"name": ..., "arguments": {...}}`.

Fed character by character, it validates the JSON as it arrives and re-serializes the arguments object
exactly as `json.dumps(value, ensure_ascii=False)` would, emitting only pieces that can no longer change
(a number is written when it ends, an escape when it is complete). That is what lets the streaming
tool-call parser send argument fragments that concatenate to the non-streaming result. Errors are
permanent syntax errors: no continuation could make the text valid JSON.
"""

from __future__ import annotations

import json
import math
import re

_WS = " \t\n\r"
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_NUMBER_RE = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_LITERALS = {"t": "true", "f": "false", "n": "null"}


class JsonError(ValueError):
    pass


def canonical_number(text: str) -> str:
    """`json.dumps(json.loads(text))` for a JSON number; non-finite values are rejected."""
    if not _NUMBER_RE.fullmatch(text):
        raise JsonError(f"bad number {text!r}")
    value = json.loads(text)
    if isinstance(value, float) and not math.isfinite(value):
        raise JsonError(f"number out of range {text!r}")
    return json.dumps(value)


def escape_char(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    if c < " ":
        return json.dumps(c)[1:-1]
    return c


class CallJsonReader:
    """Reads one call object; `args` collects the canonical text of the value of its second key."""

    def __init__(self) -> None:
        self._stack: list[list] = []  # per open container: [kind "{" or "[", keys seen (set)]
        self._state = "value"
        self._token: list[str] = []  # the number, literal or decoded string being read
        self._string_role = ""  # "key" | "value"
        self._escape: str | None = None  # None, "" after a backslash, or the \\u hex digits read so far
        self._high_surrogate: int | None = None
        self._literal = ""
        self._capture_depth = 0  # stack depth of the captured arguments object, 0 while not capturing
        self.top_keys: list[str] = []
        self.name: str | None = None
        self.args: list[str] = []
        self.args_started = False
        self.args_done = False
        self.done = False

    def feed(self, text: str) -> None:
        for c in text:
            self._char(c)

    # --- output -------------------------------------------------------------------------------
    def _emit(self, piece: str) -> None:
        if self._capture_depth and len(self._stack) >= self._capture_depth:
            self.args.append(piece)

    # --- the state machine --------------------------------------------------------------------
    def _char(self, c: str) -> None:
        state = self._state
        if state == "string":
            self._string_char(c)
        elif state == "number":
            if c in _NUMBER_CHARS:
                self._token.append(c)
                return
            self._emit(canonical_number("".join(self._token)))
            self._end_value()
            self._char(c)
        elif state == "literal":
            self._literal_char(c)
        elif c in _WS:
            return
        elif state == "value" or state == "value_or_end":
            if state == "value_or_end" and c == "]":
                self._close("[")
            else:
                self._value_start(c)
        elif state == "key" or state == "key_or_end":
            if state == "key_or_end" and c == "}":
                self._close("{")
            elif c == '"':
                self._start_string("key")
            else:
                raise JsonError(f"expected a key, got {c!r}")
        elif state == "colon":
            if c != ":":
                raise JsonError(f"expected ':', got {c!r}")
            self._emit(": ")
            self._state = "value"
        elif state == "after_value":
            self._after_value(c)
        else:  # "end": the call object is complete
            raise JsonError(f"extra data {c!r}")

    def _value_start(self, c: str) -> None:
        if len(self._stack) == 1 and len(self.top_keys) == 2 and c == "{":
            self._capture_depth = 2
            self.args_started = True
        if c == "{" or c == "[":
            if not self._stack and c != "{":
                raise JsonError("a tool call must be a JSON object")
            self._stack.append([c, set()])
            self._emit(c)
            self._state = "key_or_end" if c == "{" else "value_or_end"
        elif not self._stack:
            raise JsonError("a tool call must be a JSON object")
        elif c == '"':
            self._start_string("value")
        elif c == "-" or c.isdigit() and c.isascii():
            self._token = [c]
            self._state = "number"
        elif c in _LITERALS:
            self._literal = c
            self._state = "literal"
        else:
            raise JsonError(f"unexpected {c!r}")

    def _after_value(self, c: str) -> None:
        kind = self._stack[-1][0]
        if c == ",":
            self._emit(", ")
            self._state = "key" if kind == "{" else "value"
        elif c == ("}" if kind == "{" else "]"):
            self._close(kind)
        else:
            raise JsonError(f"expected ',' or a closing bracket, got {c!r}")

    def _close(self, kind: str) -> None:
        self._emit("}" if kind == "{" else "]")
        if self._capture_depth == len(self._stack):
            self._capture_depth = 0
            self.args_done = True
        self._stack.pop()
        self._end_value()

    def _end_value(self) -> None:
        self._state = "after_value" if self._stack else "end"
        self.done = not self._stack

    def _literal_char(self, c: str) -> None:
        word = _LITERALS[self._literal[0]]
        if c != word[len(self._literal)]:
            raise JsonError(f"bad literal {self._literal + c!r}")
        self._literal += c
        if self._literal == word:
            self._emit(word)
            self._end_value()

    # --- strings ------------------------------------------------------------------------------
    def _start_string(self, role: str) -> None:
        self._state = "string"
        self._string_role = role
        self._token = []
        self._emit('"')

    def _string_char(self, c: str) -> None:
        if self._escape is not None:
            self._escape_char(c)
        elif c == "\\":
            self._escape = ""
        elif self._high_surrogate is not None:
            raise JsonError("lone surrogate in string")
        elif c == '"':
            self._end_string()
        elif "\ud800" <= c <= "\udfff":
            raise JsonError("lone surrogate in string")
        else:
            self._decoded(c)

    def _escape_char(self, c: str) -> None:
        esc = self._escape
        if esc == "":
            if c == "u":
                self._escape = "u"
                return
            if self._high_surrogate is not None or c not in _SIMPLE_ESCAPES:
                raise JsonError(f"bad escape \\{c}")
            self._escape = None
            self._decoded(_SIMPLE_ESCAPES[c])
            return
        if c not in "0123456789abcdefABCDEF":
            raise JsonError(f"bad \\u escape {esc + c!r}")
        esc += c
        if len(esc) < 5:
            self._escape = esc
            return
        self._escape = None
        code = int(esc[1:], 16)
        if self._high_surrogate is not None:
            if not 0xDC00 <= code <= 0xDFFF:
                raise JsonError("lone surrogate in string")
            code = 0x10000 + ((self._high_surrogate - 0xD800) << 10) + (code - 0xDC00)
            self._high_surrogate = None
        elif 0xD800 <= code <= 0xDBFF:
            self._high_surrogate = code
            return
        elif 0xDC00 <= code <= 0xDFFF:
            raise JsonError("lone surrogate in string")
        self._decoded(chr(code))

    def _decoded(self, c: str) -> None:
        self._token.append(c)
        self._emit(escape_char(c))

    def _end_string(self) -> None:
        self._emit('"')
        text = "".join(self._token)
        if self._string_role == "key":
            keys = self._stack[-1][1]
            if text in keys:
                raise JsonError(f"duplicate key {text!r}")
            keys.add(text)
            if len(self._stack) == 1:
                self.top_keys.append(text)
            self._state = "colon"
            return
        if len(self._stack) == 1 and len(self.top_keys) == 1:
            self.name = text
        self._end_value()


def loads_strict(text: str):
    """json.loads with the same rules as CallJsonReader: no duplicate keys, no NaN/Infinity."""

    def pairs(items: list[tuple]) -> dict:
        out = {}
        for k, v in items:
            if k in out:
                raise JsonError(f"duplicate key {k!r}")
            out[k] = v
        return out

    def bad_constant(name: str):
        raise JsonError(f"{name} is not JSON")

    return json.loads(text, strict=False, object_pairs_hook=pairs, parse_constant=bad_constant,
                      parse_float=lambda s: json.loads(canonical_number(s)))
