"""Token ids -> finalized text deltas, cut at stop strings.

IncrementalDetokenizer decodes a short window of recent tokens each step and hands out only text that
later tokens cannot change; StopChecker holds back a tail that may begin a stop string and cuts the
stream at the first one; DetokenizeState is the pair the engine keeps per sequence.
"""

from __future__ import annotations

from typing import Any

from tokenizers import decoders

from stepserve.engine.sampling_params import SamplingParams

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 4  # tokens kept ahead of the new ones: decoders drop or add spaces by left context
_SLIDE_AT = 16  # the window restarts from its last _CONTEXT_TOKENS once it is this long
_MAX_HELD_TOKENS = 64  # a U+FFFD tail this long is invalid bytes, not a character still arriving
_MAX_INCOMPLETE = 3  # bytes of a UTF-8 character that can still await the rest (a 4-byte one's first 3)


class IncrementalDetokenizer:
    """Decodes tokens as they come; concatenated outputs equal tokenizer.decode(all known ids).

    Each step decodes the window (context tokens + new ones) and hands out its text up to any trailing run
    of U+FFFD: an incomplete UTF-8 sequence decodes as U+FFFD until its last byte arrives, and text before
    that run can no longer change. `_done` counts the window's characters already handed out. Ids the
    tokenizer does not know (padded vocabulary rows, negatives) are dropped.

    A byte-level decoder (GPT-2 / Qwen BPE) maps the tokens' bytes to text as lossy UTF-8, where later bytes
    change only an incomplete character at the very end. There a U+FFFD run that is invalid bytes goes out
    once tokens follow it, instead of after _MAX_HELD_TOKENS: a model emitting undecodable bytes would
    otherwise hold its stream back for that many steps.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool = True):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # The Rust tokenizer returns the same text without the Python wrapper's ~3 us a call, unless the
        # wrapper also rewrites spaces around punctuation.
        cleans_spaces = getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._decoder = backend if backend is not None and not cleans_spaces else tokenizer
        self._lossy_bytes = backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
        self._skip_special = skip_special_tokens
        self._vocab_size = len(tokenizer)
        self._window = self._known(prompt_ids[-_CONTEXT_TOKENS:])
        context = self._decode(self._window)
        if context.endswith(_REPLACEMENT):  # a prompt ending mid-character must not absorb output bytes
            self._window, context = [], ""
        self._done = len(context)

    def add(self, token_ids: list[int]) -> str:
        """The text these tokens finalize (may be empty while a character is incomplete)."""
        new = self._known(token_ids)
        if not new:
            return ""
        self._window.extend(new)
        text = self._decode(self._window)
        final = len(text.rstrip(_REPLACEMENT))
        if final < len(text):
            final = len(text) if len(self._window) > _MAX_HELD_TOKENS else max(final, self._settled(text))
        delta = text[self._done : final]
        self._done = max(self._done, final)
        if final == len(text) and len(self._window) >= _SLIDE_AT:
            self._window = self._window[-_CONTEXT_TOKENS:]
            self._done = len(self._decode(self._window))
        return delta

    def flush(self) -> str:
        """Everything not handed out yet, U+FFFD included (the sequence has ended)."""
        text = self._decode(self._window)
        delta = text[self._done :]
        self._done = len(text)
        return delta

    def _settled(self, text: str) -> int:
        """For a lossy byte decoder, the length of `text` (the window's, ending in U+FFFD) that no later token
        can change: what all tokens but the last decode to, less its last _MAX_INCOMPLETE U+FFFD at most (an
        incomplete character there that the last token continues). 0 for other decoders."""
        if not self._lossy_bytes or len(self._window) < 2:
            return 0
        head = self._decode(self._window[:-1])
        cut = max(len(head.rstrip(_REPLACEMENT)), len(head) - _MAX_INCOMPLETE)
        return cut if text.startswith(head[:cut]) else 0

    def _known(self, token_ids: list[int]) -> list[int]:
        return [t for t in token_ids if 0 <= t < self._vocab_size]

    def _decode(self, ids: list[int]) -> str:
        return self._decoder.decode(ids, skip_special_tokens=self._skip_special) if ids else ""


class StopChecker:
    """Cuts a text stream at the first stop string and holds back a tail that may begin one.

    "First" is the stop string that is complete earliest in the text (the longest one if several complete at
    the same character), so the result does not depend on how the text was split into deltas. It keeps only
    the last (longest stop - 1) characters: a new match must end inside the new delta.
    """

    def __init__(self, stop: list[str], include_stop_str_in_output: bool):
        self._stop = list(stop)
        self._include = include_stop_str_in_output
        self._keep = max(map(len, self._stop), default=1) - 1
        self._tail = ""  # the last `_keep` characters seen, of which the last `_held` not handed out
        self._held = 0
        # last character -> the proper stop prefixes ending with it, longest first: most deltas end with a
        # character no stop string contains, and then nothing is compared
        self._prefixes: dict[str, list[str]] = {}
        for prefix in sorted({s[:n] for s in self._stop for n in range(1, len(s))}, key=len, reverse=True):
            self._prefixes.setdefault(prefix[-1], []).append(prefix)

    def feed(self, delta: str, armed: bool = True) -> tuple[str, str | None]:
        """(text safe to hand out, the stop string if one completed). With armed=False (before min_tokens)
        no stop fires, but tails are still held so that a stop completing later is cut correctly."""
        if not self._stop or not delta:
            return delta, None
        text = self._tail + delta
        released = len(self._tail) - self._held
        if armed:
            hit = self._first_stop(text, len(self._tail))
            if hit is not None:
                stop, at = hit
                self._tail, self._held = "", 0
                return text[released : max(released, at + len(stop) if self._include else at)], stop
        self._held = self._hold_length(text)
        out = text[released : len(text) - self._held]
        self._tail = text[max(0, len(text) - self._keep) :]
        return out, None

    def flush(self) -> str:
        """The held tail (the stream has ended without completing a stop string)."""
        out = self._tail[len(self._tail) - self._held :] if self._held else ""
        self._held = 0
        return out

    def _first_stop(self, text: str, new_from: int) -> tuple[str, int] | None:
        best = None
        for stop in self._stop:
            at = text.find(stop, max(0, new_from - len(stop) + 1))
            if at >= 0 and (best is None or (at + len(stop), at) < (best[1] + len(best[0]), best[1])):
                best = (stop, at)
        return best

    def _hold_length(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        for prefix in self._prefixes.get(text[-1], ()):
            if text.endswith(prefix):
                return len(prefix)
        return 0


class DetokenizeState:
    """Per sequence: token ids in, (text delta, stop string hit) out."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], params: SamplingParams):
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self._stops = StopChecker(params.stop, params.include_stop_str_in_output)
        self._min_tokens = params.min_tokens
        self._num_tokens = 0
        self._pieces: list[str] = []  # joined on demand: `+=` on an attribute would copy the whole text per step
        self.stop_hit: str | None = None

    @property
    def text(self) -> str:
        """Everything handed out so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def update(self, new_token_ids: list[int]) -> tuple[str, str | None]:
        """Stop strings count only once min_tokens tokens have been generated. After a hit: ("", None)."""
        if self.stop_hit is not None:
            return "", None
        self._num_tokens += len(new_token_ids)
        return self._emit(self._detokenizer.add(new_token_ids))

    def flush(self) -> str:
        """The held-back text, for a sequence that ended without a stop string; never passes a stop string."""
        if self.stop_hit is not None:
            return ""
        out, hit = self._emit(self._detokenizer.flush())
        if hit is None:
            rest = self._stops.flush()
            self._pieces.append(rest)
            out += rest
        return out

    def _emit(self, delta: str) -> tuple[str, str | None]:
        out, hit = self._stops.feed(delta, armed=self._num_tokens >= self._min_tokens)
        self._pieces.append(out)
        self.stop_hit = hit
        return out, hit
