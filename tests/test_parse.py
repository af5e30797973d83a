"""One-shot response parsing: literal model outputs -> expected messages; equality with transformers."""

import json
import logging

import pytest

from gemma4.processing.parse import parse_response, to_openai_tool_calls
from gemma4.processing.tool_calls import ArgumentSyntaxError, parse_arguments, parse_tool_call_body

S = '<|"|>'


def msg(content=None, reasoning=None, calls=()):
    return {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": [
            {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}
            for i, (name, args) in enumerate(calls)
        ],
    }


def parse(text, **kwargs):
    return parse_response(text, make_id=lambda i: f"call_{i}", **kwargs)


# Well-formed outputs: the reference parser must agree.
CLEAN = {
    "plain": ("Hello there!<turn|>", msg("Hello there!")),
    "plain_eos": ("Bye.<eos>", msg("Bye.")),
    "no_end_marker": ("Cut at max tokens", msg("Cut at max tokens")),
    "whitespace_trimmed": ("\n\n  Answer with  inner  spaces \n\n<turn|>", msg("Answer with  inner  spaces")),
    "thinking": ("<|channel>thought\nLet me think.\nStep 2.<channel|>The answer is 4.<turn|>",
                 msg("The answer is 4.", "Let me think.\nStep 2.")),
    "empty_thought": ("<|channel>thought\n<channel|>Direct answer<turn|>", msg("Direct answer")),
    "single_call": (f"<|tool_call>call:get_weather{{city:{S}Paris{S}}}<tool_call|><|tool_response>",
                    msg(calls=[("get_weather", {"city": "Paris"})])),
    "typed_values": (
        f"<|tool_call>call:f{{n:1,neg:-2,x:2.5,e:1e3,ok:true,no:false,z:null,s:{S}42{S}}}<tool_call|>",
        msg(calls=[("f", {"n": 1, "neg": -2, "x": 2.5, "e": 1000.0, "ok": True, "no": False, "z": None, "s": "42"})]),
    ),
    "nested": (
        f"<|tool_call>call:book{{route:{{from:{S}LHR{S},to:{S}CDG{S}}},pax:[{{name:{S}Ann{S},age:30}},{{name:{S}Bo{S},age:5}}],tags:[],opts:{{}}}}<tool_call|>",
        msg(calls=[("book", {"route": {"from": "LHR", "to": "CDG"}, "pax": [{"name": "Ann", "age": 30}, {"name": "Bo", "age": 5}], "tags": [], "opts": {}})]),
    ),
    "no_arguments": ("<|tool_call>call:get_time{}<tool_call|><|tool_response>", msg(calls=[("get_time", {})])),
    "two_calls": (
        f"<|tool_call>call:a{{x:1}}<tool_call|><|tool_call>call:b{{y:[1,2]}}<tool_call|><|tool_response>",
        msg(calls=[("a", {"x": 1}), ("b", {"y": [1, 2]})]),
    ),
    "thinking_then_call": (
        f"<|channel>thought\nNeed weather.<channel|><|tool_call>call:get_weather{{city:{S}Rome{S}}}<tool_call|><|tool_response>",
        msg(None, "Need weather.", [("get_weather", {"city": "Rome"})]),
    ),
    "content_then_call": (
        f"Let me check.<|tool_call>call:lookup{{q:{S}x{S}}}<tool_call|><|tool_response>",
        msg("Let me check.", calls=[("lookup", {"q": "x"})]),
    ),
    "string_with_structure_chars": (
        f"<|tool_call>call:echo{{text:{S}a, b: {{c}} [d] \"e\" 'f' \\n{S}}}<tool_call|>",
        msg(calls=[("echo", {"text": "a, b: {c} [d] \"e\" 'f' \\n"})]),
    ),
    "unicode": (
        f"<|channel>thought\nРассуждение 🤔<channel|>答案是 42 😀<turn|>",
        msg("答案是 42 😀", "Рассуждение 🤔"),
    ),
    "unicode_args": (
        f"<|tool_call>call:translate{{text:{S}héllo wörld 你好 👍🏽{S},to:{S}日本語{S}}}<tool_call|>",
        msg(calls=[("translate", {"text": "héllo wörld 你好 👍🏽", "to": "日本語"})]),
    ),
    "multiline_string": (
        f"<|tool_call>call:write{{path:{S}a.py{S},body:{S}def f():\n    return 1\n{S}}}<tool_call|>",
        msg(calls=[("write", {"path": "a.py", "body": "def f():\n    return 1\n"})]),
    ),
    "markdown_content": ("# Title\n\n```python\nprint('<b>')\n```\n- item<turn|>", msg("# Title\n\n```python\nprint('<b>')\n```\n- item")),
}

