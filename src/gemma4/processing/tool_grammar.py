r"""Gemma 4's tool-call syntax as a grammar (llguidance's Lark dialect), for `tool_choice` "required" or a named
function: the model can then only write calls of the declared tools, in the form the chat template renders and
`tool_calls.parse_tool_call_body` reads:

    <|tool_call>call:NAME{key:<|"|>text<|"|>,n:5,flag:true,items:[1,2],inner:{k:<|"|>v<|"|>}}<tool_call|>

`<|tool_call>`, `<tool_call|>` and the string delimiter `<|"|>` are special tokens, referenced by id. No whitespace
is allowed between the parts. Argument values follow each tool's JSON-schema parameters:

* objects: the declared properties in the order the template's `dictsort` writes them, the required ones always.
  Other keys (bare or between delimiters, never a declared name; after the declared properties) as
  additionalProperties says: false, none; true, any value; a schema, values of it; absent, none where properties are
  declared, any value where none are. A required name that is not declared is one of these other keys (none can be
  written if additionalProperties is false).
* strings: never holding `<|` (which would read as a delimiter); minLength, maxLength; pattern, as JSON schema reads
  it: found anywhere in the string unless `^` / `$` anchor it, `\d` and `\w` ASCII (llguidance's JSON compiler
  anchors every pattern instead; one llguidance cannot read, such as a look-ahead or a backreference, is not
  enforced); format date-time, date, time, uuid, email, hostname, ipv4 (`_FORMATS`; other formats are not
  enforced). A string meets all of these at once: one terminal intersects their regexes.
* integers and numbers with their bounds and multipleOf (as llguidance's JSON compiler writes them), booleans,
  null, arrays (items, minItems, maxItems), enum and const of any JSON value, OpenAPI's `nullable`.
* anyOf, oneOf (as anyOf: not exclusive) and type lists: alternatives.
* $ref: a local JSON pointer (`#/$defs/Name`, `#/definitions/Name`, `#`) into the tool's parameters, one rule per
  reference, so a recursive schema is a recursive rule. A $ref that does not resolve is a ValueError naming it.
* allOf, and $ref or anyOf beside other keywords: one schema intersecting the parts (`_Grammar._intersect`). Parts
  that contradict each other (no common type, no common enum value, a required property another part forbids) or
  that give another keyword (format, multipleOf, ...) different values cannot be intersected: such a value takes
  any value (any object, if its type says object).
* Annotations (title, description, default, examples, ...) are ignored. Not enforced: uniqueItems, prefixItems,
  contains, patternProperties, propertyNames, minProperties, maxProperties, dependentRequired, if / then / else,
  not; a value whose schema holds only these takes any value."""

from __future__ import annotations

import json
from urllib.parse import unquote

import llguidance

from .tool_calls import FUNCTION_NAME

# Text that never holds `<|` (every Gemma control token's text starts with it): a string's content cannot end early
# at a `<|"|>` spelled by ordinary tokens.
_TEXT = r"/([^<]|<+[^<|])*<*/"
_KEY = r"/[A-Za-z_][A-Za-z0-9_\-.]*/"  # a key written bare (what the parser reads as one)
_NUMBER_KEYS = ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_BARE_KEY = FUNCTION_NAME  # what the parser reads as an unquoted key; other keys are written as <|"|>key<|"|>
# Keywords that say nothing about which values are valid.
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema", "$id", "$anchor",
                          "$defs", "definitions", "deprecated", "readOnly", "writeOnly", "discriminator",
                          "contentMediaType", "contentEncoding"})
_TIGHTER = {"minimum": max, "exclusiveMinimum": max, "minLength": max, "minItems": max, "minProperties": max,
            "maximum": min, "exclusiveMaximum": min, "maxLength": min, "maxItems": min, "maxProperties": min}

# String formats as regexes. RFC 3339 dates and times, as those of llguidance's JSON compiler but stricter where
# Python's datetime is: years 0001-9999, February 29 in leap years only, no leap second. UUIDs (RFC 4122), e-mail
# addresses (RFC 5321's dot-atom at a host name), host names (RFC 1123), IPv4 addresses (dotted quads).
_LEAP_YEAR = r"([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_DATE = (r"((000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])"
         rf"|(0[469]|11)-(0[1-9]|[12][0-9]|30)|02-(0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)")
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = rf"{_LABEL}(\.{_LABEL})*"
_ATOM = r"[A-Za-z0-9!#$%&'*+\/=?^_`{|}~-]+"
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_FORMATS = {"date": _DATE, "time": _TIME, "date-time": f"{_DATE}T{_TIME}",
            "uuid": "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
            "email": rf"{_ATOM}(\.{_ATOM})*@{_HOSTNAME}", "hostname": _HOSTNAME, "ipv4": rf"{_OCTET}(\.{_OCTET}){{3}}"}


