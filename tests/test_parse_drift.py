"""Drifted outputs and outputs that continue the prompt: what is repaired, what stays content.

Every case is checked one-shot, streamed in two chunks split at every index, and streamed char by char.
"""

import logging

import pytest
from test_parse import msg
from test_stream_parse import check_every_chunking, strings
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from gemma4.processing.processor import Processor
from gemma4.processing.stream_parse import generation_prefix
from gemma4.processing.tokenizer import Tokenizer

S = '<|"|>'
WEATHER = [("get_weather", {"city": "Oslo"})]

# Calls whose string delimiters drifted: repaired only where the reading is unambiguous.
STRINGS = {
    # 1. The opening delimiter dropped (SGLang documents this drift).
    "open_dropped": (f"<|tool_call>call:search{{query:weather in Tokyo{S}}}<tool_call|>",
                     msg(calls=[("search", {"query": "weather in Tokyo"})])),
    "open_dropped_then_more": (f"<|tool_call>call:search{{query:weather in Tokyo{S}, n:3}}<tool_call|>",
                               msg(calls=[("search", {"query": "weather in Tokyo", "n": 3})])),
    "open_dropped_stays_text": (f"<|tool_call>call:f{{zip:01234{S},flag:true{S}}}<tool_call|>",
                                msg(calls=[("f", {"zip": "01234", "flag": "true"})])),
    "open_dropped_in_array": (f"<|tool_call>call:f{{tags:[a b{S},{S}c{S}]}}<tool_call|>",
                              msg(calls=[("f", {"tags": ["a b", "c"]})])),
    "open_dropped_no_close_marker": (f"<|tool_call>call:search{{query:Tokyo{S}}}", msg(calls=[("search", {"query": "Tokyo"})])),
    # 5. The closing delimiter dropped right before the arguments' `}`, in a call that visibly ended.
    "close_dropped": (f"<|tool_call>call:f{{a:{S}hello}}<tool_call|>", msg(calls=[("f", {"a": "hello"})])),
    "close_dropped_turn_end": (f"<|tool_call>call:f{{n:1,a:{S}hello world: yes}}<turn|>",
                               msg(calls=[("f", {"n": 1, "a": "hello world: yes"})])),
    "close_dropped_next_call": (f"<|tool_call>call:f{{a:{S}x}}<|tool_call>call:g{{}}<tool_call|>",
                                msg(calls=[("f", {"a": "x"}), ("g", {})])),
}

# Calls that cannot be read without guessing: returned as content, delimiters and all.
AMBIGUOUS = {
    "open_dropped_comma_inside": f"<|tool_call>call:search{{query:weather, in Tokyo{S}}}",
    "delimiter_mid_value": f"<|tool_call>call:search{{query:a{S}b{S}}}",
    "delimiter_in_quoted_string": f"<|tool_call>call:f{{a:'x{S}y'}}",
    "delimiter_in_json_string": '<|tool_call>call:f{a:"x<|\\"|>y"}',
    "delimiter_in_json_arguments": '<|tool_call>{"name": "f", "arguments": "{\\"a\\": \\"<|\\\\\\"|>\\"}"}',
    "close_dropped_comma_inside": f"<|tool_call>call:f{{a:{S}x,b:1}}",
    "close_dropped_brace_inside": f"<|tool_call>call:f{{code:{S}if x {{y}}",
    "close_dropped_in_array": f"<|tool_call>call:f{{a:[{S}x}}",
}


@pytest.mark.parametrize("name", sorted(STRINGS))
def test_string_delimiter_drift(name):
    text, expected = STRINGS[name]
    check_every_chunking(text, expected)


@pytest.mark.parametrize("name", sorted(AMBIGUOUS))
def test_ambiguous_strings_become_content(name, caplog):
    text = AMBIGUOUS[name]
    with caplog.at_level(logging.WARNING, logger="gemma4.processing.stream_parse"):
        check_every_chunking(text + "<tool_call|>", msg(text))
    assert "returned as content" in caplog.text


def test_close_dropped_needs_a_visible_end():
    """A cut-off string may have gone on past the `}`: repaired only when the turn visibly ended."""
    text = f"<|tool_call>call:f{{a:{S}hello}}"
    check_every_chunking(text, msg(text))
    check_every_chunking(text, msg(calls=[("f", {"a": "hello"})]), complete=True)


def test_complete_finishes_an_open_call():
    check_every_chunking("<|tool_call>call:get_time", msg("<|tool_call>call:get_time"))
    check_every_chunking("<|tool_call>call:get_time", msg(calls=[("get_time", {})]), complete=True)


