import json
import random

import pytest

from stepserve.api.json_stream import CallJsonReader
from stepserve.api.tools import HermesToolParser, get_tool_parser, validate_tools
from stepserve.errors import InvalidRequestError


def tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


TOOLS = [tool("get_weather"), tool("search")]
W = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Beijing", "unit": "celsius"}}\n</tool_call>'
S = '<tool_call>\n{"name": "search", "arguments": {"q": "a \\"b\\" \\u00e9\\ud83d\\ude00", "n": 1.50, "k": [1, -0, 2e3]}}\n</tool_call>'
W_ARGS = '{"location": "Beijing", "unit": "celsius"}'
S_ARGS = '{"q": "a \\"b\\" é😀", "n": 1.5, "k": [1, 0, 2000.0]}'

CASES = [
    # (model output after the reasoning split, content, [(name, arguments)])
    ("The weather is sunny.", "The weather is sunny.", []),
    ("a < b, x<y, <tool and <tool_callx> stay text", "a < b, x<y, <tool and <tool_callx> stay text", []),
    (W, None, [("get_weather", W_ARGS)]),
    ("Let me check.\n\n" + W + "\n", "Let me check.", [("get_weather", W_ARGS)]),
    (W + "\n" + S, None, [("get_weather", W_ARGS), ("search", S_ARGS)]),
    ("<tool_calls>\n" + W + "\n" + S + "\n</tool_calls>", None, [("get_weather", W_ARGS), ("search", S_ARGS)]),
    ("Sure.\n<tool_calls>" + W + "</tool_calls>\nDone.", "Sure.\nDone.", [("get_weather", W_ARGS)]),
    ("first " + W + " middle " + S + " last", "first middle last", [("get_weather", W_ARGS), ("search", S_ARGS)]),
    # invalid bodies stay content, tags included
    ("<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
    ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "nope", "arguments": {}}</tool_call>', []),
    ('<tool_call>{"name": 5, "arguments": {}}</tool_call>', '<tool_call>{"name": 5, "arguments": {}}</tool_call>', []),
    ('<tool_call>{"name": "", "arguments": {}}</tool_call>', '<tool_call>{"name": "", "arguments": {}}</tool_call>', []),
    ('<tool_call>{"name": "search", "extra": 1}</tool_call>', '<tool_call>{"name": "search", "extra": 1}</tool_call>', []),
    ("<tool_calls>\n<tool_call>oops</tool_call>\n</tool_calls>", "<tool_calls>\n<tool_call>oops</tool_call>\n</tool_calls>", []),
    ("<tool_call>oops " + W, "<tool_call>oops", [("get_weather", W_ARGS)]),
    # other accepted shapes
    ('<tool_call>{"arguments": {"q": "x"}, "name": "search"}</tool_call>', None, [("search", '{"q": "x"}')]),
    ('<tool_call>{"name": "search", "parameters": {"q": "x"}}</tool_call>', None, [("search", '{"q": "x"}')]),
    ('<tool_call>{"name": "search"}</tool_call>', None, [("search", "{}")]),
    ('<tool_call>\n{"name": "search", "arguments": {"code": "line1\nline2\t<tool_call>"}}\n</tool_call>', None,
     [("search", '{"code": "line1\\nline2\\t<tool_call>"}')]),
    # unterminated at the end: a call only if its JSON is complete
    ('<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n', None, [("search", '{"q": "x"}')]),
    ('<tool_call>\n{"name": "search", "argu', '<tool_call>\n{"name": "search", "argu', []),
    ("text then <tool_ca", "text then <tool_ca", []),
    ("</tool_calls> stray close", "</tool_calls> stray close", []),
    ("", None, []),
]


def stream_all(parser: HermesToolParser, pieces: list[str]):
    s = parser.stream()
    content, deltas = [], []
    for p in pieces:
        c, d = s.feed(p)
        content.append(c)
        deltas += d
    c, d = s.flush()
    content.append(c)
    deltas += d
    calls: dict[int, list] = {}
    for d in deltas:
        if d.index not in calls:
            assert d.id and d.id.startswith("call_") and d.name and d.arguments_delta == ""
            calls[d.index] = [d.name, ""]
        else:
            assert d.id is None and d.name is None and d.arguments_delta
            calls[d.index][1] += d.arguments_delta
    assert sorted(calls) == list(range(len(calls)))
    return "".join(content), [tuple(calls[i]) for i in range(len(calls))]


@pytest.mark.parametrize("text,content,calls", CASES)
def test_parse(text, content, calls):
    got_content, got_calls = HermesToolParser(TOOLS).parse(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    for c in got_calls:
        assert c.id.startswith("call_") and len(c.id) > 10
        assert c.to_openai()["function"] == {"name": c.name, "arguments": c.arguments}


@pytest.mark.parametrize("text,content,calls", CASES)
def test_stream_equals_parse_at_every_split(text, content, calls):
    parser = HermesToolParser(TOOLS)
    want = (content or "", calls)
    for i in range(len(text) + 1):
        assert stream_all(parser, [text[:i], text[i:]]) == want, i
    assert stream_all(parser, list(text)) == want
    rng = random.Random(1)
    for _ in range(30):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 10))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert stream_all(parser, pieces) == want, pieces


