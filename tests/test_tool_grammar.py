"""The tool-call grammar (processing/tool_grammar.py) on the JSON-schema keywords real tool schemas use: $defs and
$ref (recursive too), allOf, Optional (anyOf with null), enums, pattern, format, additionalProperties. For each
schema: random walks through the grammar (any allowed token, as random weights sample) are calls that
`parse_tool_call_body` reads and whose arguments validate against the schema (formats checked); hand-written calls
breaking a keyword are refused by llguidance's matcher, and a hand-written valid one is accepted."""

from __future__ import annotations

import re
import string

import jsonschema
import numpy as np
import pytest

from test_structured_output import tokenizer, walk_grammar  # noqa: F401 (the fixture)

from gemma4.engine.structured import GrammarCompiler, StructuredOutputsParams
from gemma4.processing.tool_calls import parse_tool_call_body
from gemma4.processing.tool_grammar import tool_call_grammar

S = '<|"|>'  # the string delimiter, as text
CALL = "<|tool_call>call:f{}<tool_call|>"  # a call of the tool grammar_for declares, around its arguments

# As pydantic 2 writes a model with an enum, a nested model (a $ref beside a description), Optional fields, a
# pattern, a format and a recursive model; `legacy` as older pydantic versions describe a $ref (allOf of one
# element).
ORDER = {
    "$defs": {
        "Address": {"description": "Where.", "properties": {
            "zip": {"pattern": "^[0-9]{5}$", "title": "Zip", "type": "string"},
            "street": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}], "default": None}},
            "required": ["zip"], "title": "Address", "type": "object"},
        "Color": {"enum": ["red", "green"], "title": "Color", "type": "string"},
        "Node": {"properties": {
            "label": {"maxLength": 3, "title": "Label", "type": "string"},
            "children": {"items": {"$ref": "#/$defs/Node"}, "maxItems": 2, "title": "Children", "type": "array"}},
            "required": ["label"], "title": "Node", "type": "object"}},
    "properties": {
        "id": {"format": "uuid", "title": "Id", "type": "string"},
        "color": {"$ref": "#/$defs/Color", "default": "red"},
        "ship_to": {"$ref": "#/$defs/Address", "description": "shipping address"},
        "bill_to": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}], "default": None},
        "legacy": {"allOf": [{"$ref": "#/$defs/Color"}], "description": "the old way"},
        "tree": {"$ref": "#/$defs/Node"},
        "n": {"anyOf": [{"maximum": 9, "minimum": 0, "type": "integer"}, {"type": "null"}], "default": None}},
    "required": ["id", "ship_to", "tree", "legacy"], "title": "Order", "type": "object"}
UUID = "123e4567-e89b-12d3-a456-426614174000"
ORDER_ARGS = (f"id:{S}{UUID}{S},legacy:{S}green{S},ship_to:{{zip:{S}12345{S}}},"
              f"tree:{{children:[{{label:{S}b{S}}}],label:{S}a{S}}}")

FORMATS = {"at": "date-time", "day": "date", "host": "hostname", "ip": "ipv4", "mail": "email", "time": "time"}
DATES = {"at": "2024-02-29T23:59:59.5+01:00", "day": "2000-02-29", "host": "a-1.example", "ip": "10.0.255.1",
         "mail": "a.b+c@x.org", "time": "08:00:00Z"}


def strings(values: dict) -> str:
    """Arguments of these string values, in the order the grammar writes them."""
    return "{" + ",".join(f"{name}:{S}{values[name]}{S}" for name in sorted(values)) + "}"


