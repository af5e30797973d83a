"""OpenAI request validation: JSON bodies -> checked values, and errors in OpenAI's error shape (docs/serving.md).

Each accepted field of an endpoint has a JSON type (`CHAT_FIELDS`, ...; `null` means "not given"); unknown fields are
ignored, as vLLM. A body nesting deeper than `MAX_JSON_DEPTH` or holding a lone UTF-16 surrogate (`"\\ud800"`: not
text, not encodable as UTF-8) in any string or key is refused before any of it is used."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from ..engine.sampling import MAX_LOGPROBS, SamplingParams
from ..engine.structured import StructuredOutputsParams

MAX_JSON_DEPTH = 64  # tool schemas nest ~10 deep; the chat template renders schemas recursively

_CODES = {400: "invalid_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
          413: "request_too_large", 500: "internal_error", 503: "engine_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        """OpenAI's shape: `code` a string (a given one, else one per status), `param` the field or null."""
        code = self.code if self.code is not None else _CODES.get(self.status, f"http_{self.status}")
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": code}}


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 (not JSON, not UTF-8, too deep, a lone surrogate)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise bad(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    check_json_tree(body)
    return body


_SURROGATE = re.compile(r"[\ud800-\udfff]")  # json.loads joins valid pairs: what is left is a lone half


def check_json_tree(body: Any) -> None:
    """Depth and text of every node, without recursion (a deep body must not reach recursive code)."""
    stack = [(body, 1, None)]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels", path)
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, list):
            items = ((f"[{i}]", v) for i, v in enumerate(node))
        else:
            if isinstance(node, str) and _SURROGATE.search(node):
                raise bad(f"'{path}' holds a lone UTF-16 surrogate (\\ud800-\\udfff): send valid Unicode text", path)
            continue
        for key, value in items:
            if _SURROGATE.search(key):
                raise bad(f"a key of '{path or 'the body'}' holds a lone UTF-16 surrogate: send valid Unicode text",
                          path)
            child = key if path is None else path + key if key.startswith("[") else f"{path}.{key}"
            stack.append((value, depth + 1, child))


# JSON types of the accepted fields (None is always allowed: "not given").
_NUMBER, _INT, _BOOL, _STR, _OBJECT, _ARRAY = "a number", "an integer", "a boolean", "a string", "an object", "an array"
# The exact types json.loads makes: a bool is no number here (to isinstance, True is an int).
_TYPES = {_NUMBER: (int, float), _INT: (int,), _BOOL: (bool,), _STR: (str,), _OBJECT: (dict,), _ARRAY: (list,)}
_SAMPLING = {"model": _STR, "max_tokens": _INT, "temperature": _NUMBER, "top_p": _NUMBER, "top_k": _INT,
             "min_p": _NUMBER, "seed": _INT, "stop": (_STR, _ARRAY), "n": _INT, "stream": _BOOL,
             "stream_options": _OBJECT, "presence_penalty": _NUMBER, "frequency_penalty": _NUMBER,
             "repetition_penalty": _NUMBER, "min_tokens": _INT, "ignore_eos": _BOOL, "user": _STR,
             "logit_bias": _OBJECT, "response_format": _OBJECT, "structured_outputs": _OBJECT,
             # vLLM's extra parameters
             "stop_token_ids": _ARRAY, "include_stop_str_in_output": _BOOL, "skip_special_tokens": _BOOL,
             "spaces_between_special_tokens": _BOOL, "allowed_token_ids": _ARRAY, "truncate_prompt_tokens": _INT,
             "bad_words": _ARRAY, "use_beam_search": _BOOL, "prompt_logprobs": _INT}
CHAT_FIELDS = {**_SAMPLING, "messages": _ARRAY, "max_completion_tokens": _INT, "logprobs": _BOOL,
               "top_logprobs": _INT, "tools": _ARRAY, "tool_choice": (_STR, _OBJECT), "chat_template_kwargs": _OBJECT,
               "reasoning_effort": _STR, "mm_processor_kwargs": _OBJECT, "parallel_tool_calls": _BOOL,
               "metadata": _OBJECT, "store": _BOOL, "add_generation_prompt": _BOOL, "continue_final_message": _BOOL,
               "echo": _BOOL}