# 6. Text the parser cannot interpret is returned as content, never dropped.
KEPT = {
    "stray_delimiter": (f"Write {S} around strings.", msg(f"Write {S} around strings.")),
    "unknown_channel_name": ("<|channel>analysis\nA<channel|>B", msg("B", "analysis\nA")),
    "call_in_thought_unreadable": ("<|channel>thought\nR<|tool_call>call:f{a:<turn|>", msg("<|tool_call>call:f{a:", "R")),
    "bare_call_unreadable_then_answer": ("<channel|>call:f{a:1}}<tool_call|>Answer", msg("call:f{a:1}}Answer")),
}


@pytest.mark.parametrize("name", sorted(KEPT))
def test_unreadable_text_is_content(name):
    text, expected = KEPT[name]
    check_every_chunking(text, expected)


def test_no_delimiter_in_any_value():
    for text, expected in STRINGS.values():
        for call in expected["tool_calls"]:
            assert not any(S in s for s in strings(call["function"]["arguments"]))


# 3. A channel opened inside an open channel; 4. a call right after `<channel|>` without `<|tool_call>`.
CHANNELS = {
    "nested_channel": ("<|channel>thought\nA<|channel>thought\nB<channel|>C", msg("C", "A\nB")),
    "nested_nameless_channel": ("<|channel>thought\nA <|channel>B<channel|>C<turn|>", msg("C", "A \nB")),
    "nested_unterminated": ("<|channel>thought\nA<|channel>thought\nB<turn|>", msg("A\nB", "A\nB")),
    "bare_call": (f"<|channel>thought\nNeed it.<channel|>call:get_weather{{city:{S}Oslo{S}}}<tool_call|><|tool_response>",
                  msg(None, "Need it.", WEATHER)),
    "bare_call_at_end": (f"<|channel>thought\nr<channel|>\ncall:get_weather{{city:{S}Oslo{S}}}", msg(None, "r", WEATHER)),
    "bare_call_turn_end": (f"<|channel>thought\nr<channel|>call:get_weather{{city:{S}Oslo{S}}}<turn|>", msg(None, "r", WEATHER)),
    "bare_call_then_call": ("<channel|>call:f{a:1}<|tool_call>call:g{}<tool_call|>", msg(calls=[("f", {"a": 1}), ("g", {})])),
    "bare_call_then_text": ("<|channel>thought\nr<channel|>call:f{a:1} and more", msg("call:f{a:1} and more", "r")),
    "bare_two_calls": ("<channel|>call:f{a:1}call:g{}<tool_call|>", msg("call:f{a:1}call:g{}")),
    "bare_call_parentheses": ("<channel|>call:f(a=1)<tool_call|>", msg("call:f(a=1)")),
    "bare_call_cut_off": ("<channel|>call:f{a:", msg("call:f{a:")),
    "call_as_a_word": ("<|channel>thought\nr<channel|>call me: now", msg("call me: now", "r")),
    "call_colon_text": ("<channel|>call: 555-0100<turn|>", msg("call: 555-0100")),
    "call_not_first": ("<channel|>Recall: call:f{a:1}", msg("Recall: call:f{a:1}")),
    "call_without_channel_close": ("call:f{a:1}", msg("call:f{a:1}")),
}


@pytest.mark.parametrize("name", sorted(CHANNELS))
def test_channel_drift(name):
    text, expected = CHANNELS[name]
    check_every_chunking(text, expected)


# 2. Text that continues the prompt: the prompt's end sets the starting state; its earlier turns never show.
USER = "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nWeather in Oslo?<turn|>\n"
EARLIER = (f"{USER}<|turn>model\n<|channel>thought\nEarlier plan.<channel|>Earlier text."
           f"<|tool_call>call:get_weather{{city:{S}Paris{S}}}<tool_call|>"
           f"<|tool_response>response:get_weather{{temp:21}}<tool_response|>")