# (id, parameters, arguments the grammar takes, arguments it refuses: each breaks one keyword)
CASES = [
    ("pydantic", ORDER, "{" + ORDER_ARGS + "}", [
        "{" + ORDER_ARGS.replace("12345", "1234") + "}",  # pattern
        "{" + ORDER_ARGS.replace("green", "blue") + "}",  # enum behind allOf and $ref
        "{" + ORDER_ARGS.replace("e89b-", "e89b") + "}",  # format uuid
        "{" + ORDER_ARGS.replace(f"{{label:{S}b{S}}}", "{children:[]}") + "}",  # required, two levels down
        f"{{bill_to:{{street:{S}x{S}}}," + ORDER_ARGS + "}",  # required behind anyOf
        "{" + ORDER_ARGS.replace("ship_to:{", "ship_to:{street:7,") + "}"]),  # Optional string or null
    ("refs", {  # definitions beside $defs, a JSON pointer, the root itself (a linked list)
        "type": "object", "definitions": {"Unit": {"enum": ["cm", "in"]}},
        "$defs": {"Size": {"type": "integer", "minimum": 1, "maximum": 3}},
        "properties": {"unit": {"$ref": "#/definitions/Unit"}, "size": {"$ref": "#/$defs/Size"},
                       "again": {"$ref": "#/properties/size"}, "next": {"$ref": "#"}},
        "required": ["unit"]},
        f"{{next:{{next:{{unit:{S}in{S}}},size:3,unit:{S}cm{S}}},unit:{S}cm{S}}}",
        [f"{{next:{{next:{{}},unit:{S}cm{S}}},unit:{S}cm{S}}}", f"{{unit:{S}mm{S}}}", f"{{again:4,unit:{S}in{S}}}"]),
    ("allOf", {  # an object extending another, bounds from two parts, types of two parts
        "$defs": {"Base": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0}},
                           "required": ["id"]}},
        "type": "object", "properties": {
            "item": {"allOf": [{"$ref": "#/$defs/Base"}, {"properties": {"ok": {"type": "boolean"},
                                                                       "id": {"maximum": 5}}, "required": ["ok"]}]},
            "num": {"allOf": [{"type": "number", "maximum": 2}, {"type": "integer", "minimum": -2}]},
            "text": {"type": "string", "allOf": [{"maxLength": 4}, {"pattern": "^a"}, {"pattern": "b$"}]}},
        "required": ["item", "num"]},
        f"{{item:{{id:5,ok:true}},num:-2,text:{S}ab{S}}}",
        ["{item:{id:6,ok:true},num:0}", "{item:{id:1},num:0}", "{item:{id:1,ok:true},num:1.5}",
         f"{{item:{{id:1,ok:true}},num:0,text:{S}aaaab{S}}}", f"{{item:{{id:1,ok:true}},num:0,text:{S}ba{S}}}"]),
    ("optional", {  # Optional fields, OpenAPI's nullable, an anyOf beside other keywords
        "type": "object", "properties": {
            "a": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]},
            "b": {"type": "boolean", "nullable": True},
            "c": {"type": "string", "maxLength": 3, "anyOf": [{"pattern": "^x"}, {"const": "yes"}]}},
        "required": ["a", "b", "c"]},
        f"{{a:null,b:null,c:{S}yes{S}}}",
        [f"{{a:{S}1{S},b:null,c:{S}xy{S}}}", f"{{a:1,b:1,c:{S}xy{S}}}", f"{{a:1,b:true,c:{S}no{S}}}",
         f"{{a:1,b:true,c:{S}xyzw{S}}}"]),
    ("enums", {  # enums and consts of every JSON type
        "type": "object", "properties": {
            "any": {"enum": [{"k": [1, "two"], "A": None}, [1.5, True], None, 3, "s"]},
            "obj": {"const": {"b": {}, "a": []}}},
        "required": ["any", "obj"]},
        f"{{any:{{A:null,k:[1,{S}two{S}]}},obj:{{a:[],b:{{}}}}}}",
        [f"{{any:[1.5],obj:{{a:[],b:{{}}}}}}", f"{{any:4,obj:{{a:[],b:{{}}}}}}", "{any:3,obj:{b:{}}}"]),
    ("formats", {
        "type": "object", "properties": {name: {"type": "string", "format": fmt} for name, fmt in FORMATS.items()},
        "required": list(FORMATS)},
        strings(DATES), [strings({**DATES, name: value}) for name, value in [
            ("at", "2024-02-29 23:59:59Z"), ("day", "1900-02-29"), ("day", "2001-04-31"), ("ip", "1.2.3.256"),
            ("mail", "a.b"), ("time", "08:00:00")]]),  # (jsonschema cannot check host names)
    ("patterns", {  # unanchored, a pattern may be anywhere in the string; a pattern may allow `<`
        "type": "object", "properties": {"code": {"type": "string", "pattern": r"^[A-Z]{2}-\d{2}$"},
                                         "tag": {"type": "string", "pattern": "^<[a-z|]{1,3}>$"},
                                         "has": {"type": "string", "pattern": "[0-9]x|y\\$", "maxLength": 5}},
        "required": ["code", "tag", "has"]},
        f"{{code:{S}AB-12{S},has:{S}a1xb{S},tag:{S}<a|b>{S}}}",
        [f"{{code:{S}AB-1{S},has:{S}1x{S},tag:{S}<x>{S}}}", f"{{code:{S}ab-12{S},has:{S}1x{S},tag:{S}<x>{S}}}",
         f"{{code:{S}AB-12{S},has:{S}ax1{S},tag:{S}<x>{S}}}", f"{{code:{S}AB-12{S},has:{S}y{S},tag:{S}<x>{S}}}"]),
    ("additionalProperties", {  # false, a schema (values and keys that are not the declared ones), true, a map
        "type": "object", "properties": {
            "closed": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                       "additionalProperties": False},
            "default": {"type": "object", "properties": {"a": {"type": "boolean"}}},
            "typed": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 3}},
                      "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9}, "required": ["n"]},
            "open": {"type": "object", "properties": {"a": {"type": "boolean"}}, "additionalProperties": True},
            "map": {"type": "object", "additionalProperties": {"type": "boolean"}}},
        "additionalProperties": False, "required": ["typed"]},
        f"{{closed:{{a:1}},map:{{x:true,{S}a b{S}:false}},open:{{b:[{S}x{S}]}},typed:{{n:1,name:{S}ab{S},z:0}}}}",
        ["{typed:{n:1},other:1}", "{closed:{b:1},typed:{n:1}}",
         f"{{typed:{{n:{S}1{S}}}}}", "{typed:{name:1,n:1}}", f"{{typed:{{{S}name{S}:1,n:1}}}}", "{typed:{}}",
         "{map:{x:1},typed:{n:1}}"]),
]


