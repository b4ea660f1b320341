"""Parse and validate OpenAI `/v1/completions` and `/v1/chat/completions` request bodies.

Pure functions over already-decoded JSON values. Every rejection is an `InvalidRequest` naming
the offending param (`"temperature"`, `"messages[2].content[0].type"`, ...). JSON `null` counts as
"absent" for optional fields. Unknown keys are ignored (SDKs send extras such as `user`), but known
OpenAI features this server does not implement are refused when set to a non-default value, so a
client never silently gets something other than what it asked for.
"""

from __future__ import annotations

import json
import math
from typing import Any

from sllmd.errors import InvalidRequest
from sllmd.serving.request import MAX_TOKEN_ID, ChatMessage, GenerationRequest

MAX_STOP_STRINGS = 4
COMPLETION_DEFAULT_MAX_TOKENS = 16
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_INT64 = (-(2**63), 2**63 - 1)
# Known OpenAI features we do not implement: each may only be absent/null or one of these values
# (compared type-strictly, so completions' `logprobs: 0` is not mistaken for `False`).
_UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "logprobs": (False,), "top_logprobs": (0,), "echo": (False,), "suffix": ("",), "logit_bias": ({},),
    "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},), "audio": (),
}  # fmt: skip


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be a UTF-8 JSON object (NaN/Infinity are not JSON)."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"Invalid JSON body: not valid UTF-8 (byte {e.start}).") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidRequest("Invalid JSON body: nested too deeply.") from None
    except ValueError as e:  # JSONDecodeError, over-long integer literals, NaN/Infinity
        raise InvalidRequest(f"Invalid JSON body: {e}") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"Invalid JSON body: expected an object, but got {_kind(value)}.")
    return value


def parse_completion_request(body: object) -> GenerationRequest:
    obj = _common_checks(body)
    if obj.get("prompt") is None:
        raise _missing("prompt")
    max_tokens = _opt_int(obj, "max_tokens", minimum=1)
    return _build(obj, _parse_prompt(obj["prompt"]), None,
                  COMPLETION_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens)


def parse_chat_request(body: object) -> GenerationRequest:
    obj = _common_checks(body)
    messages = _parse_messages(obj.get("messages"))
    max_completion = _opt_int(obj, "max_completion_tokens", minimum=1)
    max_tokens = _opt_int(obj, "max_tokens", minimum=1)  # deprecated alias; the newer name wins
    return _build(obj, None, messages, max_tokens if max_completion is None else max_completion)


def _common_checks(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest(f"The request body must be a JSON object, but got {_kind(body)}.")
    model = body.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str):
        raise _type_error("model", "a string", model)
    if not model:
        raise InvalidRequest("Invalid 'model': must be a non-empty string.", param="model")
    _text(model, "model")
    for key in ("n", "best_of"):
        value = body.get(key)
        if value is not None and _int_or_fail(value, key) != 1:
            raise InvalidRequest(f"Only {key}=1 is supported (got {key}={_show(value)}); "
                                 "send separate requests for more choices.", param=key)
    for key in ("presence_penalty", "frequency_penalty"):
        value = body.get(key)
        if value is not None and _number_or_fail(value, key) != 0:
            raise InvalidRequest(f"Unsupported parameter: '{key}' must be 0; penalties are not supported.",
                                 param=key)
    for key, defaults in _UNSUPPORTED.items():
        value = body.get(key)
        if value is not None and not any(type(value) is type(d) and value == d for d in defaults):
            raise InvalidRequest(f"Unsupported parameter: '{key}' is not supported by this server.", param=key)
    return body


def _build(obj: dict[str, Any], prompt: str | list[int] | None, messages: tuple[ChatMessage, ...] | None,
           max_tokens: int | None) -> GenerationRequest:
    stream = obj.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _type_error("stream", "a boolean", stream)
    seed = _opt_int(obj, "seed", minimum=_INT64[0], maximum=_INT64[1])
    return GenerationRequest(
        model=obj["model"],
        prompt=prompt,
        messages=messages,
        max_tokens=max_tokens,
        temperature=_opt_number(obj, "temperature", 1.0, low=0.0, high=2.0, low_open=False),
        top_p=_opt_number(obj, "top_p", 1.0, low=0.0, high=1.0, low_open=True),
        seed=seed,
        stop=_parse_stop(obj.get("stop")),
        stream=bool(stream),
        include_usage=_parse_stream_options(obj.get("stream_options"), bool(stream)),
    )


def _parse_stream_options(value: object, stream: bool) -> bool:
    if value is None:
        return False
    if not isinstance(value, dict):
        raise _type_error("stream_options", "an object", value)
    if not stream:
        raise InvalidRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                             param="stream_options")
    include_usage = value.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise _type_error("stream_options.include_usage", "a boolean", include_usage)
    return bool(include_usage)


def _parse_stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (_stop_string(value, "stop"),)
    if not isinstance(value, list):
        raise _type_error("stop", "a string or an array of strings", value)
    if len(value) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"Invalid 'stop': at most {MAX_STOP_STRINGS} stop sequences are allowed, "
                             f"but got {len(value)}.", param="stop")
    return tuple(_stop_string(item, f"stop[{i}]") for i, item in enumerate(value))


def _stop_string(value: object, param: str) -> str:
    if not isinstance(value, str):
        raise _type_error(param, "a string", value)
    if not value:
        raise InvalidRequest(f"Invalid '{param}': stop sequences must be non-empty.", param=param)
    return _text(value, param)


