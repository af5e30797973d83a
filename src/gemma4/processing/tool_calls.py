"""Reading the tool calls a Gemma 4 model writes: `parse_tool_call_body` (the text between `<|tool_call>`
and `<tool_call|>`) and `parse_arguments` (a `{key:value,...}` object), both raising ArgumentSyntaxError.

Values: `<|"|>text<|"|>` strings, JSON numbers, true/false/null, `{key:value}` objects with bare keys, `[...]`
arrays; every value keeps its type. Drifted forms are accepted too: no `call:` prefix, `name(...)` with
`key=value` or `{...}` inside, JSON-quoted keys and strings, `{"name":..,"arguments":..}`, a string missing its
opening `<|"|>` (`q:text<|"|>}`, as SGLang documents) and, in a finished call, one missing its closing `<|"|>`
right before the arguments' `}` (`q:<|"|>text}`). No parsed value ever contains `<|"|>`.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

STRING_DELIM = '<|"|>'
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
FUNCTION_NAME = re.compile(r"[A-Za-z_][\w\-.]*")  # a tool's name as the model writes it
_CALL_PREFIX = re.compile(r"\s*(?:call\s*:\s*)?")  # optional; the whitespace around it is skipped too
_SPACES = re.compile(r"\s*")
# A bare (unquoted) value runs until the next structural character, or a string's closing delimiter.
_BARE_END = re.compile(r'[,}\])]|<\|"\|>')
_STRUCTURAL_NEXT = re.compile(r"\s*[,}\])]")
_BARE_LITERALS = {"true": True, "false": False, "null": None, "none": None, "True": True, "False": False, "None": None}
_STRING_OPENINGS = (STRING_DELIM, '"', "'")


class ArgumentSyntaxError(ValueError):
    """A tool call's arguments are malformed or cut off."""


class _Reader:
    """Recursive-descent reader for Gemma 4 tool-call values (a lenient superset of JSON).

    `terminated`: the text was visibly finished (not cut off), which some repairs need to be safe."""

    def __init__(self, text: str, pos: int = 0, terminated: bool = False):
        self.text = text
        self.pos = pos
        self.terminated = terminated

    def fail(self, what: str):
        raise ArgumentSyntaxError(f"{what} at char {self.pos}")

    def skip_ws(self) -> None:
        self.pos = _SPACES.match(self.text, self.pos).end()

    def peek(self, token: str | tuple[str, ...]) -> bool:
        return self.text.startswith(token, self.pos)

    def expect(self, token: str) -> None:
        self.skip_ws()
        if not self.peek(token):
            self.fail(f"expected {token!r}")
        self.pos += len(token)

    def at_end(self) -> bool:
        self.skip_ws()
        return self.pos >= len(self.text)

    def value(self) -> Any:
        self.skip_ws()
        if self.pos >= len(self.text):
            self.fail("unexpected end")
        if self.peek("{"):
            return self.object("{", "}")
        if self.peek("["):
            return self.array()
        return self.string() if self.peek(_STRING_OPENINGS) else self.bare()

    def string(self) -> str:
        if self.peek(STRING_DELIM):
            start = self.pos + len(STRING_DELIM)
            end = self.text.find(STRING_DELIM, start)
            if end >= 0:
                self.pos = end + len(STRING_DELIM)
                return self.text[start:end]
            # No closing delimiter: in a finished call, a string directly before `}` ends there, unless a
            # `,`, `{` or `[` in it leaves open where it really ends.
            end = self.text.find("}", start)
            if not self.terminated or end < 0 or any(c in self.text[start:end] for c in ",{["):
                self.fail("unterminated <|\"|> string")
            self.pos = end
            return self.text[start:end]
        if self.peek('"'):
            try:
                value, self.pos = json.decoder.scanstring(self.text, self.pos + 1)
            except json.JSONDecodeError:
                self.fail("malformed JSON string")
            return value
        end = self.text.find("'", self.pos + 1)
        if end < 0:
            self.fail("unterminated ' string")
        value = self.text[self.pos + 1 : end]
        self.pos = end + 1
        return value

    def bare(self) -> Any:
        match = _BARE_END.search(self.text, self.pos)
        if match is None:
            # Nothing closes the value: the call was cut off and the value may be incomplete.
            self.fail("unterminated value")
        raw = self.text[self.pos : match.start()]
        if match.group() == STRING_DELIM:
            # A string whose opening delimiter was dropped (`q:text<|"|>,` or `}`) is the text before it.
            if not _STRUCTURAL_NEXT.match(self.text, match.end()):
                self.fail("stray <|\"|> in a value")
            self.pos = match.end()
            return raw
        if not raw.strip():
            self.fail("missing value")
        self.pos = match.start()
        return _bare_value(raw.strip())

    def key(self, separators: str) -> str:
        self.skip_ws()
        if self.peek(_STRING_OPENINGS):
            return self.string()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in separators + "{}[],()\"":
            self.pos += 1
        if self.pos >= len(self.text):
            self.fail("unterminated key")
        name = self.text[start : self.pos].strip()
        if not name:
            self.fail("missing key")
        return name

    def object(self, open_: str, close: str, separators: str = ":") -> dict:
        """`{k:v,...}`; also `(k=v,...)` for the parenthesised drift (open_="(", separators=":=")."""
        self.expect(open_)
        result: dict[str, Any] = {}
        self.skip_ws()
        while not self.peek(close):
            key = self.key(separators)
            self.skip_ws()
            if self.pos >= len(self.text) or self.text[self.pos] not in separators:
                self.fail(f"expected one of {separators!r} after key {key!r}")
            self.pos += 1
            result[key] = self.value()
            self.separator(close)
        self.pos += len(close)
        return result

    def array(self) -> list:
        self.expect("[")
        items = []
        self.skip_ws()
        while not self.peek("]"):
            items.append(self.value())
            self.separator("]")
        self.pos += 1
        return items

    def separator(self, close: str) -> None:
        """After an item of an object or array: a ',' (and the whitespace after it), or `close` next."""
        self.skip_ws()
        if self.peek(","):
            self.pos += 1
            self.skip_ws()
        elif not self.peek(close):
            self.fail(f"expected ',' or {close!r}")