def _nullable_type(validator, types, instance, schema):
    """`type`, where OpenAPI's nullable also allows null."""
    if not (instance is None and schema.get("nullable") is True):
        yield from jsonschema.Draft202012Validator.VALIDATORS["type"](validator, types, instance, schema)


Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"type": _nullable_type})


@pytest.fixture(scope="module")
def compiler(tokenizer):  # noqa: F811
    return GrammarCompiler(tokenizer)


@pytest.fixture(scope="module")
def closing(tokenizer):  # noqa: F811
    """walk_grammar's preference that ends open text and keys: special tokens (the closing delimiter), then ASCII
    punctuation other than opening brackets (`:` after a key, `@`, `.`; all past id 50,000, where walk_grammar
    rarely goes)."""
    closing = np.zeros(tokenizer.backend.get_vocab_size(), dtype=np.int8)
    closing[[i for text, i in tokenizer.backend.get_vocab().items()
             if len(text) == 1 and text in string.punctuation and text not in "{[("]] = 1
    closing[list(tokenizer.special_ids)] = 2
    return closing


def grammar_for(tokenizer, parameters) -> str:  # noqa: F811
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    return tool_call_grammar([tool], tokenizer.tool_call_start_id, tokenizer.tool_call_end_id,
                             tokenizer.string_delimiter_id, parallel=False)


