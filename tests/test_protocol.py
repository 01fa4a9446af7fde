import pytest

from stepserve.api import protocol as P
from stepserve.errors import InvalidRequestError

MSG = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "search"}}]


def chat(**kw) -> P.ChatCompletionRequest:
    return P.parse_request(P.ChatCompletionRequest, {"messages": MSG, **kw})


def test_defaults_and_unknown_fields():
    req = chat(model="stepfun-ai/Step3-VL-10B", store=True, metadata={"x": 1}, top_k=-1)
    assert req.separate_reasoning and req.skip_special_tokens and not req.stream and req.n == 1
    assert req.tool_choice == "none" and req.template_tools() is None
    assert chat(tools=TOOLS).tool_choice == "auto"


@pytest.mark.parametrize("body,param", [
    ({"stop": 5}, "stop"),
    ({"messages": "x"}, "messages"),
    ({"stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice.function"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"response_format": {"type": "json_object"}}, "response_format.type"),
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 1.5}, "max_tokens"),
])
def test_validation_errors_name_the_field(body, param):
    with pytest.raises(InvalidRequestError) as e:
        P.parse_request(P.ChatCompletionRequest, {"messages": MSG, **body})
    assert e.value.param == param and e.value.status_code == 400
    with pytest.raises(InvalidRequestError):
        P.parse_request(P.ChatCompletionRequest, [1, 2])


def test_tool_choice_named_and_required():
    named = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "search"}})
    assert [t["function"]["name"] for t in named.template_tools()] == ["search"]
    assert chat(tools=TOOLS, tool_choice="none").template_tools() is None
    assert chat(tools=TOOLS, tool_choice="required").template_tools() == TOOLS
    assert chat(response_format={"type": "text"}).response_format.type == "text"


def test_to_sampling_params():
    sp = P.to_sampling_params(chat(temperature=0, top_k=-1, min_p=0.1, repetition_penalty=1.1, seed=7, n=2,
                                   stop="END", stop_token_ids=[5], ignore_eos=True, min_tokens=2,
                                   logprobs=True, top_logprobs=3, skip_special_tokens=False, max_tokens=10),
                              context_length=100, prompt_len=20, vocab_size=1000)
    assert (sp.temperature, sp.top_k, sp.min_p, sp.repetition_penalty, sp.seed, sp.n) == (0, -1, 0.1, 1.1, 7, 2)
    assert (sp.stop, sp.stop_token_ids, sp.ignore_eos, sp.min_tokens) == (["END"], [5], True, 2)
    assert (sp.logprobs, sp.skip_special_tokens, sp.max_tokens) == (3, False, 10)
    assert P.to_sampling_params(chat(), 100, 20, 1000).max_tokens == 80  # None: the rest of the context
    assert P.to_sampling_params(chat(logprobs=True), 100, 20, 1000).logprobs == 0
    assert P.to_sampling_params(chat(max_completion_tokens=5, max_tokens=50), 100, 20, 1000).max_tokens == 5
    assert P.to_sampling_params(chat(), 100, 20, 1000).temperature == 1.0
    assert P.to_sampling_params(chat(logit_bias={"5": -100, "999": 2.5}), 100, 20, 1000).logit_bias == \
        {5: -100.0, 999: 2.5}


@pytest.mark.parametrize("kw,prompt_len,param", [
    ({"max_tokens": 81}, 20, "max_tokens"),
    ({"max_completion_tokens": 500}, 20, "max_completion_tokens"),
    ({}, 100, "messages"),
    ({"temperature": 3.0}, 20, "temperature"),
    ({"top_p": 0}, 20, "top_p"),
    ({"n": 0}, 20, "n"),
    ({"max_tokens": 0}, 20, "max_tokens"),
    ({"logprobs": True, "top_logprobs": 50}, 20, "top_logprobs"),
    ({"logit_bias": {"1000": 1.0}}, 20, "logit_bias"),  # past the vocabulary
    ({"logit_bias": {"-1": 1.0}}, 20, "logit_bias"),
    ({"logit_bias": {"abc": 1.0}}, 20, "logit_bias"),
    ({"logit_bias": {"5": 101.0}}, 20, "logit_bias"),
])
def test_sampling_errors(kw, prompt_len, param):
    with pytest.raises(InvalidRequestError) as e:
        P.to_sampling_params(chat(**kw), 100, prompt_len, 1000)
    assert e.value.param == param


def test_completion_request():
    req = P.parse_request(P.CompletionRequest, {"prompt": "hello", "logprobs": 2, "echo": True})
    assert req.prompts() == ["hello"] and req.max_tokens == 16 and req.num_logprobs == 2
    assert P.parse_request(P.CompletionRequest, {"prompt": [1, 2, 3]}).prompts() == [[1, 2, 3]]
    with pytest.raises(InvalidRequestError) as e:
        P.parse_request(P.CompletionRequest, {"prompt": ""}).prompts()
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        P.to_sampling_params(P.parse_request(P.CompletionRequest, {"prompt": "x"}), 10, 10, 1000)
    assert e.value.param == "prompt"


def test_response_shapes():
    chunk = P.ChatCompletionChunk(id="c", model="m", choices=[P.ChunkChoice(index=0, delta=P.DeltaMessage(
        tool_calls=[P.DeltaToolCall(index=0, function=P.FunctionCall(arguments='{"a"'))]))])
    d = chunk.model_dump(mode="json")
    assert d["object"] == "chat.completion.chunk" and d["choices"][0]["finish_reason"] is None
    assert d["choices"][0]["delta"] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}
    u = P.Usage.of(10, 5, cached_tokens=3)
    assert (u.total_tokens, u.prompt_tokens_details) == (15, {"cached_tokens": 3})
    assert P.field_path(("messages", 0, "content", "list[union]", 1, "type")) == "messages[0].content[1].type"
