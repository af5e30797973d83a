"""Streaming parser: events, held-back delimiters, and streamed == one-shot for any chunking (hypothesis)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma4.processing.parse import parse_response
from gemma4.processing.stream_parse import (
    ContentDelta,
    ReasoningDelta,
    StreamParser,
    ToolCallArguments,
    ToolCallStart,
    accumulate,
)

S = '<|"|>'


def make_id(index):
    return f"call_{index}"


def stream(chunks, complete=False, prefix=None):
    parser = StreamParser(make_id=make_id, prefix=prefix)
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish(complete=complete)


def check_every_chunking(text, expected, complete=False, prefix=None):
    """One-shot, streamed in two chunks split at every index, and streamed char by char all give `expected`."""
    assert parse_response(text, make_id=make_id, complete=complete, prefix=prefix) == expected
    for cut in range(len(text) + 1):
        assert accumulate(stream([text[:cut], text[cut:]], complete, prefix)) == expected, cut
    assert accumulate(stream(list(text), complete, prefix)) == expected


def test_events_in_order():
    text = f"<|channel>thought\nHmm.<channel|>Sure.<|tool_call>call:f{{a:{S}x{S},n:2}}<tool_call|><|tool_response>"
    events = stream([text[i : i + 3] for i in range(0, len(text), 3)])
    assert [e for e in events if isinstance(e, (ToolCallStart, ToolCallArguments))] == [
        ToolCallStart(0, "call_0", "f"),
        ToolCallArguments(0, '{"a": "x", "n": 2}'),
    ]
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "Hmm."
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "Sure."
    assert isinstance(events[0], ReasoningDelta) and isinstance(events[-1], ToolCallArguments)


@pytest.mark.parametrize("partial", ["<", "<|", "<|t", "<|tool_c", "<|channel", "<tur", "<eo", "<|tool_resp"])
def test_partial_delimiters_are_held_back(partial):
    parser = StreamParser(make_id=make_id)
    events = parser.feed("Hello " + partial)
    assert events == [ContentDelta("Hello")]  # the space waits too: it may turn out to be trailing
    later = parser.feed("x") + parser.finish()
    assert "".join(e.text for e in later) == " " + partial + "x"


def test_delimiter_split_across_every_boundary():
    text = f"<|channel>thought\nr<channel|>c<|tool_call>call:g{{s:{S}a{S}}}<tool_call|><turn|>"
    check_every_chunking(text, parse_response(text, make_id=make_id))


def test_openai_deltas():
    assert ContentDelta("a").openai_delta() == {"content": "a"}
    assert ReasoningDelta("r").openai_delta() == {"reasoning_content": "r"}
    assert ToolCallStart(1, "id1", "f").openai_delta() == {
        "tool_calls": [{"index": 1, "id": "id1", "type": "function", "function": {"name": "f", "arguments": ""}}]
    }
    assert ToolCallArguments(1, "{}").openai_delta() == {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}


def test_misuse():
    parser = StreamParser()
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")
    with pytest.raises(RuntimeError):
        parser.finish()


def test_warnings_are_recorded():
    parser = StreamParser()
    parser.feed("<|tool_call>call:f{a:")
    parser.finish()
    assert parser.warnings and "cut off" in parser.warnings[0]


# ------------------------------------------------------------------------------------------- property
words = st.sampled_from(["Hello", "world", "thought", "thoughtful", "é", "😀", "中文", "a,b", "{x}", "[1]", "call:f", "<b>", "<", "|", ">", '"', "'"])
spaces = st.sampled_from(["", " ", "  ", "\n", "\n\n", "\t"])
text_piece = st.lists(st.tuples(spaces, words), max_size=5).map(lambda xs: "".join(a + b for a, b in xs))
scalar = st.one_of(
    st.integers(-1000, 1000).map(str),
    st.sampled_from(["1.5", "-0.25", "1e3", "true", "false", "null", "celsius", "New York"]),
    text_piece.map(lambda t: S + t + S),
    text_piece.map(lambda t: t + S),  # drift: the opening delimiter dropped
    text_piece.map(lambda t: S + t),  # drift: the closing delimiter dropped
    text_piece.filter(lambda t: '"' not in t and "\\" not in t).map(lambda t: '"' + t + '"'),
)
value = st.recursive(
    scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(st.sampled_from(["a", "b", "city", "n"]), inner), max_size=3).map(
            lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"
        ),
    ),
    max_leaves=6,
)
arguments = st.lists(st.tuples(st.sampled_from(["city", "unit", "n", "x", "q"]), value), max_size=4).map(
    lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"
)
call_body = st.one_of(
    st.tuples(st.sampled_from(["call:", "", "call: "]), st.sampled_from(["get_weather", "f", "ns.tool"]), arguments).map("".join),
    st.sampled_from(['{"name": "f", "arguments": {"a": 1}}', "f(a=1, b=" + S + "x" + S + ")", "get_time", "f{a:"]),
)
segment = st.one_of(
    text_piece,
    text_piece.map(lambda t: "<|channel>thought\n" + t + "<channel|>"),
    text_piece.map(lambda t: "<|channel>" + t),
    st.tuples(call_body, st.sampled_from(["<tool_call|>", "", "<tool_call|>\n"])).map(lambda x: "<|tool_call>" + x[0] + x[1]),
    # drift: a call right after `<channel|>`, without `<|tool_call>`
    st.tuples(st.sampled_from(["<channel|>", "<channel|>\n"]), call_body, st.sampled_from(["<tool_call|>", "", " x"])).map("".join),
    st.sampled_from(["<turn|>", "<eos>", "<|tool_response>", "<channel|>", "<tool_call|>", S, "<|turn>", "<|tool"]),
)
outputs = st.lists(segment, max_size=6).map("".join)


@st.composite
def chunked(draw):
    text = draw(outputs)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in zip(bounds, bounds[1:])]


# Prompts ending the ways the chat template and the server leave them.
EARLIER = f"<bos><|turn>user\nq<turn|>\n<|turn>model\n<|channel>thought\nprior<channel|>prior answer<|tool_call>call:f{{a:1}}<tool_call|>"
prefixes = st.sampled_from([
    None,
    "",
    "<bos><|turn>user\nq<turn|>\n<|turn>model\n",
    "<bos><|turn>user\nq<turn|>\n<|turn>model\n<|channel>thought\n<channel|>",
    "<bos><|turn>user\nq<turn|>\n<|turn>model\n<|channel>thought\n",
    "<|turn>model\n<|channel>",
    EARLIER + "<|tool_response>response:f{v:1}<tool_response|><|channel>thought\n",
    EARLIER + "<|tool_response>response:f{v:1}<tool_response|>",
    "<|turn>model\n<|tool_call>call:",
    "<|turn>model\n<|tool_call>call:get_weather{",
])


def strings(value):
    """Every string (keys included) in a parsed argument value."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunked(), st.booleans(), prefixes)
def test_streamed_equals_one_shot(case, complete, prefix):
    text, chunks = case
    assert "".join(chunks) == text
    one_shot = parse_response(text, make_id=make_id, complete=complete, prefix=prefix)
    assert accumulate(stream(chunks, complete=complete, prefix=prefix)) == one_shot
    # Single characters: the finest chunking.
    assert accumulate(stream(list(text), complete=complete, prefix=prefix)) == one_shot
    # A string delimiter never ends up inside a value, and nothing of the prompt's earlier turns leaks.
    for call in one_shot["tool_calls"]:
        assert not any(S in s for s in strings(call["function"]["arguments"]))
    assert "prior" not in (one_shot["content"] or "") + (one_shot["reasoning_content"] or "")
