import random

import pytest

from stepserve.api.reasoning import ReasoningParser, get_reasoning_parser, thinking_disabled

CASES = [
    # (output, forced?, expected reasoning, expected content)
    ("I think.\n</think>\n\nThe answer is 36.", True, "I think.\n", "The answer is 36."),
    ("<think>I think.</think>36", True, "I think.", "36"),
    ("still thinking, no end tag", True, "still thinking, no end tag", None),
    ("a < b and </thin is not the tag</think>\n", True, "a < b and </thin is not the tag", None),
    ("</think>only content\n\nwith newlines kept inside", True, None, "only content\n\nwith newlines kept inside"),
    ("plan <tool_calls>\n</think>\n\n<tool_call>\n{}\n</tool_call>", True, "plan <tool_calls>\n",
     "<tool_call>\n{}\n</tool_call>"),
    ("<thinker>", True, "<thinker>", None),
    ("<th", True, "<th", None),
    ("", True, None, None),
    ("plain answer, not forced", False, None, "plain answer, not forced"),
    ("<think>r</think>\nc", False, "r", "c"),
    ("x</think>y</think>z", True, "x", "y</think>z"),
]


def stream_all(parser: ReasoningParser, pieces: list[str]) -> tuple[str, str]:
    s = parser.stream()
    rs, cs = [], []
    for p in pieces:
        r, c = s.feed(p)
        rs.append(r)
        cs.append(c)
    r, c = s.flush()
    return "".join(rs) + r, "".join(cs) + c


@pytest.mark.parametrize("text,forced,reasoning,content", CASES)
def test_parse(text, forced, reasoning, content):
    assert ReasoningParser("deepseek-r1", force_reasoning=forced).parse(text) == (reasoning, content)


@pytest.mark.parametrize("text,forced,reasoning,content", CASES)
def test_stream_equals_parse_at_every_split(text, forced, reasoning, content):
    parser = ReasoningParser("deepseek-r1", force_reasoning=forced)
    want = (reasoning or "", content or "")
    for i in range(len(text) + 1):
        assert stream_all(parser, [text[:i], text[i:]]) == want, i
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 8))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert stream_all(parser, pieces) == want, pieces
    assert stream_all(parser, list(text)) == want


def test_stream_holds_only_a_possible_end_tag():
    s = ReasoningParser().stream()
    assert s.feed("abc </th") == ("abc ", "")
    assert s.feed("ought") == ("</thought", "")
    assert s.feed("</think>\n") == ("", "")
    assert s.feed("\nHi") == ("", "Hi")
    assert s.flush() == ("", "")


def test_names():
    assert get_reasoning_parser("deepseek-r1").force_reasoning
    assert not get_reasoning_parser("qwen3").force_reasoning
    with pytest.raises(ValueError, match="deepseek-r1"):
        get_reasoning_parser("nope")


def test_thinking_disabled():
    assert thinking_disabled({"enable_thinking": False})
    assert not thinking_disabled({"enable_thinking": True})
    assert not thinking_disabled(None)
