"""Chat template rendering and OpenAI -> Gemma 4 message conversion.

`render_chat_template` renders a checkpoint's own Jinja template in a sandbox set up like transformers' (same
whitespace options, globals and filters), so the prompt text is byte-identical to its `apply_chat_template`.
`openai_to_gemma_messages` turns OpenAI chat-completions messages into the shape the Gemma 4 template expects
(its docstring lists the conversions).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "model", "tool"})
# Names under which clients send an assistant turn's reasoning; the template reads `reasoning_content`.
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The chat template failed to compile or raised while rendering (its message is kept)."""


# ------------------------------------------------------------------------------------------ jinja sandbox
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; inference renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, which could reach Python internals."""

    def __init__(*args, **kwargs):  # as jinja's Namespace: `self` is positional so that it may be an attribute name
        jinja2.utils.Namespace.__init__(args[0])
        for name, value in dict(*args[1:], **kwargs).items():
            args[0][name] = value

    def __setitem__(self, name, value):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"Chat templates cannot set underscore attributes ({name!r}).")
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _TemplateDict:
    """`dict(...)` / `dict.fromkeys(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Unlike jinja's own filter: no HTML escaping, non-ASCII kept, and the json.dumps options exposed.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"Chat template syntax error at line {e.lineno}: {e.message}") from e


# --------------------------------------------------------------------------------------- template inputs
_BASE_VALUES = {str: str.__str__, int: int.__int__, float: float.__float__}


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON-like types. Anything else (images, arrays, tensors) becomes an
    inert "<TypeName>" string: the sandbox would otherwise expose their methods, and templates only test
    whether media keys exist."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base, base_value in _BASE_VALUES.items():  # subclasses (enums, ...) carry extra methods: keep the value
        if isinstance(value, base):
            return base_value(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy / torch scalars
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Sequence[Any]) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts.")
    if not messages:
        raise ValueError("Cannot render an empty conversation: pass at least one message.")
    prepared = []
    for index, message in enumerate(_plain(list(messages))):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be a dict with 'role' and 'content', "
                             f"got {type(message).__name__}.")
        role = message.get("role")
        if role not in KNOWN_ROLES:
            raise ValueError(f"messages[{index}] has unknown role {role!r}; use one of {sorted(KNOWN_ROLES)}.")
        # Clients send `None` for absent fields (OpenAI's content=None next to tool_calls); templates test for
        # missing keys, so drop them, as transformers does.
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_KEYS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def validate_tools(tools: Sequence[Any] | None) -> list[dict] | None:
    """Tools as JSON-schema dicts ({"type": "function", "function": {...}}); callables are converted."""
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError("tools must be a list of {'type': 'function', 'function': {...}} dicts or functions.")
    schemas = []
    for index, tool in enumerate(tools):
        if callable(tool) and not isinstance(tool, Mapping):
            tool = function_to_tool_schema(tool)
        _check_tool_schema(index, tool)
        schemas.append(tool)
    return schemas


def _check_tool_schema(index: int, tool: Any) -> None:
    where = f"tools[{index}]"
    if not isinstance(tool, Mapping):
        raise ValueError(f"{where} must be a dict or a function, got {type(tool).__name__}.")
    function = tool.get("function")
    if not isinstance(function, Mapping):
        hint = " (wrap it as {'type': 'function', 'function': {...}})" if "name" in tool else ""
        raise ValueError(f"{where} has no 'function' object{hint}.")
    if tool.get("type", "function") != "function":
        raise ValueError(f"{where} has type {tool.get('type')!r}; only 'function' tools are supported.")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}.function needs a non-empty string 'name'.")
    parameters = function.get("parameters")
    if parameters is None:
        return
    if not isinstance(parameters, Mapping):
        raise ValueError(f"{where} ({name}): 'parameters' must be a JSON-schema object, "
                         f"got {type(parameters).__name__}.")
    properties = parameters.get("properties")
    if properties is not None and not isinstance(properties, Mapping):
        raise ValueError(f"{where} ({name}): 'parameters.properties' must be an object mapping names to schemas.")
    for key, schema in (properties or {}).items():
        if not isinstance(schema, Mapping):
            raise ValueError(f"{where} ({name}): property {key!r} must be a schema object, "
                             f"got {type(schema).__name__}.")
    required = parameters.get("required")
    if required is not None and (isinstance(required, str) or not isinstance(required, Sequence)
                                 or not all(isinstance(r, str) for r in required)):
        raise ValueError(f"{where} ({name}): 'parameters.required' must be a list of property names.")


def render_chat_template(template: str, messages: Sequence[dict], *, tools: Sequence[Any] | None = None,
                         add_generation_prompt: bool = True, special_tokens: Mapping[str, str] | None = None,
                         **kwargs: Any) -> str:
    """Render `template` like transformers' `apply_chat_template(..., tokenize=False)`.

    `special_tokens` (bos_token, eos_token, ...) and `kwargs` (e.g. enable_thinking) become template
    variables; kwargs win over special tokens of the same name."""
    compiled = compile_chat_template(template)
    context = {**(special_tokens or {}), **_plain(kwargs), "messages": _prepare_messages(messages),
               "tools": _plain(validate_tools(tools)), "documents": None,
               "add_generation_prompt": add_generation_prompt}
    try:
        return compiled.render(**context)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"Chat template error: {e.message or e}") from e
    except Exception as e:  # a template bug (e.g. `'a' + 1`) surfaces as a plain Python error
        raise ChatTemplateError(f"Chat template failed: {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------------------ python function -> schema
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def _type_schema(hint: Any) -> dict:
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        schema = _type_schema(args[0]) if len(args) == 1 else {"type": [_type_schema(a).get("type") for a in args]}
        if len(args) < len(typing.get_args(hint)):
            schema["nullable"] = True
        return schema
    if origin is typing.Literal:
        values = list(typing.get_args(hint))
        return {"type": _JSON_TYPES.get(type(values[0]), "string"), "enum": values}
    if origin in (list, tuple, set):
        schema = {"type": "array"}
        if args:
            schema["items"] = _type_schema(args[0])
        return schema
    return {"type": _JSON_TYPES.get(hint, "object")}  # dict[...] and unknown classes are objects


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Google-style docstring -> (description, {arg: description})."""
    doc = inspect.cleandoc(doc or "")
    parts = re.split(r"\n\s*(?:Args|Arguments|Parameters):\s*\n", doc, maxsplit=1)
    description = re.split(r"\n\s*(?:Returns|Raises|Yields):", parts[0])[0].strip()
    arg_docs: dict[str, str] = {}
    if len(parts) == 2:
        args_block = re.split(r"\n\s*(?:Returns|Raises|Yields):", parts[1])[0]
        current = None
        for line in args_block.splitlines():
            match = re.match(r"\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", line)
            if match:
                current = match.group(1)
                arg_docs[current] = match.group(2).strip()
            elif current and line.strip():
                arg_docs[current] += " " + line.strip()
    return description, arg_docs


def function_to_tool_schema(func: Callable) -> dict:
    """A tool schema from a function's type hints and Google-style docstring."""
    if not getattr(func, "__doc__", None):
        raise ValueError(f"Tool function {getattr(func, '__name__', func)!r} needs a docstring describing it.")
    description, arg_docs = _parse_docstring(func.__doc__)
    hints = typing.get_type_hints(func)
    properties, required = {}, []
    for name, param in inspect.signature(func).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        schema = _type_schema(hints.get(name, param.annotation))
        if name in arg_docs:
            schema["description"] = arg_docs[name]
        properties[name] = schema
        if param.default is inspect.Parameter.empty:
            required.append(name)
    parameters = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    function = {"name": func.__name__, "description": description, "parameters": parameters}
    return {"type": "function", "function": function}


# ------------------------------------------------------------------------------------ OpenAI -> Gemma
def _text_of(content: Any, where: str) -> str:
    """Content that must be plain text (system prompts, tool results): a string or text parts."""
    converted = _convert_content(content, where)
    if isinstance(converted, list):
        kind = next(part["type"] for part in converted if part["type"] != "text")
        raise ValueError(f"{where}: only text parts are allowed here, not {kind} parts.")
    return converted


def _convert_part(part: Any, where: str) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, Mapping):
        raise ValueError(f"{where}: content parts must be dicts, got {type(part).__name__}.")
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": str(part.get("text", ""))}
    if kind in ("image_url", "audio_url", "video_url"):
        url = part.get(kind)
        url = url.get("url") if isinstance(url, Mapping) else url
        if not url:
            raise ValueError(f"{where}: {kind} part needs {kind}.url.")
        return {"type": kind.split("_")[0], "url": url}
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, Mapping) or not audio.get("data"):
            raise ValueError(f"{where}: input_audio part needs input_audio.data (base64) and input_audio.format.")
        return {"type": "audio", "data": audio["data"], "format": audio.get("format", "wav")}
    if kind in ("image", "audio", "video"):  # already in Gemma / transformers form
        return dict(part)
    raise ValueError(f"{where}: unsupported content part type {kind!r} (use text, image_url, input_audio, video_url).")


def _convert_content(content: Any, where: str) -> str | list[dict]:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}.")
    parts = [_convert_part(part, f"{where}.content[{i}]") for i, part in enumerate(content)]
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _parse_arguments(arguments: Any, where: str) -> dict:
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, Mapping):
        return dict(arguments)
    if not isinstance(arguments, str):
        raise ValueError(f"{where}: arguments must be a JSON object string, got {type(arguments).__name__}.")
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: arguments are not valid JSON ({e.msg} at char {e.pos}): {arguments[:80]!r}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{where}: arguments must be a JSON object, got {type(value).__name__}.")
    return value


def _convert_tool_calls(tool_calls: Any, where: str) -> list[dict]:
    if not isinstance(tool_calls, list):
        raise ValueError(f"{where}.tool_calls must be a list.")
    converted = []
    for i, call in enumerate(tool_calls):
        here = f"{where}.tool_calls[{i}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"{here} needs function.name.")
        arguments = _parse_arguments(function.get("arguments"), here)
        converted.append({"id": call.get("id"), "type": "function",
                          "function": {"name": function["name"], "arguments": arguments}})
    return converted


def _tool_response_value(content: Any, where: str) -> Any:
    """A tool result as the template renders it: JSON objects/arrays structured, anything else as text."""
    text = _text_of(content, where)
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            pass
    return text


def openai_to_gemma_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Convert OpenAI chat-completions messages to messages for the Gemma 4 chat template.

    - `developer` becomes `system`; system text parts are joined into one string.
    - `image_url` / `input_audio` / `video_url` parts become `{"type": "image"|"audio"|"video", ...}` parts
      that keep their payload (url, or base64 data + format); `collect_media` lists them in prompt order.
    - assistant `tool_calls` get dict arguments (JSON strings are parsed; invalid JSON is a ValueError).
    - `tool` messages are attached, as `tool_responses` [{"name", "response"}], to the assistant message that
      made the calls: the template then continues the model turn with `<|tool_response>...<tool_response|>`.
      The function name comes from the matching `tool_call_id`, else the message's `name`, else the next
      unanswered call. An assistant reply right after tool results joins that same message, so the history
      reads exactly as the model generated it (one model turn: calls, responses, answer). Text the assistant
      wrote before its calls is dropped once results follow: the template has no place for it there.
    - earlier turns' reasoning is passed as `reasoning_content`; the template keeps it only where it means
      to (tool-calling turns after the last user message) and strips thinking from assistant text."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of OpenAI message dicts.")
    out: list[dict] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, across the whole conversation
    pending: list[str] = []  # names of calls of the last assistant message that have no result yet
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where} must be a dict, got {type(message).__name__}.")
        role = message.get("role")
        if role in ("system", "developer"):
            out.append({"role": "system", "content": _text_of(message.get("content"), where)})
        elif role == "user":
            out.append({"role": "user", "content": _convert_content(message.get("content"), where)})
        elif role in ("assistant", "model"):
            _append_assistant(out, message, where, call_names, pending)
        elif role in ("tool", "function"):
            _append_tool_result(out, message, where, call_names, pending)
        else:
            raise ValueError(f"{where} has unknown role {role!r}; use system, developer, user, assistant or tool.")
    return out


def _append_assistant(out: list[dict], message: Mapping, where: str, call_names: dict, pending: list) -> None:
    converted: dict[str, Any] = {"role": "assistant"}
    content = _convert_content(message.get("content"), where)
    if content:
        converted["content"] = content
    reasoning = next((message[k] for k in REASONING_KEYS if isinstance(message.get(k), str) and message[k]), None)
    if reasoning:
        converted["reasoning_content"] = reasoning
    if message.get("tool_calls"):
        calls = _convert_tool_calls(message["tool_calls"], where)
        converted["tool_calls"] = calls
        pending[:] = [c["function"]["name"] for c in calls]
        call_names.update({c["id"]: c["function"]["name"] for c in calls if c["id"]})
    else:
        pending.clear()
    previous = out[-1] if out else None
    # A plain reply after tool results continues the turn that holds them (see the docstring).
    if previous and previous.get("tool_responses") and "content" not in previous and "tool_calls" not in converted:
        if content:
            previous["content"] = content
        return
    out.append(converted)


def _append_tool_result(out: list[dict], message: Mapping, where: str, call_names: dict, pending: list) -> None:
    call_id = message.get("tool_call_id")
    name = (call_names.get(call_id) if call_id else None) or message.get("name") or next(iter(pending), None)
    if not name:
        raise ValueError(f"{where}: tool result with tool_call_id {call_id!r} matches no earlier assistant tool call; "
                         "send the assistant message with its tool_calls first, or give the result a 'name'.")
    if name in pending:
        pending.remove(name)
    response = {"name": name, "response": _tool_response_value(message.get("content"), where)}
    previous = out[-1] if out else {}
    answered = bool(previous.get("tool_responses")) and "content" in previous
    call_turn = previous.get("role") == "assistant" and (previous.get("tool_calls") or previous.get("tool_responses"))
    if call_turn and not answered:
        if not previous.get("tool_responses"):
            # The template writes a turn's text after its tool responses and then closes the turn, so text
            # written before the calls ("Let me check.") cannot stay in a turn that goes on with results.
            previous.pop("content", None)
        previous.setdefault("tool_responses", []).append(response)
    else:  # a result with no call before it still belongs to a model turn
        out.append({"role": "assistant", "tool_responses": [response]})


def collect_media(messages: Sequence[Mapping]) -> list[dict]:
    """The image/audio/video parts of `messages`, in the order their placeholders appear in the prompt."""
    media = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            media.extend(dict(p) for p in content
                         if isinstance(p, Mapping) and p.get("type") in ("image", "audio", "video"))
    return media
