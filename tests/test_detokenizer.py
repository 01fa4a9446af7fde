import random

import pytest

from stepserve.engine.detokenizer import DetokenizeState, IncrementalDetokenizer, StopChecker
from stepserve.engine.sampling_params import SamplingParams

TEXTS = [
    "Hello world, naïve café — résumé, Ünïcödé, ½ € ß.",
    "你好世界，这是一个测试。日本語のテキストも。한국어 문장도 있습니다.",
    "emoji 😀🎉👩‍👩‍👧 🇫🇷 and  double  spaces\n\tnewlines\n\n  done",
    "mixed: déjà vu 😀 你好 x=1; y = 'quoted' <think>reason</think> end",
]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    from stepserve.testing import tiny_checkpoint

    return AutoTokenizer.from_pretrained(str(tiny_checkpoint()))


@pytest.fixture(scope="module")
def merged_bytes_tokenizer():
    """A byte-level BPE trained on multi-byte text, so tokens also merge bytes across character boundaries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|im_end|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(params=["tiny", "merged"])
def tokenizer(request, tiny_tokenizer, merged_bytes_tokenizer):
    return tiny_tokenizer if request.param == "tiny" else merged_bytes_tokenizer


def stream(detok: IncrementalDetokenizer, ids: list[int], chunks: list[int]) -> list[str]:
    deltas, at = [], 0
    for size in chunks:
        deltas.append(detok.add(ids[at : at + size]))
        at += size
    deltas.append(detok.add(ids[at:]))
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode_without_replacement_chars(tokenizer, text):
    ids = tokenizer.encode(text)
    prompt = tokenizer.encode("User: 你好 😀 Assistant:")
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    one_by_one = stream(IncrementalDetokenizer(tokenizer, prompt), ids, [1] * len(ids))
    assert "".join(one_by_one) == expected
    assert not any("\ufffd" in d for d in one_by_one)  # incomplete characters are held, never guessed
    assert one_by_one[-1] == ""  # valid text leaves nothing for flush
    rng = random.Random(len(text))
    chunks = [rng.randint(1, 4) for _ in range(len(ids))]
    assert "".join(stream(IncrementalDetokenizer(tokenizer, []), ids, chunks)) == expected


def test_random_id_sequences_match_decode_even_with_invalid_bytes(tokenizer):
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(40):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 120))]
        for skip in (True, False):
            detok = IncrementalDetokenizer(tokenizer, [rng.randrange(vocab) for _ in range(6)], skip)
            out = "".join(stream(detok, ids, [1] * len(ids)))
            assert out == tokenizer.decode(ids, skip_special_tokens=skip)


def test_unknown_ids_decode_to_nothing(tokenizer):
    ids = tokenizer.encode("héllo 你好 😀")
    noisy = [len(tokenizer) + 5, -1] + ids[:3] + [len(tokenizer), 10**9] + ids[3:] + [len(tokenizer) + 63]
    detok = IncrementalDetokenizer(tokenizer, [len(tokenizer) + 1])
    assert detok.add([len(tokenizer) + 7]) == ""
    assert "".join(stream(detok, noisy, [1] * len(noisy))) == tokenizer.decode(ids)


def test_special_tokens_follow_skip_special_tokens(tiny_tokenizer):
    ids = tiny_tokenizer.encode("a<|im_end|>b<think>c</think>")
    for skip in (True, False):
        out = "".join(stream(IncrementalDetokenizer(tiny_tokenizer, [], skip), ids, [1] * len(ids)))
        assert out == tiny_tokenizer.decode(ids, skip_special_tokens=skip)
    assert "<think>" in tiny_tokenizer.decode(ids, skip_special_tokens=True)  # markup tokens are not special


class CountingTokenizer:
    """Records the longest id list each decode call sees."""

    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def __len__(self):
        return len(self.inner)

    def decode(self, ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decode_sees_only_a_short_window(tiny_tokenizer):
    counting = CountingTokenizer(tiny_tokenizer)
    ids = tiny_tokenizer.encode(" ".join(TEXTS) * 5)
    assert len(ids) > 1000
    detok = IncrementalDetokenizer(counting, ids[:500])
    assert "".join(stream(detok, ids, [1] * len(ids))) == tiny_tokenizer.decode(ids)
    assert counting.longest <= 24


def reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Cut at the stop string complete earliest (longest on a tie), by brute force over prefixes."""
    for end in range(len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return (text[:end] if include else text[: end - len(stop)]), stop
    return text, None


def run_stop_checker(checker: StopChecker, pieces: list[str]) -> tuple[str, str | None]:
    out = []
    for piece in pieces:
        delta, hit = checker.feed(piece)
        out.append(delta)
        if hit is not None:
            return "".join(out), hit
    return "".join(out) + checker.flush(), None


CASES = [
    ("Hello world, stop here please", ["stop"]),
    ("stop at the very beginning", ["stop"]),
    ("aab", ["ab"]),
    ("aaab and more", ["aab"]),
    ("xyz abcd abc", ["abc", "bcd"]),
    ("one two three", ["three", "two", "one two"]),
    ("no match here st", ["stop", "xyz"]),
    ("tail that almost sto", ["stop"]),
    ("emoji 😀 stop 你好 END", ["你好", "😀 s"]),
    ("abcabcabd", ["abcabd"]),
    ("xabcdx", ["abcd", "bc"]),
]


@pytest.mark.parametrize("text, stops", CASES)
@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_at_every_split(text, stops, include):
    expected = reference_stop(text, stops, include)
    n = len(text)
    splits = [[text]] + [[text[:i], text[i:]] for i in range(n + 1)]
    splits += [[text[:i], text[i:j], text[j:]] for i in range(n + 1) for j in range(i, n + 1)]
    splits.append(list(text))
    for pieces in splits:
        assert run_stop_checker(StopChecker(stops, include), pieces) == expected, pieces


def test_held_tail_is_released_once_it_cannot_start_a_stop():
    checker = StopChecker(["stop"], False)
    assert checker.feed("Hello st") == ("Hello ", None)
    assert checker.feed("a") == ("sta", None)
    assert checker.feed("rt s") == ("rt ", None)
    assert checker.flush() == "s"


def test_stop_spanning_tokens_through_detokenize_state(tiny_tokenizer):
    text = "The answer is 42. 你好😀 STOP-HERE and then more text"
    ids = tiny_tokenizer.encode(text)
    full = tiny_tokenizer.decode(ids)
    for stop in ["STOP-HERE", "好😀", "answer", "The", "42. 你"]:
        for include in (False, True):
            state = DetokenizeState(tiny_tokenizer, [], SamplingParams(stop=[stop], include_stop_str_in_output=include))
            deltas, hit = [], None
            for token in ids:
                delta, hit = state.update([token])
                deltas.append(delta)
                if hit is not None:
                    break
            cut = full.index(stop) + (len(stop) if include else 0)
            assert (hit, "".join(deltas), state.text) == (stop, full[:cut], full[:cut])
            assert state.update([ids[-1]]) == ("", None) and state.flush() == ""


def test_flush_returns_held_text_and_min_tokens_delays_stops(tiny_tokenizer):
    ids = tiny_tokenizer.encode("ab stop cd st")
    state = DetokenizeState(tiny_tokenizer, [], SamplingParams(stop=["stop", "c"], min_tokens=len(ids)))
    out = "".join(state.update([t])[0] for t in ids[:-1])
    delta, hit = state.update(ids[-1:])
    assert hit is None  # "stop" and "c" completed before min_tokens tokens were generated
    assert out + delta + state.flush() == "ab stop cd st" == state.text
    state = DetokenizeState(tiny_tokenizer, [], SamplingParams(stop=["xyz"], max_tokens=20))
    emitted = "".join(state.update([t])[0] for t in tiny_tokenizer.encode("sum xy"))
    assert emitted == "sum " and state.flush() == "xy"


def test_window_stays_short_on_a_stream_of_undecodable_bytes(tiny_tokenizer):
    lead_byte = tiny_tokenizer.convert_tokens_to_ids("ð")  # byte 0xF0 alone: a 4-byte lead that never completes
    assert tiny_tokenizer.decode([lead_byte]) == "\ufffd"
    counting = CountingTokenizer(tiny_tokenizer)
    ids = [lead_byte] * 300
    out = "".join(stream(IncrementalDetokenizer(counting, []), ids, [1] * len(ids)))
    assert out == tiny_tokenizer.decode(ids) == "\ufffd" * 300
    assert counting.longest <= 70


def byte_token_ids(tokenizer) -> list[int]:
    """The ids of the 256 single-byte tokens of a byte-level BPE."""
    from tokenizers import pre_tokenizers

    return [tokenizer.convert_tokens_to_ids(c) for c in sorted(pre_tokenizers.ByteLevel.alphabet())]


def test_byte_streams_match_decode_at_every_split(tokenizer):
    """Streams of single bytes (lead, continuation and invalid ones) with some whole tokens: the released text
    of a byte-level decoder is never changed by what follows it, however the ids arrive."""
    rng = random.Random(1)
    singles = byte_token_ids(tokenizer)
    whole = tokenizer.encode("a 你好 😀 é")
    for _ in range(150):
        ids = [rng.choice(singles) if rng.random() < 0.8 else rng.choice(whole) for _ in range(rng.randint(1, 90))]
        chunks = [rng.randint(1, 3) for _ in range(len(ids))]
        detok = IncrementalDetokenizer(tokenizer, [rng.choice(singles) for _ in range(3)])
        assert "".join(stream(detok, ids, chunks)) == tokenizer.decode(ids)


def test_undecodable_bytes_go_out_a_few_tokens_later(tiny_tokenizer):
    """A model emitting bytes that never form a character (dummy weights do): their U+FFFD go out once an
    incomplete character's 3 bytes could no longer be among them (at most 4 tokens later), not after 64."""
    lead_byte = tiny_tokenizer.convert_tokens_to_ids("ð")  # 0xF0: a 4-byte lead, never completed here
    detok = IncrementalDetokenizer(tiny_tokenizer, tiny_tokenizer.encode("Hi"))
    deltas = [detok.add([lead_byte]) for _ in range(200)]
    assert deltas[:4] == [""] * 4 and "".join("x" if d else "-" for d in deltas).count("-----") == 0
    assert "".join(deltas) + detok.flush() == "\ufffd" * 200
    # a real character split over byte tokens still waits for its last byte, and never comes out as U+FFFD
    pieces = [tiny_tokenizer.convert_tokens_to_ids(c) for c in tiny_tokenizer.convert_ids_to_tokens(
        tiny_tokenizer.encode("😀"))]
    ids = [lead_byte] * 6 + [t for t in byte_token_ids(tiny_tokenizer) if tiny_tokenizer.decode([t]) == "a"] + pieces
    detok = IncrementalDetokenizer(tiny_tokenizer, [])
    out = [detok.add([t]) for t in ids]
    assert "".join(out) + detok.flush() == tiny_tokenizer.decode(ids) == "\ufffd" * 6 + "a😀"
    assert "😀" in out[-1]
