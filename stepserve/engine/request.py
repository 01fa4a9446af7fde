"""Sequence state: one choice of one request, from the waiting queue to its last token."""

from __future__ import annotations

import enum
import hashlib
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stepserve.engine.outputs import Logprob
from stepserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from stepserve.engine.detokenizer import DetokenizeState
    from stepserve.multimodal.processor import ImageInput


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class ImageSpan:
    """Where one image's feature rows go: the prompt positions of its <im_patch> tokens."""

    image: ImageInput
    positions: list[int]  # ascending prompt positions, one per feature row

    @property
    def start(self) -> int:
        return self.positions[0]

    @property
    def end(self) -> int:  # one past the last feature position
        return self.positions[-1] + 1


def image_spans(prompt_ids: list[int], images: list[ImageInput], image_token_id: int) -> list[ImageSpan]:
    """Assign the prompt's <im_patch> positions to images in order (each image owns num_feature_rows of them)."""
    positions = [i for i, t in enumerate(prompt_ids) if t == image_token_id]
    need = sum(im.num_feature_rows for im in images)
    if len(positions) != need:
        from stepserve.errors import InvalidRequestError

        raise InvalidRequestError(f"prompt has {len(positions)} image tokens but its images need {need}",
                                  param="messages")
    spans, at = [], 0
    for im in images:
        spans.append(ImageSpan(im, positions[at : at + im.num_feature_rows]))
        at += im.num_feature_rows
    return spans


def cache_keys(prompt_ids: list[int], spans: list[ImageSpan]) -> list[int]:
    """Token ids for prefix-cache hashing, with each image row keyed by the image's content hash.

    Two prompts share cached KV only if their text tokens and their images' pixels are the same.
    """
    keys = list(prompt_ids)
    for span in spans:
        digest = int.from_bytes(hashlib.blake2b(span.image.hash.encode(), digest_size=7).digest(), "little")
        for row, pos in enumerate(span.positions):
            keys[pos] = -1 - ((digest + row) & 0x7FFF_FFFF_FFFF_FFFF)
    return keys


_seq_counter = itertools.count()
PENDING = -1  # token_at() of a position whose id is still on the device


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # choice index within the request (n > 1)
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    spans: list[ImageSpan] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)  # prefix-cache keys of the prompt
    # time.monotonic() stamps: handed to the engine, first admitted to a step, first token taken in by the host
    arrival: float = 0.0
    scheduled_at: float | None = None
    first_token_at: float | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] | None = None
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_pending: int = 0  # sampled tokens still on the device (the host learns them one step later)
    pending_row: int = -1  # row of the newest pending token in the model runner's last sampled ids
    max_output: int = 1 << 30  # output tokens allowed: max_tokens, capped by the context length
    num_cached: int = 0  # prompt tokens served from the prefix cache at the last admission
    pages: list[int] = field(default_factory=list)
    num_hashed_pages: int = 0  # leading pages registered in the prefix cache
    page_hashes: list[int] = field(default_factory=list)
    image_embeds: dict[int, torch.Tensor] = field(default_factory=dict)  # span index -> rows, while prefilling
    detok: DetokenizeState | None = None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = list(self.prompt_ids)

    @property
    def num_known(self) -> int:
        """Tokens whose ids the host knows."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence, including sampled ones still on the device."""
        return self.num_known + self.num_pending

    def token_at(self, i: int) -> int:
        """Token id at position i, or PENDING for a token sampled on the device and not yet seen here."""
        n = len(self.prompt_ids)
        if i < n:
            return self.prompt_ids[i]
        return self.output_ids[i - n] if i - n < len(self.output_ids) else PENDING

    def key_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.keys[i] if i < n else self.output_ids[i - n]

    @property
    def is_prefilling(self) -> bool:
        """True until every token but the last sampled one has K/V in the cache."""
        return self.num_computed < self.num_tokens - 1

    @property
    def needs_history(self) -> bool:
        """Penalties read every earlier token, so this sequence's steps cannot run ahead of the host."""
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
