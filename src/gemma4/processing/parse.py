"""One-shot parsing of a Gemma 4 model response into an OpenAI-style assistant message.

Output format written by the model (after the prompt's `<|turn>model\\n`):

    <|channel>thought\\n REASONING <channel|>            thinking (only with enable_thinking)
    CONTENT                                             the answer
    <|tool_call>call:NAME{key:VALUE,...}<tool_call|>    zero or more tool calls
    <turn|> | <|tool_response> | <eos>                  end of the turn (or a request for tool results)

Tool-call values are read by `tool_calls` (its docstring lists the syntax and the drifted forms accepted).
The response parser also accepts a missing `<tool_call|>` when the arguments are complete, and a call written
without `<|tool_call>` right after `<channel|>` (`<channel|>call:f{...}`). A call it cannot read, or whose
strings cannot be told apart unambiguously, is returned as content, with a logged warning, never dropped.

This module holds the one-shot API: `parse_response` runs the streaming parser (`stream_parse.StreamParser`)
over the whole text, so one-shot and streamed results agree by construction; `to_openai_tool_calls` gives its
calls the JSON-string arguments of OpenAI responses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping

from .stream_parse import StreamParser, accumulate


def parse_response(text: str, *, prefix: str | None = None, complete: bool = False,
                   make_id: Callable[[int], str] | None = None) -> dict:
    """Parse a Gemma 4 model output (special tokens kept in the decoded text) into
    {"role": "assistant", "content": str|None, "reasoning_content": str|None, "tool_calls": [...]}.

    `tool_calls` is a list (empty when there are none) of
    {"id", "type": "function", "function": {"name", "arguments": dict}}; see `to_openai_tool_calls` for
    JSON-string arguments. `content` is None only when the model wrote no answer.

    `complete=True` says the generation stopped on an end-of-turn token that is not in `text` (finish
    reason "stop" with the stop token stripped). It matters only for what was left open: a thought channel
    that was never closed (a finished turn also returns its text as content, a cut-off one keeps it as
    reasoning only) and a call without `<tool_call|>` (read as finished rather than cut off).
    `make_id(index)` makes tool-call ids (default: random "call_...").

    `prefix` is the prompt the text continues (whole, or just its end): parsing starts in the state its
    pre-written part of the answer leaves, e.g. inside a thought channel the template opened or a tool call the
    server forced (`<|tool_call>call:NAME{`). Only the generated text is reported, and a call the prompt started
    once `text` completes it (see `stream_parse.generation_prefix`)."""
    parser = StreamParser(make_id=make_id, prefix=prefix)
    return accumulate(parser.feed(text) + parser.finish(complete=complete))


def to_openai_tool_calls(tool_calls: Iterable[Mapping]) -> list[dict]:
    """Parsed tool calls with `arguments` as JSON strings, as in OpenAI chat-completions responses."""
    return [{"id": call.get("id"), "type": "function",
             "function": {"name": call["function"]["name"],
                          "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False)}}
            for call in tool_calls]