COMPLETION_FIELDS = {**_SAMPLING, "prompt": (_STR, _ARRAY), "logprobs": _INT, "echo": _BOOL, "suffix": _STR,
                     "best_of": _INT}
# vLLM's /tokenize and /detokenize
TOKENIZE_FIELDS = {"model": _STR, "prompt": _STR, "messages": _ARRAY, "tools": _ARRAY, "add_generation_prompt": _BOOL,
                   "add_special_tokens": _BOOL, "return_token_strs": _BOOL, "chat_template_kwargs": _OBJECT,
                   "reasoning_effort": _STR}
DETOKENIZE_FIELDS = {"model": _STR, "tokens": _ARRAY}


# Fields known but not applied, with the value that asks for nothing: any other value is refused (typed: True is no 1).
_REFUSED = {"suffix": "", "best_of": 1, "use_beam_search": False}


def check_fields(body: dict, fields: dict[str, Any]) -> None:
    """A 400 naming the first accepted field whose value has the wrong JSON type; refuses what we accept but do not
    apply (`_REFUSED`) rather than ignoring it."""
    for name, kinds in fields.items():
        value = body.get(name)
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if value is not None and not any(type(value) in _TYPES[kind] for kind in kinds):
            raise bad(f"'{name}' must be {' or '.join(kinds)}, got {type(value).__name__}", name)
    for name, no_op in _REFUSED.items():
        if name in fields and body.get(name) not in (None, no_op):
            raise bad(f"'{name}' is not supported", name)


def get_number(body: dict, name: str, default=None, low=None, high=None):
    """The field's number (check_fields checked its JSON type) in [low, high], or `default` when not given."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and not math.isfinite(value):  # json.loads reads NaN and Infinity
        raise bad(f"'{name}' must be finite", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise bad(f"'{name}' must be in [{low}, {high}], got {value}", name)
    return value


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):  # a nested field, which check_fields does not reach
        raise bad(f"'{name}' must be a boolean", name)
    return default if value is None else value


def get_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
        raise bad("'stop' must be a non-empty string or a list of up to 16 non-empty strings", "stop")
    return stop


def get_token_ids(value, name: str, vocab_size: int) -> list[int]:
    """A list of token ids in [0, vocab_size), or a 400 naming `name`."""
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad(f"'{name}' must be a list of token ids", name)
    if not all(0 <= t < vocab_size for t in value):
        raise bad(f"'{name}': token ids must be in [0, {vocab_size})", name)
    return value


def get_bad_words(body: dict, encode: Callable[..., list[int]]) -> list[list[int]] | None:
    """vLLM's bad_words: each word's tokens as written and after a space (as vLLM tokenizes them), or a 400."""
    words = body.get("bad_words")
    if not words:
        return None
    if not all(isinstance(word, str) and word.strip() for word in words):
        raise bad("'bad_words' must be a list of non-empty strings", "bad_words")
    sequences = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            if (ids := encode(text, add_special_tokens=False)) and ids not in sequences:
                sequences.append(ids)
    return sequences


def text_options(body: dict, chat: bool) -> dict:
    """How a choice's text is made (generation.Choice's keywords): the stop strings, whether the matched one is kept
    (include_stop_str_in_output), whether special tokens are left out. Chat keeps them for its parser (thinking,
    tool calls), which takes Gemma's markers out of the message: there skip_special_tokens false is refused."""
    skip = get_bool(body, "skip_special_tokens", False)
    if chat and body.get("skip_special_tokens") is False:
        raise bad("'skip_special_tokens' false is not supported on chat: the message is parsed from the special "
                  "tokens; use /v1/completions for the raw text", "skip_special_tokens")
    return {"stops": get_stop(body), "include_stop": get_bool(body, "include_stop_str_in_output"),
            "skip_special_tokens": skip and not chat}