def takes(compiler, tokenizer, grammar: str, text: str) -> bool:  # noqa: F811
    """Whether the grammar takes the whole of `text` (special tokens written as their text)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    syntax = {tokenizer.tool_call_start_id, tokenizer.tool_call_end_id, tokenizer.string_delimiter_id}
    # Text spelling a special token (`<a>` is one) would be read as it, which no string of the grammar holds.
    assert not any(compiler.tokenizer.is_special_token(i) for i in set(ids) - syntax), text
    matcher = compiler.compile(StructuredOutputsParams(grammar=grammar)).deep_copy()
    return matcher.consume_tokens(ids) and matcher.is_accepting()


@pytest.mark.parametrize("parameters, good, bad", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_calls_validate_and_breaking_a_keyword_is_refused(compiler, tokenizer, closing, parameters, good,  # noqa: F811
                                                          bad):
    grammar = grammar_for(tokenizer, parameters)
    validator = Validator(parameters, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    rng = np.random.default_rng(25)
    for _ in range(8):
        text = tokenizer.decode(walk_grammar(compiler, grammar, rng, prefer=closing), skip_special_tokens=False)
        assert text.startswith("<|tool_call>") and text.endswith("<tool_call|>"), text
        [(name, arguments)] = parse_tool_call_body(text[len("<|tool_call>"):-len("<tool_call|>")])
        assert name == "f"
        validator.validate(arguments)
    validator.validate(parse_tool_call_body("call:f" + good)[0][1])
    assert takes(compiler, tokenizer, grammar, CALL.format(good))
    for arguments in bad:
        assert not validator.is_valid(parse_tool_call_body("call:f" + arguments)[0][1]), arguments
        assert not takes(compiler, tokenizer, grammar, CALL.format(arguments)), arguments


def test_a_pattern_llguidance_cannot_read_is_not_enforced(compiler, tokenizer):  # noqa: F811
    grammar = grammar_for(tokenizer, {"type": "object", "properties": {
        "p": {"type": "string", "pattern": "^(?=.*[0-9]).{2}$"}}, "required": ["p"]})
    assert takes(compiler, tokenizer, grammar, CALL.format(f"{{p:{S}ab{S}}}"))


def test_a_ref_that_does_not_resolve_names_itself(tokenizer):  # noqa: F811
    for ref in ("#/$defs/Missing", "other.json#/x", "#/properties/a/items"):
        with pytest.raises(ValueError, match=re.escape(f"the $ref '{ref}' in the parameters of tool 'f' does not")):
            grammar_for(tokenizer, {"type": "object", "$defs": {}, "properties": {"a": {"$ref": ref}}})


def test_parts_that_cannot_be_intersected_take_any_value(compiler, tokenizer):  # noqa: F811
    """No common type; a required property another part forbids."""
    grammar = grammar_for(tokenizer, {"type": "object", "properties": {
        "a": {"allOf": [{"type": "string"}, {"type": "integer"}]},
        "b": {"type": "object", "allOf": [{"properties": {"x": {"type": "integer"}}, "required": ["x"]},
                                          {"properties": {"y": {}}, "additionalProperties": False}]}},
        "required": ["a", "b"]})
    assert takes(compiler, tokenizer, grammar, CALL.format(f"{{a:[{S}z{S}],b:{{z:1}}}}"))
    assert not takes(compiler, tokenizer, grammar, CALL.format("{a:1,b:1}"))  # b's type still holds


def test_beyond_the_schema_no_delimiter_in_text_and_no_undeclared_keys(compiler, tokenizer):  # noqa: F811
    """Where the schema would allow them: a string never holds `<|` (the parser would read a delimiter), and an
    object with declared properties and no additionalProperties takes no other keys."""
    grammar = grammar_for(tokenizer, {"type": "object", "properties": {
        "tag": {"type": "string", "pattern": "^<[a-z|]{1,3}>$"}, "obj": {"properties": {"a": {"type": "boolean"}}}}})
    assert takes(compiler, tokenizer, grammar, CALL.format(f"{{obj:{{a:true}},tag:{S}<a|>{S}}}"))
    assert not takes(compiler, tokenizer, grammar, CALL.format(f"{{tag:{S}<|a>{S}}}"))
    assert not takes(compiler, tokenizer, grammar, CALL.format("{obj:{a:true,b:true}}"))
