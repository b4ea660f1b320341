"""Request-body validation: every rejection is a 400 naming its param; good bodies parse fully."""

from __future__ import annotations

import json

import pytest

from sllmd.errors import InvalidRequest
from sllmd.http.schemas import parse_chat_request, parse_completion_request, parse_json_object
from sllmd.serving.request import ChatMessage, GenerationRequest

CMPL = {"model": "m", "prompt": "hi"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _with(base: dict, **changes: object) -> dict:
    body = dict(base)
    for key, value in changes.items():
        if value is _DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return body


_DROP = object()

# Errors both endpoints share: (changes, param, fragment of the message).
COMMON_ERRORS = [
    ({"model": _DROP}, "model", "Missing required parameter"),
    ({"model": None}, "model", "Missing required parameter"),
    ({"model": ""}, "model", "non-empty"),
    ({"model": 7}, "model", "expected a string"),
    ({"model": "\ud800"}, "model", "surrogate"),
    ({"temperature": "1"}, "temperature", "expected a number"),
    ({"temperature": True}, "temperature", "got a boolean"),
    ({"temperature": -0.1}, "temperature", "[0, 2]"),
    ({"temperature": 2.5}, "temperature", "[0, 2]"),
    ({"temperature": float("nan")}, "temperature", "[0, 2]"),
    ({"temperature": float("inf")}, "temperature", "[0, 2]"),
    ({"temperature": 10**400}, "temperature", "[0, 2]"),
    ({"top_p": 0}, "top_p", "(0, 1]"),
    ({"top_p": 1.01}, "top_p", "(0, 1]"),
    ({"top_p": [0.5]}, "top_p", "got an array"),
    ({"seed": 1.5}, "seed", "expected an integer"),
    ({"seed": False}, "seed", "got a boolean"),
    ({"seed": 2**63}, "seed", "expected a value in"),
    ({"seed": "1"}, "seed", "expected an integer"),
    ({"stop": 5}, "stop", "a string or an array"),
    ({"stop": ""}, "stop", "non-empty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": ["a"] * 1_000_000}, "stop", "at most 4"),
    ({"stop": ["a", ""]}, "stop[1]", "non-empty"),
    ({"stop": ["a", None]}, "stop[1]", "expected a string"),
    ({"stop": {"a": 1}}, "stop", "got an object"),
    ({"stream": "true"}, "stream", "expected a boolean"),
    ({"stream": 1}, "stream", "expected a boolean"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when 'stream'"),
    ({"stream": True, "stream_options": []}, "stream_options", "expected an object"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage", "boolean"),
    ({"n": 2}, "n", "Only n=1 is supported"),
    ({"n": 0}, "n", "Only n=1 is supported"),
    ({"n": True}, "n", "got a boolean"),
    ({"n": 1.0}, "n", "expected an integer"),
    ({"best_of": 3}, "best_of", "Only best_of=1 is supported"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"frequency_penalty": -1}, "frequency_penalty", "not supported"),
    ({"frequency_penalty": "0"}, "frequency_penalty", "expected a number"),
    ({"presence_penalty": False}, "presence_penalty", "got a boolean"),
    ({"logprobs": True}, "logprobs", "not supported"),
    ({"logprobs": 0}, "logprobs", "not supported"),  # completions: 0 = sampled token's logprob
    ({"logprobs": 5}, "logprobs", "not supported"),
    ({"top_logprobs": 3}, "top_logprobs", "not supported"),
    ({"echo": True}, "echo", "not supported"),
    ({"suffix": "x"}, "suffix", "not supported"),
    ({"logit_bias": {"50256": -100}}, "logit_bias", "not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"tool_choice": "required"}, "tool_choice", "not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
]

COMPLETION_ERRORS = [
    ({"prompt": _DROP}, "prompt", "Missing required parameter"),
    ({"prompt": None}, "prompt", "Missing required parameter"),
    ({"prompt": 5}, "prompt", "expected a string"),
    ({"prompt": True}, "prompt", "got a boolean"),
    ({"prompt": {"text": "hi"}}, "prompt", "got an object"),
    ({"prompt": []}, "prompt", "got an array"),
    ({"prompt": ["a", "b"]}, "prompt", "Batched prompts"),
    ({"prompt": [[1], [2]]}, "prompt", "Batched prompts"),
    ({"prompt": [[]]}, "prompt[0]", "must not be empty"),
    ({"prompt": [1, -2]}, "prompt[1]", "non-negative integer"),
    ({"prompt": [1, True]}, "prompt[1]", "non-negative integer"),
    ({"prompt": [1, 2.0]}, "prompt[1]", "non-negative integer"),
    ({"prompt": [1, "2"]}, "prompt[1]", "non-negative integer"),
    ({"prompt": [1, 2**31]}, "prompt[1]", "non-negative integer"),
    ({"prompt": [1, 10**1000]}, "prompt[1]", "<huge integer>"),
    ({"prompt": [[1, [2]]]}, "prompt[0][1]", "non-negative integer"),
    ({"prompt": [1] * 100_000 + [None]}, "prompt[100000]", "non-negative integer"),
    ({"prompt": "\udcff"}, "prompt", "surrogate"),
    ({"prompt": ["\udcff"]}, "prompt[0]", "surrogate"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"max_tokens": -5}, "max_tokens", ">= 1"),
    ({"max_tokens": True}, "max_tokens", "got a boolean"),
    ({"max_tokens": 16.0}, "max_tokens", "got a decimal number"),
    ({"max_tokens": "16"}, "max_tokens", "expected an integer"),
]

CHAT_ERRORS = [
    ({"messages": _DROP}, "messages", "Missing required parameter"),
    ({"messages": "hi"}, "messages", "expected an array"),
    ({"messages": []}, "messages", "at least one message"),
    ({"messages": [None]}, "messages[0]", "expected an object"),
    ({"messages": [["user", "hi"]]}, "messages[0]", "expected an object"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role", "Missing required parameter"),
    ({"messages": [{"role": 1, "content": "hi"}]}, "messages[0].role", "expected a string"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "expected one of"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role", "tool"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role", "not supported"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "Missing required parameter"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "Missing required"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "got an integer"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content", "at least one content part"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]", "expected an object"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0].type",
        "only 'text'",
    ),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0].type", "null"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text", "null"),
    (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": {"nested": ["junk"]}}]}]},
        "messages[0].content[0].text",
        "got an object",
    ),
    (
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "user", "content": "\ud83d"}]},
        "messages[2].content",
        "surrogate",
    ),
    (
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
        "messages[0].tool_calls",
        "not supported",
    ),
    ({"messages": [{"role": "user", "content": "hi"}] * 50_000 + [7]}, "messages[50000]", "an object"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"max_completion_tokens": False}, "max_completion_tokens", "got a boolean"),
    ({"max_completion_tokens": 0, "max_tokens": 5}, "max_completion_tokens", ">= 1"),
]