def get_logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: token ids (as strings: JSON keys) -> a bias in [-100, 100] added to their logits."""
    bias = body.get("logit_bias")
    if not bias:
        return None
    checked = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:
            raise bad(f"'logit_bias' keys must be token ids in [0, {vocab_size}), got {key[:40]!r}", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise bad(f"'logit_bias' values must be numbers in [-100, 100], got {value!r} for token {key}",
                      "logit_bias")  # NaN fails the range check too
        checked[int(key)] = float(value)
    return checked


_VLLM_STRUCTURED = ("json", "json_object", "regex", "choice", "grammar")


def structured_output(body: dict) -> StructuredOutputsParams | None:
    """The constraint a request asks for: OpenAI's `response_format` (json_object, json_schema; text is none) or
    vLLM's `structured_outputs` extension (json, json_object, regex, choice, grammar), not both."""
    response_format, vllm = body.get("response_format"), body.get("structured_outputs")
    spec = None
    if response_format is not None:
        kind = response_format.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise bad("'response_format.type' must be text, json_object or json_schema", "response_format")
        if kind == "json_object":
            spec = StructuredOutputsParams(json_object=True)
        elif kind == "json_schema":
            wrapper = response_format.get("json_schema")
            schema = wrapper.get("schema") if isinstance(wrapper, dict) else None
            if not isinstance(schema, dict):
                raise bad("'response_format.json_schema.schema' must be a JSON schema (an object)", "response_format")
            for name, kind, what in (("name", str, "a string"), ("strict", bool, "a boolean"),
                                     ("description", str, "a string")):
                if wrapper.get(name) is not None and not isinstance(wrapper[name], kind):
                    raise bad(f"'response_format.json_schema.{name}' must be {what}", "response_format")
            # strict or not, the grammar holds the output to the schema
            spec = StructuredOutputsParams(json=schema)
    if vllm is not None:
        if spec is not None:
            raise bad("send either 'response_format' or 'structured_outputs', not both", "structured_outputs")
        if unknown := sorted(set(vllm) - set(_VLLM_STRUCTURED)):
            raise bad(f"'structured_outputs' does not take {', '.join(map(repr, unknown))[:200]}; it takes "
                      f"{', '.join(_VLLM_STRUCTURED)}", "structured_outputs")
        try:
            spec = StructuredOutputsParams(**{k: v for k, v in vllm.items() if v is not None and v is not False})
        except (ValueError, TypeError) as e:
            raise bad(str(e), "structured_outputs") from None
    return spec


def scores_prompt(body: dict, chat: bool) -> bool:
    """Whether the request asks for its prompt's logprobs (prompt_logprobs, or completions' echo): its max_tokens may
    then be 0, as lm-evaluation-harness's scoring requests send it."""
    return body.get("prompt_logprobs") is not None or (not chat and body.get("echo") is True)


def requested_max_tokens(body: dict, chat: bool) -> int | None:
    """The request's cap on new tokens (chat: max_completion_tokens first), None when it gives none."""
    least = 0 if scores_prompt(body, chat) else 1
    max_tokens = get_number(body, "max_completion_tokens", None, least) if chat else None
    return max_tokens if max_tokens is not None else get_number(body, "max_tokens", None, least)


