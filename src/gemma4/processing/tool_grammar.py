"""Gemma 4's tool-call syntax as a grammar (llguidance's Lark dialect), for `tool_choice` "required" or a named
function: the model can then only write calls of the declared tools, in the form the chat template renders and
`tool_calls.parse_tool_call_body` reads:

    <|tool_call>call:NAME{key:<|"|>text<|"|>,n:5,flag:true,items:[1,2],inner:{k:<|"|>v<|"|>}}<tool_call|>

`<|tool_call>`, `<tool_call|>` and the string delimiter `<|"|>` are special tokens, referenced by id. Argument
values follow each tool's JSON-schema parameters as far as the syntax allows: properties by name (sorted as the
template's `dictsort` writes them), the required ones always, no others; strings (with enum, const, minLength,
maxLength; never holding `<|`, which would read as a delimiter), integers and numbers (with their bounds, as
llguidance's JSON compiler writes them), booleans, null, arrays (items, minItems, maxItems), nested objects,
anyOf / oneOf and type lists. Other keywords (pattern, format, $ref, allOf, ...) are not enforced: such a value takes
any value of its type, or any value. No whitespace is allowed between the parts."""

from __future__ import annotations

import json

from .tool_calls import FUNCTION_NAME

# Text that never holds `<|` (every Gemma control token's text starts with it): a string's content cannot end early
# at a `<|"|>` spelled by ordinary tokens.
_TEXT = r"/([^<]|<+[^<|])*<*/"
_NUMBER_KEYS = ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_BARE_KEY = FUNCTION_NAME  # what the parser reads as an unquoted key; other keys are written as <|"|>key<|"|>