def _expect_error(parse, body: object, param: str | None, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(body)
    err = info.value
    assert err.status == 400 and err.error_type == "invalid_request_error"
    assert err.param == param
    assert fragment in err.message, err.message
    assert len(err.message) < 300  # hostile values are never echoed back in full


@pytest.mark.parametrize(("changes", "param", "fragment"), COMMON_ERRORS + COMPLETION_ERRORS)
def test_completion_errors(changes: dict, param: str, fragment: str) -> None:
    _expect_error(parse_completion_request, _with(CMPL, **changes), param, fragment)


@pytest.mark.parametrize(("changes", "param", "fragment"), COMMON_ERRORS + CHAT_ERRORS)
def test_chat_errors(changes: dict, param: str, fragment: str) -> None:
    _expect_error(parse_chat_request, _with(CHAT, **changes), param, fragment)


@pytest.mark.parametrize("body", [None, [], ["model"], "model", 3, 1.5, True])
@pytest.mark.parametrize("parse", [parse_completion_request, parse_chat_request])
def test_non_object_body(parse, body: object) -> None:
    _expect_error(parse, body, None, "must be a JSON object")


def test_completion_defaults() -> None:
    assert parse_completion_request({"model": "m", "prompt": "hi", "user": "u", "x-extra": [1]}) == (
        GenerationRequest(model="m", prompt="hi", messages=None, max_tokens=16, temperature=1.0, top_p=1.0,
                          seed=None, stop=(), stream=False, include_usage=False)
    )


def test_chat_defaults() -> None:
    req = parse_chat_request(CHAT)
    assert req.messages == (ChatMessage("user", "hi"),) and req.prompt is None
    assert (req.max_tokens, req.temperature, req.top_p, req.stop, req.stream) == (None, 1.0, 1.0, (), False)


NULLS = {key: None for key in ("max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                               "stream_options", "n", "best_of", "presence_penalty", "frequency_penalty",
                               "logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools",
                               "tool_choice", "response_format")}


@pytest.mark.parametrize(("parse", "base"), [(parse_completion_request, CMPL), (parse_chat_request, CHAT)])
def test_null_means_absent_and_defaults_are_accepted(parse, base: dict) -> None:
    assert parse({**base, **NULLS}) == parse(base)
    defaults = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False,
                "top_logprobs": 0, "echo": False, "suffix": "", "logit_bias": {}, "tools": [],
                "tool_choice": "none", "response_format": {"type": "text"}}
    assert parse({**base, **defaults}) == parse(base)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("", ""),
        ("héllo 😀", "héllo 😀"),
        (["one"], "one"),
        ([0, 5, 7], [0, 5, 7]),
        ([[3, 4]], [3, 4]),
        ([2**31 - 1], [2**31 - 1]),
    ],
)
def test_completion_prompt_forms(prompt: object, expected: object) -> None:
    assert parse_completion_request({"model": "m", "prompt": prompt}).prompt == expected