class _CannotMerge(Exception):
    """allOf parts that contradict each other, or that this module cannot intersect."""


class _Grammar:
    def __init__(self, string_delimiter: int):
        self.delimiter = f"<[{string_delimiter}]>"
        self.lines: list[str] = []
        self.count = 0
        self.generic = False
        self.root: dict = {}  # the parameters of the tool being written: where its $refs point
        self.tool = ""
        self.shared: dict[str, str] = {}  # a schema with $ref or allOf (its JSON) -> its rule, for the tool

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count - 1}"

    def rule(self, body: str) -> str:
        name = self._name("r")
        self.lines.append(f"{name}: {body}")
        return name

    def terminal(self, body: str) -> str:
        name = self._name("T")
        self.lines.append(f"{name}: {body}")
        return name

    def string(self, content: str) -> str:
        return f"{self.delimiter} {content} {self.delimiter}"

    def literal(self, value) -> str | None:
        """A constant in the call syntax (objects with their keys in dictsort order); None for what is not JSON."""
        if isinstance(value, str):
            return self.string(_quoted(value)) if value else f"{self.delimiter} {self.delimiter}"
        if isinstance(value, bool):
            return '"true"' if value else '"false"'
        if value is None:
            return '"null"'
        if isinstance(value, (int, float)):
            return _quoted(json.dumps(value))
        if isinstance(value, list):
            items = [self.literal(item) for item in value]
            return None if None in items else '"[" ' + ' "," '.join(items) + ' "]"'
        if isinstance(value, dict) and all(isinstance(key, str) for key in value):
            keys = sorted(value, key=_dictsort)
            items = [self.literal(value[key]) for key in keys]
            pairs = [f"{self._key(key)} {item}" for key, item in zip(keys, items)]
            return None if None in items else '"{" ' + ' "," '.join(pairs) + ' "}"'
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
                f"GKEY: {_KEY}",
                'garray: "[" (gvalue ("," gvalue)*)? "]"',
            ]
        return "gvalue"

    def arguments(self, parameters: dict, tool: str) -> str:
        """The arguments of `tool`: an object of its `parameters`, which its $refs point into."""
        self.root, self.tool, self.shared = parameters, tool, {}
        return self.value({"type": "object", **parameters})

    def value(self, schema) -> str:
        """An expression for a value of `schema`."""
        if not isinstance(schema, dict):
            return self.any_value()
        schema = {key: value for key, value in schema.items() if key not in _ANNOTATIONS}
        if not schema:
            return self.any_value()
        if schema.get("nullable") is True:
            return f'({self.value({k: v for k, v in schema.items() if k != "nullable"})} | "null")'
        if "$ref" in schema or "allOf" in schema or len(schema) > 1 and ("anyOf" in schema or "oneOf" in schema):
            return self._shared(schema)
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

    def _shared(self, schema: dict) -> str:
        """A schema holding $ref or allOf (or anyOf beside other keywords), without annotations: one rule, which a
        recursive schema refers to while it is being written."""
        if list(schema) == ["allOf"] and isinstance(schema["allOf"], list) and len(schema["allOf"]) == 1:
            return self.value(schema["allOf"][0])  # how pydantic describes a $ref
        key = json.dumps(schema, sort_keys=True, default=str)
        if key not in self.shared:
            name = self.shared[key] = self._name("r")
            if list(schema) == ["$ref"]:
                body = self.value(self._resolve(schema["$ref"]))
            else:
                try:
                    body = self.value(self._intersect(self._flatten(schema, frozenset())))
                except _CannotMerge:
                    body = self._any_object() if schema.get("type") == "object" else self.any_value()
            self.lines.append(f"{name}: {body}")
        return self.shared[key]

    def _resolve(self, ref) -> dict | bool:
        """The schema a local $ref (a JSON pointer: `#`, `#/$defs/Name`, ...) points to in the tool's parameters."""
        node = self.root if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")) else None
        for token in ref.split("/")[1:] if node is not None else ():
            token = unquote(token).replace("~1", "/").replace("~0", "~")
            if isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                node = node.get(token) if isinstance(node, dict) else None
        if not isinstance(node, (dict, bool)):
            raise ValueError(f"the $ref {ref!r} in the parameters of tool {self.tool!r} does not resolve (a $ref "
                             "must point into the parameters, such as #/$defs/Name)")
        return node

    def _flatten(self, schema, following: frozenset) -> list[dict]:
        """The parts whose intersection `schema` is, none holding $ref or allOf: its own keywords, then what its $ref
        points to and its allOf elements, flattened in turn (`following`: the $refs this one is inside)."""
        if schema is False:
            raise _CannotMerge("false")
        if not isinstance(schema, dict):
            return []
        own = {k: v for k, v in schema.items() if k not in _ANNOTATIONS and k not in ("$ref", "allOf")}
        parts = [own] if own else []
        if "$ref" in schema:
            target = self._resolve(schema["$ref"])
            if schema["$ref"] in following:  # a schema that is an allOf of itself
                raise _CannotMerge("$ref")
            parts += self._flatten(target, following | {schema["$ref"]})
        for element in schema["allOf"] if isinstance(schema.get("allOf"), list) else ():
            parts += self._flatten(element, following)
        return parts

    def _intersect(self, parts: list[dict]) -> dict:
        """One schema for what all flattened `parts` allow: an anyOf / oneOf becomes alternatives, each intersected
        with the other parts (those that contradict them left out); bounds take the tighter, types and enums the
        common values, required names all, patterns all (a list, which `_string` intersects), items and properties
        the allOf of theirs. Otherwise a keyword must have one value. _CannotMerge when the parts contradict."""
        for i, part in enumerate(parts):
            key = next((k for k in ("anyOf", "oneOf") if isinstance(part.get(k), list) and part[k]), None)
            if key:
                others = [*parts[:i], {k: v for k, v in part.items() if k != key}, *parts[i + 1:]]
                options = []
                for alternative in part[key]:
                    try:
                        options.append(self._intersect(others + self._flatten(alternative, frozenset())))
                    except _CannotMerge:
                        pass
                if not options:
                    raise _CannotMerge(key)
                return {"anyOf": options}
        merged = {}
        for part in parts:
            for key, value in part.items():
                if key in ("properties", "additionalProperties"):
                    continue
                old = merged.get(key, value)
                if old == value:
                    merged[key] = value
                elif key in _TIGHTER and all(isinstance(v, (int, float)) for v in (old, value)):
                    merged[key] = _TIGHTER[key](old, value)
                elif key == "type":
                    merged[key] = _common_types(old, value)
                elif key == "required":
                    merged[key] = [*old, *(name for name in value if name not in old)]
                elif key == "enum" and isinstance(old, list) and isinstance(value, list):
                    merged[key] = [v for v in old if v in value]
                    if not merged[key]:
                        raise _CannotMerge(key)
                elif key == "pattern":
                    merged[key] = [*_listed(old), *_listed(value)]
                elif key == "items":
                    merged[key] = {"allOf": [old, value]}
                else:
                    raise _CannotMerge(key)
        return {**merged, **_merged_properties(parts, merged.get("required", []))}

    def _string(self, schema: dict) -> str:
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if not isinstance(low, int) or isinstance(low, bool) or low < 0:
            low = 0
        if not isinstance(high, int) or isinstance(high, bool) or high < low:
            high = None
        regexes = [_TEXT]
        if low or high is not None:
            regexes.append(f"/(?s:.{{{low},{'' if high is None else high}}})/")
        if isinstance(schema.get("format"), str) and schema["format"] in _FORMATS:
            regexes.append(f"/{_FORMATS[schema['format']]}/")
        regexes += filter(None, map(_pattern, _listed(schema.get("pattern"))))
        return self.string(self.terminal(" & ".join(regexes)))

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
        """`{key:value,...}`: the declared properties in dictsort order, the required ones always, then the other keys
        additionalProperties allows (see the module's docstring)."""
        properties = dict(schema["properties"]) if isinstance(schema.get("properties"), dict) else {}
        required = schema.get("required")
        required = {name for name in required if isinstance(name, str)} if isinstance(required, list) else set()
        additional = schema.get("additionalProperties", not properties)
        if additional is True and not properties and not required:
            return self._any_object()
        if additional is not False:
            properties.update({name: additional for name in required - set(properties)})
        names = sorted(properties, key=_dictsort)
        pairs = [(f"{self._key(name)} {self.value(properties[name])}", name in required) for name in names]
        # first[i]: properties i.. when none is written yet; rest[i]: properties i.. after one was (a comma first);
        # both end with the other keys.
        first, rest = '""', '""'
        if additional is not False:
            other = self._other_pair(additional, names)
            first, rest = f'({other} ("," {other})*)?', f'("," {other})*'
        for pair, needed in reversed(pairs):
            pair_rule = self.rule(pair)
            new_rest = self.rule(f'"," {pair_rule} {rest}' + ("" if needed else f" | {rest}"))
            first = self.rule(f"{pair_rule} {rest}" + ("" if needed else f" | {first}"))
            rest = new_rest
        return f'"{{" {first} "}}"'

    def _other_pair(self, schema, declared: list[str]) -> str:
        """A rule for `key:value` with a value of `schema` and a key none of the `declared` names."""
        bare, text = _KEY, _TEXT
        if declared:
            other = "~(" + " | ".join(map(_quoted, declared)) + ")"
            bare, text = f"{bare} & {other}", f"{text} & {other}"
        key = f"({self.terminal(bare)} | {self.string(self.terminal(text))})"
        return self.rule(f'{key} ":" {self.value(schema)}')

    def _any_object(self) -> str:
        self.any_value()
        return "gobject"

    def _key(self, name: str) -> str:
        if _BARE_KEY.fullmatch(name):
            return _quoted(name + ":")
        return f'{self.string(_quoted(name))} ":"'