BROKEN_AFTER_NAME = [
    'x <tool_call>{"name": "search", "arguments": {"a": 1,, }}</tool_call>',
    '<tool_call>{"name": "search", "arguments": {"a": NaN}}</tool_call>',
    '<tool_call>{"name": "search", "arguments": {"a": 1, "a": 2}}</tool_call>',
    '<tool_call>{"name": "search", "arguments": {"a": "cut off by max_tokens',
]


@pytest.mark.parametrize("text", BROKEN_AFTER_NAME)
def test_block_broken_after_the_name_was_streamed(text):
    """The documented divergence: parse() keeps the text; a stream that already sent the name cannot."""
    parser = HermesToolParser(TOOLS)
    assert parser.parse(text) == (text, [])
    sent_at = text.index('"arguments": {') + len('"arguments": {')
    for i in range(sent_at if "</tool_call>" in text else 0):  # the whole block arrived before anything was sent
        assert stream_all(parser, [text[:i], text[i:]]) == (text, [])
    content, calls = stream_all(parser, list(text))
    assert content == text[:text.index("<tool_call>")].rstrip()
    assert len(calls) == 1 and calls[0][0] == "search" and calls[0][1].startswith("{")


def test_after_reasoning_split():
    from stepserve.api.reasoning import ReasoningParser

    out = "The user wants weather.\n</think>\n\n<tool_calls>\n" + W + "\n</tool_calls>"
    reasoning, content = ReasoningParser().parse(out)
    assert reasoning == "The user wants weather.\n"
    assert HermesToolParser(TOOLS).parse(content)[0] is None


def test_arguments_stream_incrementally_and_never_change():
    s = HermesToolParser(TOOLS).stream()
    seen = []
    for ch in W:
        seen += s.feed(ch)[1]
    assert seen[0].name == "get_weather"
    # many fragments, sent before the block closed
    assert len(seen) > 10
    assert "".join(d.arguments_delta for d in seen) == W_ARGS


def test_number_is_sent_only_when_complete():
    s = HermesToolParser(TOOLS).stream()
    _, d = s.feed('<tool_call>{"name": "search", "arguments": {"n": 1.5')
    assert "".join(x.arguments_delta for x in d) == '{"n": '
    _, d = s.feed("0e1}}")
    assert "".join(x.arguments_delta for x in d) == "15.0}"


def random_value(rng: random.Random, depth: int = 0):
    kinds = ["str", "int", "float", "bool", "null"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        return "".join(rng.choice('ab "\\/\n\t\x01é😀<>') for _ in range(rng.randint(0, 6)))
    if kind == "int":
        return rng.randint(-10**6, 10**6)
    if kind == "float":
        return rng.choice([0.5, -1e-7, 3.14159, 1e22, -0.0])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}{rng.choice('xé')}": random_value(rng, depth + 1) for i in range(rng.randint(0, 3))}


def test_reader_matches_json_dumps_on_random_values():
    rng = random.Random(2)
    for _ in range(300):
        args = {"a": random_value(rng)}
        style = rng.choice([{}, {"indent": 2}, {"separators": (",", ":")}, {"ensure_ascii": False}])
        text = json.dumps({"name": "f", "arguments": args}, **style)
        r = CallJsonReader()
        for ch in text:
            r.feed(ch)
        assert r.done and r.name == "f"
        assert "".join(r.args) == json.dumps(args, ensure_ascii=False), text


def test_validate_tools_names_the_field():
    cases = [
        ([{"type": "retrieval", "function": {"name": "a"}}], "tools[0].type"),
        ([tool("ok"), {"type": "function"}], "tools[1].function"),
        ([{"type": "function", "function": {"name": "bad name"}}], "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "x" * 65}}], "tools[0].function.name"),
        ([tool("a"), tool("a")], "tools[1].function.name"),
        ([{"type": "function", "function": {"name": "a", "parameters": {"type": "string"}}}],
         "tools[0].function.parameters"),
        ([{"type": "function", "function": {"name": "a", "parameters": []}}], "tools[0].function.parameters"),
        ("nope", "tools"),
    ]
    for tools, param in cases:
        with pytest.raises(InvalidRequestError) as e:
            validate_tools(tools)
        assert e.value.param == param
    assert validate_tools(TOOLS) is TOOLS
    with pytest.raises(InvalidRequestError):
        HermesToolParser([{"type": "function", "function": {"name": "a b"}}])


def test_parser_names():
    assert isinstance(get_tool_parser("hermes", TOOLS), HermesToolParser)
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("nope", TOOLS)


def test_without_tool_list_any_name_is_a_call():
    content, calls = HermesToolParser(None).parse('<tool_call>{"name": "anything", "arguments": {}}</tool_call>')
    assert content is None and calls[0].name == "anything"
