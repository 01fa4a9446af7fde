"""What the engine hands back: per request, per choice (n > 1), cumulative with the latest delta."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    delta_text: str = ""  # text added since the previous output of this request
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[Logprob] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestTimes:
    """time.monotonic() stamps of the request's first choice in the engine (None until reached)."""

    arrival: float  # handed to the engine
    scheduled: float | None  # first in a step (images encoded and prompt computed from here)
    first_token: float | None  # its first token reached the engine's host side


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    num_image_tokens: int = 0
    times: RequestTimes | None = None

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)


def merge_outputs(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """`newer` carrying `older`'s deltas too: what a reader that fell one output behind should see.

    Both hold every choice of the request, in the same order (the engine builds them so)."""
    for o, n in zip(older.outputs, newer.outputs, strict=True):
        n.delta_text = o.delta_text + n.delta_text
        n.delta_token_ids = o.delta_token_ids + n.delta_token_ids
        n.delta_logprobs = o.delta_logprobs + n.delta_logprobs
    return newer