class _Grammar:
    def __init__(self, string_delimiter: int):
        self.delimiter = f"<[{string_delimiter}]>"
        self.lines: list[str] = []
        self.count = 0
        self.generic = False

    def rule(self, body: str) -> str:
        name = f"r{self.count}"
        self.count += 1
        self.lines.append(f"{name}: {body}")
        return name

    def terminal(self, body: str) -> str:
        name = f"T{self.count}"
        self.count += 1
        self.lines.append(f"{name}: {body}")
        return name

    def string(self, content: str) -> str:
        return f"{self.delimiter} {content} {self.delimiter}"

    def literal(self, value) -> str | None:
        """A constant in the call syntax; None for objects and arrays (left to the generic value)."""
        if isinstance(value, str):
            return self.string(_quoted(value)) if value else f"{self.delimiter} {self.delimiter}"
        if isinstance(value, bool):
            return '"true"' if value else '"false"'
        if value is None:
            return '"null"'
        if isinstance(value, (int, float)):
            return _quoted(json.dumps(value))
        return None

    def any_value(self) -> str:
        if not self.generic:
            self.generic = True
            d = self.delimiter
            self.lines += [
                f"gvalue: {d} GTEXT {d} | GNUMBER | \"true\" | \"false\" | \"null\" | gobject | garray",
                f"GTEXT: {_TEXT}",
                r"GNUMBER: /-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/",
                'gobject: "{" (gpair ("," gpair)*)? "}"',
                f'gpair: GKEY ":" gvalue | {d} GTEXT {d} ":" gvalue',
                r"GKEY: /[A-Za-z_][A-Za-z0-9_\-.]*/",
                'garray: "[" (gvalue ("," gvalue)*)? "]"',
            ]
        return "gvalue"

    def value(self, schema) -> str:
        """An expression for a value of `schema`."""
        if not isinstance(schema, dict) or not schema:
            return self.any_value()
        if "const" in schema:
            return self.literal(schema["const"]) or self.any_value()
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            options = [self.literal(v) for v in schema["enum"]]
            return "(" + " | ".join(options) + ")" if None not in options else self.any_value()
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                return "(" + " | ".join(self.value(s) for s in schema[key]) + ")"
        kind = schema.get("type")
        if isinstance(kind, list) and kind:
            return "(" + " | ".join(self.value({**schema, "type": k}) for k in kind) + ")"
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else None
        if kind == "string":
            return self._string(schema)
        if kind in ("integer", "number"):
            numeric = {k: schema[k] for k in _NUMBER_KEYS if k in schema}
            # llguidance's JSON compiler writes bounded numbers; JSON numbers are the call syntax's numbers.
            return "%json " + json.dumps({**numeric, "x-guidance": {"whitespace_flexible": False}})
        if kind == "boolean":
            return '("true" | "false")'
        if kind == "null":
            return '"null"'
        if kind == "object":
            return self.object(schema)
        if kind == "array":
            return self._array(schema)
        return self.any_value()

    def _string(self, schema: dict) -> str:
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if not isinstance(low, int) or isinstance(low, bool) or low < 0:
            low = 0
        if not isinstance(high, int) or isinstance(high, bool) or high < low:
            high = None
        if low == 0 and high is None:
            content = self.terminal(_TEXT)
        else:
            content = self.terminal(f"/(?s:.{{{low},{'' if high is None else high}}})/ & {_TEXT}")
        return self.string(content)

    def _array(self, schema: dict) -> str:
        item = self.value(schema.get("items"))
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        low = low if isinstance(low, int) and not isinstance(low, bool) and low > 0 else 0
        high = high if isinstance(high, int) and not isinstance(high, bool) and high >= low else None
        if high == 0:
            return '"[" "]"'
        if high == 1:
            items = item
        else:
            items = f'{item} ("," {item}){{{max(low - 1, 0)},{"" if high is None else high - 1}}}'
        return f'"[" {items if low else f"({items})?"} "]"'

    def object(self, schema: dict) -> str:
        """`{key:value,...}`: the declared properties in dictsort order, the required ones always, no others; a
        schema without properties takes any object (none, if additionalProperties is false)."""
        properties = schema.get("properties")
        if not isinstance(properties, dict) or not properties:
            return '"{" "}"' if schema.get("additionalProperties") is False else self._any_object()
        required = schema.get("required")
        required = {name for name in required if isinstance(name, str)} if isinstance(required, list) else set()
        names = sorted(properties, key=lambda k: (k.lower(), k))  # jinja's dictsort: case-insensitive
        pairs = [(f"{self._key(name)} {self.value(properties[name])}", name in required) for name in names]
        # first[i]: properties i.. when none is written yet; rest[i]: properties i.. after one was (a comma first).
        first, rest = '""', '""'
        for pair, needed in reversed(pairs):
            pair_rule = self.rule(pair)
            new_rest = self.rule(f'"," {pair_rule} {rest}' + ("" if needed else f" | {rest}"))
            first = self.rule(f"{pair_rule} {rest}" + ("" if needed else f" | {first}"))
            rest = new_rest
        return f'"{{" {first} "}}"'

    def _any_object(self) -> str:
        self.any_value()
        return "gobject"

    def _key(self, name: str) -> str:
        if _BARE_KEY.fullmatch(name):
            return _quoted(name + ":")
        return f'{self.string(_quoted(name))} ":"'


def _quoted(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def tool_call_grammar(tools: list[dict], call_start: int, call_end: int, string_delimiter: int,
                      name: str | None = None, parallel: bool = True) -> str:
    """A Lark grammar for one call (`parallel` False) or one or more calls of `tools` (OpenAI's
    {"type": "function", "function": {"name", "parameters"}}), or of the tool named `name` only. The token ids are
    those of `<|tool_call>`, `<tool_call|>` and `<|"|>`."""
    grammar = _Grammar(string_delimiter)
    calls = []
    for tool in tools:
        function = tool.get("function") or {}
        if name is not None and function.get("name") != name:
            continue
        if not isinstance(function.get("name"), str) or not FUNCTION_NAME.fullmatch(function["name"]):
            raise ValueError(f"the tool name {function.get('name')!r} cannot be written in Gemma's call syntax "
                             f"(it takes names matching {FUNCTION_NAME.pattern})")
        parameters = function.get("parameters")
        arguments = grammar.object(parameters) if isinstance(parameters, dict) else '"{" "}"'
        calls.append(f'<[{call_start}]> {_quoted("call:" + function["name"])} {arguments} <[{call_end}]>')
    if not calls:
        raise ValueError(f"no tool named {name!r}" if name is not None else "no tools to call")
    return "\n".join([f"start: call{'+' if parallel else ''}", "call: " + " | ".join(calls), *grammar.lines]) + "\n"