def _parse_prompt(value: object) -> str | list[int]:
    if isinstance(value, str):
        return _text(value, "prompt")
    if isinstance(value, list) and value:
        first = value[0]
        if isinstance(first, str | list) and len(value) > 1:
            raise InvalidRequest("Batched prompts are not supported; send one prompt per request.",
                                 param="prompt")
        if isinstance(first, str):
            return _text(first, "prompt[0]")
        if isinstance(first, list):
            return _token_ids(first, "prompt[0]")
        return _token_ids(value, "prompt")
    raise _type_error("prompt", "a string, an array of token ids, or an array with one of those", value)


def _token_ids(value: list[Any], param: str) -> list[int]:
    if not value:
        raise InvalidRequest(f"Invalid '{param}': the token id array must not be empty.", param=param)
    for i, tok in enumerate(value):
        if type(tok) is not int or not 0 <= tok <= MAX_TOKEN_ID:
            raise InvalidRequest(f"Invalid '{param}[{i}]': expected a non-negative integer token id, "
                                 f"but got {_show(tok)}.", param=f"{param}[{i}]")
    return list(value)


def _parse_messages(value: object) -> tuple[ChatMessage, ...]:
    if value is None:
        raise _missing("messages")
    if not isinstance(value, list):
        raise _type_error("messages", "an array", value)
    if not value:
        raise InvalidRequest("Invalid 'messages': expected at least one message.", param="messages")
    out = []
    for i, msg in enumerate(value):
        p = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _type_error(p, "an object", msg)
        role = msg.get("role")
        if role is None:
            raise InvalidRequest(f"Missing required parameter: '{p}.role'.", param=f"{p}.role")
        if not isinstance(role, str):
            raise _type_error(f"{p}.role", "a string", role)
        if role in ("tool", "function"):
            raise InvalidRequest(f"Unsupported value for '{p}.role': '{role}' messages are not supported "
                                 "(tool calling is not available).", param=f"{p}.role")
        if role not in _ROLES:
            raise InvalidRequest(f"Invalid value for '{p}.role': expected one of 'system', 'developer', "
                                 f"'user' or 'assistant', but got {_show(role)}.", param=f"{p}.role")
        for key in ("tool_calls", "function_call"):
            if msg.get(key) not in (None, []):
                raise InvalidRequest(f"Unsupported parameter: '{p}.{key}' is not supported.",
                                     param=f"{p}.{key}")
        content = msg.get("content")
        if content is None and role == "assistant":
            content = ""
        out.append(ChatMessage(_ROLES[role], _parse_content(content, f"{p}.content")))
    return tuple(out)


def _parse_content(value: object, p: str) -> str:
    if value is None:
        raise _missing(p)
    if isinstance(value, str):
        return _text(value, p)
    if not isinstance(value, list):
        raise _type_error(p, "a string or an array of content parts", value)
    if not value:
        raise InvalidRequest(f"Invalid '{p}': expected at least one content part.", param=p)
    texts = []
    for j, part in enumerate(value):
        pj = f"{p}[{j}]"
        if not isinstance(part, dict):
            raise _type_error(pj, "an object", part)
        kind = part.get("type")
        if not isinstance(kind, str):
            raise _type_error(f"{pj}.type", "a string", kind)
        if kind != "text":
            raise InvalidRequest(f"Unsupported content part type {_show(kind)} in '{pj}'; only 'text' is "
                                 "supported.", param=f"{pj}.type")
        text = part.get("text")
        if not isinstance(text, str):
            raise _type_error(f"{pj}.text", "a string", text)
        texts.append(_text(text, f"{pj}.text"))
    return "\n".join(texts)  # like vLLM: text parts become lines of one message


def _opt_int(obj: dict[str, Any], key: str, *, minimum: int, maximum: int | None = None) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    value = _int_or_fail(value, key)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise InvalidRequest(f"Invalid '{key}': expected a value {bound}, but got {_show(value)}.", param=key)
    return value


def _opt_number(obj: dict[str, Any], key: str, default: float, *, low: float, high: float,
                low_open: bool) -> float:
    value = obj.get(key)
    if value is None:
        return default
    number = _number_or_fail(value, key)
    if not (low < number if low_open else low <= number) or not number <= high:
        bound = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise InvalidRequest(f"Invalid '{key}': expected a value in {bound}, but got {_show(value)}.",
                             param=key)
    return number


def _int_or_fail(value: object, param: str) -> int:
    if type(value) is not int:  # also rejects bool, an int subclass
        raise _type_error(param, "an integer", value)
    return value


def _number_or_fail(value: object, param: str) -> float:
    """An int or float (never a bool); huge ints become +-inf so range checks reject them."""
    if type(value) not in (int, float):
        raise _type_error(param, "a number", value)
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:
        return math.inf if value > 0 else -math.inf  # type: ignore[operator]


def _text(value: str, param: str) -> str:
    """Refuse strings a tokenizer cannot encode (lone surrogates from `\\ud800` escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"Invalid '{param}': the string contains an unpaired surrogate.",
                             param=param) from None
    return value


def _missing(param: str) -> InvalidRequest:
    return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)


def _type_error(param: str, expected: str, value: object) -> InvalidRequest:
    return InvalidRequest(f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} instead.",
                          param=param)


def _kind(value: object) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a decimal number", str: "a string",
             list: "an array", dict: "an object", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _show(value: object, limit: int = 40) -> str:
    """A short repr for messages: hostile inputs must not be echoed back in full."""
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 200 else "<huge integer>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")