def _merged_properties(parts: list[dict], required: list) -> dict:
    """properties and additionalProperties of the intersection of `parts`: a property one part declares must be
    allowed by every other part (declared there too, or by its additionalProperties) and takes all their schemas."""
    declared = [part["properties"] if isinstance(part.get("properties"), dict) else {} for part in parts]
    others = [part.get("additionalProperties", True) for part in parts]
    properties = {}
    for name in dict.fromkeys(name for names in declared for name in names):
        schemas = [names[name] if name in names else other for names, other in zip(declared, others)]
        if any(schema is False for schema in schemas):
            if name in required:
                raise _CannotMerge(name)
            continue
        schemas = [schema for schema in schemas if schema is not True]
        properties[name] = schemas[0] if len(schemas) == 1 else {"allOf": schemas}
    merged = {"properties": properties} if properties else {}
    others = [other for other in others if other is not True]
    if others:
        merged["additionalProperties"] = (False if any(other is False for other in others)
                                          else others[0] if len(others) == 1 else {"allOf": others})
    return merged


def _common_types(first, second) -> str | list[str]:
    """The JSON types two `type` keywords both allow (an integer is a number)."""
    first, second = _listed(first), _listed(second)
    common = [t for t in first if t in second or t == "integer" and "number" in second]
    common += [t for t in second if t == "integer" and "number" in first and t not in common]
    if not common:
        raise _CannotMerge("type")
    return common[0] if len(common) == 1 else common


