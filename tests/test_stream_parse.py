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


def stream(chunks, complete=False):
    parser = StreamParser(make_id=make_id)
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish(complete=complete)


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
    expected = parse_response(text, make_id=make_id)
    for cut in range(len(text) + 1):
        assert accumulate(stream([text[:cut], text[cut:]])) == expected, cut


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
    st.sampled_from(["<turn|>", "<eos>", "<|tool_response>", "<channel|>", "<tool_call|>", S, "<|turn>", "<|tool"]),
)
outputs = st.lists(segment, max_size=6).map("".join)


@st.composite
def chunked(draw):
    text = draw(outputs)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunked(), st.booleans())
def test_streamed_equals_one_shot(case, complete):
    text, chunks = case
    assert "".join(chunks) == text
    one_shot = parse_response(text, make_id=make_id, complete=complete)
    assert accumulate(stream(chunks, complete=complete)) == one_shot
    # Single characters: the finest chunking.
    assert accumulate(stream(list(text), complete=complete)) == one_shot