def sampling_params(body: dict, defaults: dict, max_tokens_default: int, chat: bool,
                    vocab_size: int = 2**31, stop_token_ids: list[int] | None = None,
                    encode: Callable[..., list[int]] | None = None) -> SamplingParams:
    """SamplingParams from an OpenAI request (stop strings are applied by the server, on text; the structured
    output by the caller, which knows the tools and the tokenizer). `stop_token_ids`: the model's own, which the
    request's add to; `encode`: the tokenizer's, for bad_words (without it they are refused)."""
    max_tokens = requested_max_tokens(body, chat)
    max_tokens = max_tokens_default if max_tokens is None else max_tokens
    logprobs = None if chat else get_number(body, "logprobs", None, 0, MAX_LOGPROBS)  # chat: a boolean, top_logprobs
    if chat and get_bool(body, "logprobs"):
        logprobs = get_number(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
    elif chat and body.get("top_logprobs") is not None:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    prompt_logprobs = get_number(body, "prompt_logprobs", None, 0, MAX_LOGPROBS)
    if prompt_logprobs is not None and get_bool(body, "stream"):
        raise bad("'prompt_logprobs' is not available with 'stream': true (as in vLLM)", "prompt_logprobs")
    if not chat and get_bool(body, "echo") and (logprobs is not None or max_tokens == 0):
        # echo's logprobs start with the prompt's (vLLM); echo with max_tokens 0 is a request that scores its prompt
        prompt_logprobs = max(prompt_logprobs or 0, logprobs or 0)
    top_p = get_number(body, "top_p", defaults.get("top_p", 1.0), 0, 1)
    if top_p == 0:
        raise bad("'top_p' must be > 0", "top_p")
    seed = get_number(body, "seed", None, -(2**63), 2**63 - 1)
    extra = {name: get_token_ids(body[name], name, vocab_size) for name in ("stop_token_ids", "allowed_token_ids")
             if body.get(name) is not None}
    if "stop_token_ids" in extra and stop_token_ids is not None:
        extra["stop_token_ids"] = list(dict.fromkeys([*stop_token_ids, *extra["stop_token_ids"]]))
    if extra.get("allowed_token_ids") == []:
        raise bad("'allowed_token_ids' must not be empty", "allowed_token_ids")
    if body.get("bad_words"):
        if encode is None:
            raise bad("'bad_words' is not supported here", "bad_words")
        extra["bad_words"] = get_bad_words(body, encode)
    try:
        return SamplingParams(
            max_tokens=max_tokens, top_p=top_p, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            ignore_eos=get_bool(body, "ignore_eos"),
            temperature=get_number(body, "temperature", defaults.get("temperature", 1.0), 0, 2),
            top_k=max(0, get_number(body, "top_k", defaults.get("top_k", 0), -1)),  # -1 means off, as in vLLM
            min_p=get_number(body, "min_p", 0.0, 0, 1), min_tokens=get_number(body, "min_tokens", 0, 0, max_tokens),
            presence_penalty=get_number(body, "presence_penalty", 0.0, -2, 2),
            frequency_penalty=get_number(body, "frequency_penalty", 0.0, -2, 2),
            repetition_penalty=get_number(body, "repetition_penalty", 1.0, 0.01, 10),
            seed=None if seed is None else seed % 2**63, logit_bias=get_logit_bias(body, vocab_size), **extra)
    except ValueError as e:
        raise bad(str(e)) from None


def include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is not None and not body.get("stream"):
        raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    return get_bool(options or {}, "include_usage")


def thinking(body: dict, default: bool) -> bool:
    kwargs = body.get("chat_template_kwargs")
    if kwargs and "enable_thinking" in kwargs:
        return get_bool(kwargs, "enable_thinking")
    effort = body.get("reasoning_effort")
    if effort not in (None, "none", "minimal", "low", "medium", "high"):
        raise bad("'reasoning_effort' must be none, minimal, low, medium or high", "reasoning_effort")
    return default if effort is None else effort != "none"


def tool_choice(body: dict, tools: list | None) -> Any:
    """'none' | 'auto' | 'required' | a function name."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise bad("tool_choice 'required' needs 'tools'", "tool_choice")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        names = [t.get("function", {}).get("name") for t in tools or [] if isinstance(t, dict)]
        if not isinstance(name, str) or name not in names:
            raise bad(f"tool_choice names function {name!r}, which is not in 'tools'", "tool_choice")
        return name
    raise bad("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
              "tool_choice")