def _pattern(pattern) -> str | None:
    """A JSON schema's pattern as a Lark regex: found anywhere in the string, as JSON schema reads it, unless a leading
    `^` or a trailing `$` anchors it (llguidance's JSON compiler anchors every pattern at both ends instead). None
    for a pattern llguidance cannot read."""
    if not isinstance(pattern, str):
        return None
    at_start = pattern.startswith("^")
    body = pattern[at_start:]
    backslashes = len(body[:-1]) - len(body[:-1].rstrip("\\"))
    at_end = body.endswith("$") and backslashes % 2 == 0  # an escaped `$` is a dollar sign
    body = body[:len(body) - at_end]
    regex = ("" if at_start else "(?s:.*)") + f"(?:{body})" + ("" if at_end else "(?s:.*)")
    regex = f"/{llguidance.regex_to_lark(regex, 'dw')}/"  # \d and \w are ASCII in JSON schema's regexes
    return None if llguidance.LLMatcher.validate_grammar(f"start: T\nT: {regex}") else regex


def _listed(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def _dictsort(key: str):
    return key.lower(), key  # jinja's dictsort: case-insensitive


def _quoted(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def tool_call_grammar(tools: list[dict], call_start: int, call_end: int, string_delimiter: int,
                      name: str | None = None, parallel: bool = True) -> str:
    """A Lark grammar for one call (`parallel` False) or one or more calls of `tools` (OpenAI's
    {"type": "function", "function": {"name", "parameters"}}), or of the tool named `name` only. The token ids are
    those of `<|tool_call>`, `<tool_call|>` and `<|"|>`. ValueError for a tool name the syntax cannot carry and for a
    $ref that does not resolve."""
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
        arguments = grammar.arguments(parameters, function["name"]) if isinstance(parameters, dict) else '"{" "}"'
        calls.append(f'<[{call_start}]> {_quoted("call:" + function["name"])} {arguments} <[{call_end}]>')
    if not calls:
        raise ValueError(f"no tool named {name!r}" if name is not None else "no tools to call")
    return "\n".join([f"start: call{'+' if parallel else ''}", "call: " + " | ".join(calls), *grammar.lines]) + "\n"
