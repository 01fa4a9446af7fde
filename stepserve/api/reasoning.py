"""Reasoning parser: splits model output into `reasoning_content` and `content` (deepseek-r1 semantics).

With forced reasoning (Step3-VL-10B's template ends the prompt with `<think>\\n`), everything up to `</think>`
is reasoning; a leading `<think>` in the output is dropped; content starts after `</think>` with leading
newlines stripped. The streaming object holds back only text that could still become a tag, so the
concatenated deltas always equal the one-shot `parse` of the same text.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"

# parser name -> whether output is reasoning before any `</think>` even without a leading `<think>`
_KINDS = {"deepseek-r1": True, "deepseek_r1": True, "qwen3": False}


def partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (text that must wait)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningStream:
    """Per-choice streaming state: `feed(delta) -> (reasoning_delta, content_delta)`, then `flush()`."""

    def __init__(self, force_reasoning: bool):
        self._force = force_reasoning
        self._state = "start"  # start -> reasoning -> content_start -> content
        self._buf = ""

    def feed(self, delta: str) -> tuple[str, str]:
        self._buf += delta
        return self._advance(final=False)

    def flush(self) -> tuple[str, str]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning, content = [], []
        while self._buf:
            if self._state == "start":
                if self._buf.startswith(THINK_START):
                    self._buf = self._buf[len(THINK_START):]
                    self._state = "reasoning"
                elif THINK_START.startswith(self._buf) and not final:
                    break
                else:
                    self._state = "reasoning" if self._force else "content"
            elif self._state == "reasoning":
                end = self._buf.find(THINK_END)
                if end >= 0:
                    reasoning.append(self._buf[:end])
                    self._buf = self._buf[end + len(THINK_END):]
                    self._state = "content_start"
                    continue
                keep = 0 if final else partial_tag_len(self._buf, THINK_END)
                reasoning.append(self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                break
            elif self._state == "content_start":
                self._buf = self._buf.lstrip("\r\n")
                if self._buf:
                    self._state = "content"
            else:
                content.append(self._buf)
                self._buf = ""
        return "".join(reasoning), "".join(content)


class ReasoningParser:
    def __init__(self, kind: str = "deepseek-r1", force_reasoning: bool | None = None):
        if kind not in _KINDS:
            raise ValueError(f"unknown reasoning parser {kind!r}; known: {', '.join(sorted(_KINDS))}")
        self.kind = kind
        self.force_reasoning = _KINDS[kind] if force_reasoning is None else force_reasoning

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self.force_reasoning)

    def parse(self, text: str) -> tuple[str | None, str | None]:
        s = self.stream()
        r1, c1 = s.feed(text)
        r2, c2 = s.flush()
        return (r1 + r2) or None, (c1 + c2) or None


def get_reasoning_parser(name: str, force_reasoning: bool | None = None) -> ReasoningParser:
    """The parser for `--reasoning-parser NAME`; ValueError naming the known parsers otherwise."""
    return ReasoningParser(name, force_reasoning)


def thinking_disabled(chat_template_kwargs: dict | None) -> bool:
    """A request that turns thinking off in the template gets no forced reasoning (its output is content)."""
    kw = chat_template_kwargs or {}
    return kw.get("enable_thinking") is False or kw.get("thinking") is False