def test_completion_full() -> None:
    req = parse_completion_request({
        "model": "demo", "prompt": [1, 2], "max_tokens": 100, "temperature": 0, "top_p": 0.5, "seed": -3,
        "stop": "\n", "stream": True, "stream_options": {"include_usage": True}, "n": 1,
    })
    assert req == GenerationRequest(model="demo", prompt=[1, 2], messages=None, max_tokens=100,
                                     temperature=0.0, top_p=0.5, seed=-3, stop=("\n",), stream=True,
                                     include_usage=True)
    assert isinstance(req.temperature, float)


def test_stream_options_without_usage() -> None:
    req = parse_completion_request({**CMPL, "stream": True, "stream_options": {}})
    assert req.stream and not req.include_usage


def test_chat_full() -> None:
    req = parse_chat_request({
        "model": "demo",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "user", "content": "Hi 中文", "name": "ada"},
            {"role": "assistant", "content": None},
            {"role": "assistant", "content": "ok", "tool_calls": []},
        ],
        "max_completion_tokens": 7, "max_tokens": 99, "stop": ["x", "yz"], "temperature": 2, "top_p": 1,
    })
    assert req.messages == (
        ChatMessage("system", "Be brief."),
        ChatMessage("system", "a\nb"),
        ChatMessage("user", "Hi 中文"),
        ChatMessage("assistant", ""),
        ChatMessage("assistant", "ok"),
    )
    assert (req.max_tokens, req.stop, req.temperature) == (7, ("x", "yz"), 2.0)
    assert parse_chat_request({**CHAT, "max_tokens": 9}).max_tokens == 9


def test_huge_valid_inputs_parse() -> None:
    ids = list(range(200_000))
    assert parse_completion_request({"model": "m", "prompt": ids}).prompt == ids
    req = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "x" * 1_000_000}]})
    assert len(req.messages[0].content) == 1_000_000


# --- parse_json_object ----------------------------------------------------------------------


def test_parse_json_object_ok() -> None:
    body = {"model": "m", "prompt": "héllo 😀", "n": 1}
    assert parse_json_object(json.dumps(body).encode()) == body
    assert parse_json_object(json.dumps(body, ensure_ascii=False).encode()) == body
    assert parse_json_object(bytearray(b' {"a": [1, {"b": null}]} ')) == {"a": [1, {"b": None}]}


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "Expecting value"),
        (b"{", "Invalid JSON body"),
        (b"{'a': 1}", "Invalid JSON body"),
        (b'{"a": 1} x', "Extra data"),
        (b"[1, 2]", "expected an object, but got an array"),
        (b'"text"', "expected an object, but got a string"),
        (b"null", "expected an object, but got null"),
        (b"42", "expected an object, but got an integer"),
        (b'{"model": "\xff\xfe"}', "not valid UTF-8"),
        (b"\xc3", "not valid UTF-8"),
        ('{"t": "é"}'.encode("latin-1"), "not valid UTF-8"),
        (b'{"temperature": NaN}', "NaN is not valid JSON"),
        (b'{"temperature": -Infinity}', "-Infinity is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
        (b'{"n": 1' + b"0" * 5000 + b"}", "Invalid JSON body"),
    ],
)
def test_parse_json_object_errors(raw: bytes, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_json_object(raw)
    assert info.value.status == 400 and info.value.param is None
    assert info.value.message.startswith("Invalid JSON body") and fragment in info.value.message
    assert len(info.value.message) < 300


def test_json_then_parse_surrogate_escape() -> None:
    body = parse_json_object(b'{"model": "m", "prompt": "\\ud800x"}')  # valid JSON, unencodable text
    _expect_error(parse_completion_request, body, "prompt", "surrogate")