def _bare_value(raw: str) -> Any:
    """An unquoted scalar: JSON number, true/false/null (also Python's True/False/None), else the text."""
    return json.loads(raw) if _NUMBER.fullmatch(raw) else _BARE_LITERALS.get(raw, raw)


def _check_no_delimiter(value: Any) -> Any:
    """`value`, or ArgumentSyntaxError if a `<|"|>` ended up in one of its strings (a misread string)."""
    if isinstance(value, dict):
        _check_no_delimiter(list(value.items()))  # each key, then its value
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_no_delimiter(item)
    elif isinstance(value, str) and STRING_DELIM in value:
        raise ArgumentSyntaxError(f"a {STRING_DELIM} delimiter inside the value {value[:60]!r}")
    return value


def parse_arguments(text: str) -> dict:
    """Gemma 4 argument text `{key:value,...}` -> dict. Raises ArgumentSyntaxError when malformed."""
    reader = _Reader(text)
    value = reader.object("{", "}")
    if not reader.at_end():
        reader.fail("trailing text after arguments")
    return _check_no_delimiter(value)


def _json_style_call(reader: _Reader) -> tuple[str, dict]:
    """`{"name": "f", "arguments": {...}}` (OpenAI-style drift)."""
    obj = reader.object("{", "}")
    name = obj.get("name")
    args = next((obj[k] for k in ("arguments", "parameters", "args") if k in obj), {})
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name) or not isinstance(args, dict):
        reader.fail("a JSON-style call needs a 'name' and object 'arguments'")
    return name, args


def _one_call(reader: _Reader, terminated: bool) -> tuple[str, dict]:
    reader.pos = _CALL_PREFIX.match(reader.text, reader.pos).end()
    if reader.peek("{"):
        return _json_style_call(reader)
    match = FUNCTION_NAME.match(reader.text, reader.pos)
    if not match:
        reader.fail("expected a function name")
    name = match.group()
    reader.pos = match.end()
    reader.skip_ws()
    if reader.peek("{"):
        return name, reader.object("{", "}")
    if reader.peek("("):
        start = reader.pos
        reader.pos += 1
        reader.skip_ws()
        if reader.peek("{"):  # name({...})
            args = reader.object("{", "}")
            reader.expect(")")
            return name, args
        reader.pos = start
        return name, reader.object("(", ")", separators=":=")
    # A bare name is a call without arguments only when the call was visibly finished.
    if terminated and reader.at_end():
        return name, {}
    reader.fail("expected '{' or '(' after the function name")


def parse_tool_call_body(body: str, terminated: bool = True) -> list[tuple[str, dict]]:
    """The calls written between `<|tool_call>` and `<tool_call|>` (usually one).

    `terminated` says whether the body was ended by `<tool_call|>` or another marker rather than cut off;
    only then is a bare `name` accepted as a call without arguments, or a string missing its closing
    delimiter repaired. Raises ArgumentSyntaxError."""
    reader = _Reader(body, terminated=terminated)
    calls = [_one_call(reader, terminated)]
    while not reader.at_end():
        if reader.peek(","):  # some drifts separate several calls with commas
            reader.pos += 1
        calls.append(_one_call(reader, terminated))
    for _, arguments in calls:
        _check_no_delimiter(arguments)
    return calls


def default_call_id(index: int) -> str:
    """A fresh random tool-call id (`index` is unused; custom `make_id` functions may use it)."""
    return "call_" + secrets.token_hex(12)
