"""Benchmark request generation: `random` and `image` (synthetic) and `sharegpt` (a local JSON file).

Lengths and image presets follow SGLang's bench_serving so the same flags produce the same workload shape.
"""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

RESOLUTION_PRESETS = {"4k": (3840, 2160), "1080p": (1920, 1080), "720p": (1280, 720), "360p": (640, 360)}


@dataclass
class BenchRequest:
    prompt: str
    prompt_len: int          # text tokens as the server should count them (chat template included for images)
    output_len: int
    image_data: list[str] = field(default_factory=list)   # data: URLs


def random_lens(full_len: int, range_ratio: float, num: int, state: np.random.RandomState) -> list[int]:
    """Lengths drawn uniformly from [max(1, full_len * range_ratio), full_len] (SGLang's rule)."""
    if full_len <= 0:
        return [0] * num
    low = max(int(full_len * range_ratio), 1)
    return [int(x) for x in state.randint(low, full_len + 1, size=num)]


def seeded_lens(input_len: int, output_len: int, range_ratio: float, num: int,
                seed: int) -> tuple[list[int], list[int]]:
    """Input then output lengths, drawn as SGLang's bench_serving draws them: numpy's legacy generator seeded
    with `seed`, input lengths first. The same flags then give the same workload: the seed's throughput command
    (seed 1, 1000 prompts) generates 510855 tokens here as in its report."""
    state = np.random.RandomState(seed)
    return random_lens(input_len, range_ratio, num, state), random_lens(output_len, range_ratio, num, state)


def parse_image_resolution(spec: str) -> tuple[int, int]:
    """A preset (4k, 1080p, 720p, 360p) or SGLang's custom 'HEIGHTxWIDTH' -> (width, height)."""
    if spec in RESOLUTION_PRESETS:
        return RESOLUTION_PRESETS[spec]
    parts = spec.strip().lower().split("x")
    if len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts):
        return int(parts[1]), int(parts[0])
    raise ValueError(f"unsupported image resolution {spec!r}: use 4k, 1080p, 720p, 360p or HEIGHTxWIDTH")


def _text_token_ids(tokenizer: Any) -> list[int]:
    # Added tokens are control tokens (<im_patch>, <|im_start|>, <think>, ...), not all of them listed as
    # special: a random prompt holding one would be refused or change meaning.
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    special |= set(getattr(tokenizer, "get_added_vocab", dict)().values())
    return sorted(i for i in set(tokenizer.get_vocab().values()) if isinstance(i, int) and i not in special)


def random_text(tokenizer: Any, num_tokens: int, rng: np.random.Generator, vocab: list[int]) -> str:
    """Decoded random non-special tokens (re-encoding may give a slightly different count).

    Ordinary tokens can spell a control token's text (e.g. "<im" + "_patch>"), which servers refuse or
    misread; such draws are redrawn."""
    controls = [t for t in getattr(tokenizer, "get_added_vocab", dict)() if len(t) > 1]
    while True:
        ids = rng.choice(len(vocab), size=num_tokens) if num_tokens else []
        text = tokenizer.decode([vocab[i] for i in ids])
        if not any(c in text for c in controls):
            return text


def chat_text_len(tokenizer: Any, text: str) -> int:
    """Tokens of a one-message chat prompt holding `text`; the raw text's count if there is no template."""
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        return len(tokenizer.encode(rendered, add_special_tokens=False))
    except (ValueError, TypeError, AttributeError):
        return len(tokenizer.encode(text))


def sample_random_requests(tokenizer: Any, num: int, input_len: int, output_len: int, range_ratio: float,
                           seed: int) -> list[BenchRequest]:
    """Prompts of random vocabulary tokens with SGLang's random length rule."""
    vocab = _text_token_ids(tokenizer)
    special = int(tokenizer.num_special_tokens_to_add())
    in_lens, out_lens = seeded_lens(input_len, output_len, range_ratio, num, seed)
    rng = np.random.default_rng(seed)
    # The server adds special tokens (BOS) itself; leave room so the prompt lands on the drawn length.
    return [BenchRequest(random_text(tokenizer, max(0, n - special), rng, vocab), n, m)
            for n, m in zip(in_lens, out_lens)]


def sample_sharegpt_requests(path: str, num: int, tokenizer: Any, seed: int, fixed_output_len: int | None = None,
                             context_len: int | None = None) -> list[BenchRequest]:
    """First human/gpt turn pairs of a local ShareGPT JSON file, shuffled with `seed`, too-short ones pruned."""
    with open(path) as f:
        data = json.load(f)
    pairs = []
    for item in data:
        turns = item.get("conversations", item.get("conversation", []))
        if len(turns) >= 2:
            pairs.append((turns[0]["value"], turns[1]["value"]))
    random.Random(seed).shuffle(pairs)
    out: list[BenchRequest] = []
    for prompt, completion in pairs:
        if len(out) == num:
            break
        prompt_len = len(tokenizer.encode(prompt))
        output_len = fixed_output_len if fixed_output_len is not None else len(tokenizer.encode(completion))
        if prompt_len < 2 or output_len < 2:
            continue
        if context_len and prompt_len + output_len > context_len:
            continue
        out.append(BenchRequest(prompt, prompt_len, output_len))
    return out


def make_image_data_url(width: int, height: int, content: str, image_format: str, rng: np.random.Generator) -> str:
    if content == "blank":
        pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    else:
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=image_format, quality=85)
    return f"data:image/{image_format};base64,{base64.b64encode(buf.getvalue()).decode()}"


def sample_image_requests(tokenizer: Any, num: int, image_count: int, input_len: int, output_len: int,
                          range_ratio: float, resolution: str, image_format: str, image_content: str,
                          seed: int) -> list[BenchRequest]:
    """`image_count` synthetic images per request plus a random text prompt (SGLang's image dataset).

    Only the text is counted here; the vision tokens come from the server's `usage.prompt_tokens` at run time.
    """
    width, height = parse_image_resolution(resolution)
    vocab = _text_token_ids(tokenizer)
    in_lens, out_lens = seeded_lens(input_len, output_len, range_ratio, num, seed)
    rng = np.random.default_rng(seed)
    requests = []
    for n, m in zip(in_lens, out_lens):
        text = random_text(tokenizer, n, rng, vocab)
        images = [make_image_data_url(width, height, image_content, image_format, rng) for _ in range(image_count)]
        requests.append(BenchRequest(text, chat_text_len(tokenizer, text), m, images))
    return requests