# Beyond the reference: drifted, truncated and odd outputs, with the result we want.
LENIENT = {
    "no_call_prefix": (f"<|tool_call>get_weather{{city:{S}Oslo{S}}}<tool_call|>", msg(calls=[("get_weather", {"city": "Oslo"})])),
    "parentheses_kwargs": (f"<|tool_call>call:get_weather(city={S}Oslo{S}, days=3)<tool_call|>",
                           msg(calls=[("get_weather", {"city": "Oslo", "days": 3})])),
    "parentheses_object": ("<|tool_call>get_weather({city: \"Oslo\"})<tool_call|>", msg(calls=[("get_weather", {"city": "Oslo"})])),
    "json_quoted_keys": ('<|tool_call>call:f{"a": "x", "b": [1, {"c": true}], "d": null}<tool_call|>',
                         msg(calls=[("f", {"a": "x", "b": [1, {"c": True}], "d": None})])),
    "openai_style_json": ('<|tool_call>{"name": "f", "arguments": {"a": 1}}<tool_call|>', msg(calls=[("f", {"a": 1})])),
    "spaces_everywhere": (f"<|tool_call> call: f {{ a : 1 , b : {S}x{S} , }} <tool_call|>", msg(calls=[("f", {"a": 1, "b": "x"})])),
    "bare_words": ("<|tool_call>call:f{unit:celsius,flag:True,zip:01234,name:New York}<tool_call|>",
                   msg(calls=[("f", {"unit": "celsius", "flag": True, "zip": "01234", "name": "New York"})])),
    "missing_close_complete_args": (f"<|tool_call>call:f{{a:{S}x{S}}}", msg(calls=[("f", {"a": "x"})])),
    "missing_close_before_next_call": ("<|tool_call>call:a{x:1}<|tool_call>call:b{}<tool_call|>", msg(calls=[("a", {"x": 1}), ("b", {})])),
    "missing_close_before_response": ("<|tool_call>call:a{x:1}<|tool_response>", msg(calls=[("a", {"x": 1})])),
    "bare_name_closed": ("<|tool_call>call:get_time<tool_call|>", msg(calls=[("get_time", {})])),
    "hyphen_dot_names": ("<|tool_call>call:ns.get-thing{}<tool_call|>", msg(calls=[("ns.get-thing", {})])),
    "unterminated_thought_truncated": ("<|channel>thought\nstill thinking about", msg(None, "still thinking about")),
    "unterminated_thought_finished": ("<|channel>thought\nThe answer is 4.<turn|>",
                                      msg("The answer is 4.", "The answer is 4.")),
    "unterminated_thought_then_call": (f"<|channel>thought\nneed data<|tool_call>call:f{{a:1}}<tool_call|>",
                                       msg(None, "need data", [("f", {"a": 1})])),
    "text_after_turn_end_ignored": ("Done.<turn|>\n<|turn>user\nfake", msg("Done.")),
    "stray_markers_dropped": ("<channel|>Answer<tool_call|><turn|>", msg("Answer")),
    "thoughtful_not_a_name": ("<|channel>thoughtful remark<channel|>ok", msg("ok", "thoughtful remark")),
    "two_thought_channels": ("<|channel>thought\nA<channel|>x<|channel>thought\nB<channel|>y", msg("xy", "A\nB")),
    "empty": ("", msg()),
    "only_end": ("<turn|>", msg()),
}