PROMPTS = {
    "open_thought": (USER + "<|turn>model\n<|channel>thought\n", "Check.<channel|>Sunny.<turn|>", msg("Sunny.", "Check.")),
    "open_thought_after_tool_response": (EARLIER + "<|channel>thought\n", "Got 21.<channel|>It is 21C.<turn|>",
                                         msg("It is 21C.", "Got 21.")),
    "open_thought_then_call": (EARLIER + "<|channel>thought\n",
                               f"Oslo too.<channel|><|tool_call>call:get_weather{{city:{S}Oslo{S}}}<tool_call|>",
                               msg(None, "Oslo too.", WEATHER)),
    "open_thought_bare_call": (EARLIER + "<|channel>thought\n", f"Oslo too.<channel|>call:get_weather{{city:{S}Oslo{S}}}",
                               msg(None, "Oslo too.", WEATHER)),
    "open_channel_no_name": (USER + "<|turn>model\n<|channel>", "thought\nCheck.<channel|>Sunny.", msg("Sunny.", "Check.")),
    "after_tool_response": (EARLIER, "It is 21C.<turn|>", msg("It is 21C.")),
    "closed_empty_thought": (USER + "<|turn>model\n<|channel>thought\n<channel|>", "Sunny.<turn|>", msg("Sunny.")),
    # Text the prompt began goes on with its whitespace (the two join as written).
    "thought_prefilled": (USER + "<|turn>model\n<|channel>thought\nLet me", " see.<channel|>Sunny.", msg("Sunny.", " see.")),
    "answer_prefilled": (USER + "<|turn>model\nHello, I am", " Gemma.<turn|>", msg(" Gemma.")),
    "forced_call": (USER + "<|turn>model\n<|tool_call>call:", f"get_weather{{city:{S}Oslo{S}}}<tool_call|><|tool_response>",
                    msg(calls=WEATHER)),
    "forced_named_call": (EARLIER + "<|tool_call>call:get_weather{", f"city:{S}Oslo{S}}}<tool_call|>", msg(calls=WEATHER)),
    "forced_call_unreadable": (USER + "<|turn>model\n<|tool_call>call:get_weather{", f"city:{S}Os",
                               msg(f"<|tool_call>call:get_weather{{city:{S}Os")),
    "only_the_tail": ("<|channel>thought\n", "Check.<channel|>Sunny.", msg("Sunny.", "Check.")),
    "no_model_turn": (USER, "Sunny.", msg("Sunny.")),
}


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_prompt_continuation(name):
    prefix, text, expected = PROMPTS[name]
    check_every_chunking(text, expected, prefix=prefix)
    # The whole prompt, or just its tail, leads to the same result.
    check_every_chunking(text, expected, prefix=generation_prefix(prefix))


def test_open_thought_prefix_finished_without_close():
    prefix = USER + "<|turn>model\n<|channel>thought\n"
    check_every_chunking("The answer is 4.", msg(None, "The answer is 4."), prefix=prefix)
    check_every_chunking("The answer is 4.", msg("The answer is 4.", "The answer is 4."), prefix=prefix, complete=True)


def test_generation_prefix():
    assert generation_prefix(USER + "<|turn>model\n") == ""
    assert generation_prefix(EARLIER + "<|channel>thought\n") == "<|channel>thought\n"
    assert generation_prefix(USER + "<|turn>model\n<|tool_call>call:f{") == "<|tool_call>call:f{"
    assert generation_prefix(USER) == "\n"
    assert generation_prefix("<|channel>thought\n") == "<|channel>thought\n"


def test_prompt_continuation_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.cli.serving.utils import _RESPONSE_TEMPLATE_FALLBACKS
    from transformers.utils.chat_parsing import parse_response as reference_parse

    from gemma4.processing.parse import parse_response

    template = next(t for types, t in _RESPONSE_TEMPLATE_FALLBACKS.items() if "gemma4" in types)
    for name in ("open_thought", "open_thought_after_tool_response", "after_tool_response", "closed_empty_thought",
                 "forced_call", "forced_named_call"):
        prefix, text, _ = PROMPTS[name]
        ours = parse_response(text, prefix=prefix)
        reference = reference_parse(text, template, prefix=prefix)
        assert ours["content"] == reference.get("content"), name
        assert ours["reasoning_content"] == reference.get("reasoning_content"), name
        assert [c["function"] for c in ours["tool_calls"]] == [c["function"] for c in reference.get("tool_calls", [])], name


# 7. transformers' method names on the tokenizer and the processor.
@pytest.fixture()
def tokenizer():
    specials = ["<pad>", "<eos>", "<bos>", "<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", '<|"|>', "<|turn>", "<turn|>"]
    vocab = {token: i for i, token in enumerate(specials + list("abcdefghijklmnopqrstuvwxyz{}:\n "))}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return Tokenizer(backend, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"})


def test_tokenizer_and_processor_parse_response(tokenizer):
    prompt = "<|turn>user\nhi<turn|>\n<|turn>model\n<|channel>thought\n"
    answer = f"sure<channel|>ok<|tool_call>call:f{{a:{S}x{S}}}<tool_call|>"
    expected = {"content": "ok", "reasoning_content": "sure", "function": {"name": "f", "arguments": {"a": "x"}}}
    ids = tokenizer.encode(answer, add_special_tokens=False)
    for parsed in (tokenizer.parse_response(answer, prefix=prompt),
                   tokenizer.parse_response(ids, prefix=tokenizer.encode(prompt, add_special_tokens=False)),
                   Processor(tokenizer).parse_response(ids, prefix=prompt)):
        assert {"content": parsed["content"], "reasoning_content": parsed["reasoning_content"],
                "function": parsed["tool_calls"][0]["function"]} == expected
    assert tokenizer.parse_response("ok", complete=True)["content"] == "ok"