# Calls that cannot be read: kept as content, with a warning.
UNREADABLE = {
    "truncated_string": (f"<|tool_call>call:f{{a:{S}hel", f"<|tool_call>call:f{{a:{S}hel"),
    "truncated_object": ("Sure. <|tool_call>call:f{a:1,b:", "Sure. <|tool_call>call:f{a:1,b:"),
    "truncated_name": ("<|tool_call>call:get_wea", "<|tool_call>call:get_wea"),
    "garbage": ("<|tool_call>call:f{a:1}} extra<tool_call|>", "<|tool_call>call:f{a:1}} extra"),
}


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_clean_outputs(name):
    text, expected = CLEAN[name]
    assert parse(text) == expected


@pytest.mark.parametrize("name", sorted(LENIENT))
def test_lenient_outputs(name):
    text, expected = LENIENT[name]
    assert parse(text) == expected


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_unreadable_calls_become_content(name, caplog):
    text, content = UNREADABLE[name]
    with caplog.at_level(logging.WARNING, logger="gemma4.processing.stream_parse"):
        result = parse(text)
    assert result == msg(content)
    assert "returned as content" in caplog.text


def test_complete_flag_for_stripped_stop_token():
    assert parse("<|channel>thought\nAnswer: 4") == msg(None, "Answer: 4")
    assert parse("<|channel>thought\nAnswer: 4", complete=True) == msg("Answer: 4", "Answer: 4")
    assert parse("Plain", complete=True) == msg("Plain")


def _normalize_reference(message):
    """transformers omits empty fields and ids; compare on the fields both have."""
    return {
        "role": message["role"],
        "content": message.get("content") or None,
        "reasoning_content": message.get("reasoning_content") or None,
        "tool_calls": [{"type": c["type"], "function": c["function"]} for c in message.get("tool_calls", [])],
    }


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_clean_outputs_match_transformers(name):
    pytest.importorskip("transformers")
    from transformers.cli.serving.utils import _RESPONSE_TEMPLATE_FALLBACKS
    from transformers.utils.chat_parsing import parse_response as reference_parse

    template = next(t for types, t in _RESPONSE_TEMPLATE_FALLBACKS.items() if "gemma4" in types)
    text, _ = CLEAN[name]
    ours = parse(text)
    for call in ours["tool_calls"]:
        del call["id"]
    assert ours == _normalize_reference(reference_parse(text, template, prefix=""))
    # The reference also reads the prompt's pre-written empty thought channel; so do we.
    prefix = "<bos><|turn>user\nhi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    assert _normalize_reference(reference_parse(text, template, prefix=prefix)) == ours


def test_ids_are_unique_by_default():
    text = "<|tool_call>call:a{}<tool_call|><|tool_call>call:b{}<tool_call|>"
    ids = [c["id"] for c in parse_response(text)["tool_calls"]]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)


def test_openai_helpers():
    parsed = parse(f"<|channel>thought\nr<channel|>hi<|tool_call>call:f{{a:{S}é{S},n:[1.5,null]}}<tool_call|>")
    calls = to_openai_tool_calls(parsed["tool_calls"])
    assert calls == [{"id": "call_0", "type": "function", "function": {"name": "f", "arguments": '{"a": "é", "n": [1.5, null]}'}}]
    assert json.loads(calls[0]["function"]["arguments"]) == parsed["tool_calls"][0]["function"]["arguments"]


def test_argument_parser_directly():
    assert parse_arguments(f"{{a:{S}x{S},b:{{c:[true,false,null]}}}}") == {"a": "x", "b": {"c": [True, False, None]}}
    assert parse_tool_call_body("call:f{a:1}call:g{}") == [("f", {"a": 1}), ("g", {})]
    for bad in ["{a:1", "{a:}", "{:1}", f"{{a:{S}x}}", "{a:1} tail", "[1]"]:
        with pytest.raises(ArgumentSyntaxError):
            parse_arguments(bad)
    with pytest.raises(ArgumentSyntaxError):
        parse_tool_call_body("call:get_time", terminated=False)
