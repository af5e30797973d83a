"""Streaming parser for Gemma 4 model output: text deltas in, OpenAI-style delta events out.

    parser = StreamParser()
    for delta_text in generated_text_deltas:
        for event in parser.feed(delta_text):
            ...                                   # ReasoningDelta / ContentDelta / ToolCallStart / ToolCallArguments
    for event in parser.finish():
        ...

Delimiters split across deltas (`<|"`, `<|chann`, `<|tool_c`) are held back until they resolve. A tool call is
reported once it is complete (OpenAI style: `ToolCallStart` with index, id and name, then the arguments as a
JSON fragment), so a call that turns out to be unreadable can still be reported as content instead; its body
is read by `tool_calls.parse_tool_call_body`.
Content and reasoning are reported stripped of leading and trailing whitespace, as the one-shot parser
returns them: whitespace is held back until something follows it.

`accumulate(events)` folds events into the `parse_response` dict; for any chunking of a text,
`accumulate(all events) == parse_response(text)`.

`StreamParser(prefix=prompt)` starts in the state that the answer's pre-written start leaves (`generation_prefix`:
e.g. `<|channel>thought\n` opened by the template, a call the server forced, or an assistant message the request
continues). None of the prompt is reported, except as part of a call that the generated text completes; text the
prefix began is continued with its whitespace.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .tool_calls import FUNCTION_NAME, ArgumentSyntaxError, default_call_id, parse_tool_call_body

logger = logging.getLogger(__name__)

CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
# Any of these ends the model's turn: what follows is not part of the answer.
TURN_ENDS = ("<turn|>", "<eos>", "<|tool_response>", "<|turn>")
THOUGHT = "thought"  # name of the reasoning channel: `<|channel>thought\n...`
MODEL_TURN = "<|turn>model\n"
BARE_CALL = "call:"  # a call written without `<|tool_call>`, recognised right after `<channel|>`
_BARE_CALL_START = re.compile(BARE_CALL + FUNCTION_NAME.pattern + r"\{")

_WATCH = {
    "content": (CHANNEL_OPEN, CALL_OPEN, *TURN_ENDS, CHANNEL_CLOSE, CALL_CLOSE),
    "channel": (CHANNEL_CLOSE, CALL_OPEN, *TURN_ENDS, CHANNEL_OPEN),
    "call": (CALL_CLOSE, CALL_OPEN, *TURN_ENDS),
}
_WATCH_RE = {state: re.compile("|".join(map(re.escape, delims))) for state, delims in _WATCH.items()}
_ALL_DELIMS = tuple({d for delims in _WATCH.values() for d in delims})
# The answer a prompt leaves to the model starts after the last of these: the model turn's start, a tool
# result the model continues from (inside its turn), or any other turn boundary.
_ANSWER_STARTS = re.compile("|".join(map(re.escape, (MODEL_TURN, "<tool_response|>", *TURN_ENDS))))


def generation_prefix(prompt: str) -> str:
    """The part of `prompt` that the generated text continues: what follows its last turn boundary, e.g. ""
    after `<|turn>model\n`, `<|channel>thought\n`, or a forced `<|tool_call>call:`. A prompt without any
    boundary is all continued (a caller may pass just that part)."""
    starts = [match.end() for match in _ANSWER_STARTS.finditer(prompt)]
    return prompt[starts[-1] :] if starts else prompt


# ------------------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class ReasoningDelta:
    text: str

    def openai_delta(self) -> dict:
        return {"reasoning_content": self.text}


@dataclass(frozen=True)
class ContentDelta:
    text: str

    def openai_delta(self) -> dict:
        return {"content": self.text}


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str

    def openai_delta(self) -> dict:
        function = {"name": self.name, "arguments": ""}
        return {"tool_calls": [{"index": self.index, "id": self.id, "type": "function", "function": function}]}


@dataclass(frozen=True)
class ToolCallArguments:
    index: int
    arguments: str  # a fragment of the call's arguments JSON; fragments concatenate to the full object

    def openai_delta(self) -> dict:
        return {"tool_calls": [{"index": self.index, "function": {"arguments": self.arguments}}]}


Event = ReasoningDelta | ContentDelta | ToolCallStart | ToolCallArguments


@dataclass
class _Stripped:
    """Emits text with leading/trailing whitespace removed overall: whitespace waits for what follows."""

    started: bool = False
    pending: str = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
        body = text.rstrip()
        trailing = text[len(body) :]
        out = ""
        if body:
            out, self.pending, self.started = self.pending + body, "", True
        self.pending += trailing
        return out


class StreamParser:
    """Incremental Gemma 4 response parser; see the module docstring. `prefix`: the prompt the text continues
    (whole, or its `generation_prefix`)."""

    def __init__(self, make_id: Callable[[int], str] | None = None, prefix: str | None = None):
        self._make_id = make_id or default_call_id
        self._mode = "content"  # content | channel | call | done
        self._buffer = ""
        self._channel_head_pending = False  # the channel name ("thought") is not decided yet
        self._call_may_follow = False  # just after `<channel|>`: a call may follow without `<|tool_call>`
        self._channel_text = ""  # the open channel's text, for the unterminated-channel fallback
        self._ended_in_channel = False
        self._call_body = ""
        self._bare_call = False  # the call being read had no `<|tool_call>` before it
        self._calls = 0
        self._content_out, self._reasoning_out = _Stripped(), _Stripped()
        self._events: list[Event] = []
        self._finished = False
        self.warnings: list[str] = []
        if prefix:
            self._start_after(generation_prefix(prefix))

    # ------------------------------------------------------------------------------------------ public
    def feed(self, text: str) -> list[Event]:
        if self._finished:
            raise RuntimeError("StreamParser.feed() called after finish()")
        self._buffer += text
        self._process(final=False)
        return self._take()

    def finish(self, complete: bool = False) -> list[Event]:
        """Flush everything held back. `complete`: generation stopped on an end-of-turn token that is not in
        the text (see `parse_response`)."""
        if self._finished:
            raise RuntimeError("StreamParser.finish() called twice")
        self._finished = True
        self._process(final=True)
        if self._mode == "call":
            self._end_call(terminated=complete)
        unterminated = self._ended_in_channel or (self._mode == "channel" and complete)
        if unterminated and not self._content_out.started and self._channel_text.strip():
            self._warn("the thought channel was never closed; its text is returned as content too")
            self._content(self._channel_text)
        return self._take()

    def _start_after(self, written: str) -> None:
        """Read the answer's pre-written start for the state it leaves (mode, open channel or call); what it
        says is not reported and does not count as generated text."""
        self._buffer = written
        self._process(final=False)
        # Text the prefix already began (an assistant message continued) goes on as written: its leading whitespace
        # belongs to the answer.
        self._content_out = _Stripped(started=self._content_out.started)
        self._reasoning_out = _Stripped(started=self._reasoning_out.started)
        self._channel_text, self._calls = "", 0
        self._events, self.warnings = [], []

    # ----------------------------------------------------------------------------------------- scanning
    def _process(self, final: bool) -> None:
        while self._buffer and self._mode != "done":
            if self._mode == "channel" and self._channel_head_pending and not self._channel_head(final):
                return
            if self._mode == "content" and self._call_may_follow and not self._bare_call_head(final):
                return
            match = _WATCH_RE[self._mode].search(self._buffer)
            if match:
                self._route(self._buffer[: match.start()])
                self._buffer = self._buffer[match.end() :]
                self._on_delimiter(match.group())
                continue
            hold = len(self._buffer) if final else _partial_delimiter_start(self._buffer)
            self._route(self._buffer[:hold])
            self._buffer = self._buffer[hold:]
            return
        if self._mode == "done":
            self._buffer = ""

    def _channel_head(self, final: bool) -> bool:
        """Drop the channel name `thought` and the newline after it (kept if it starts a word: "thoughtful").
        Returns False while too little text has arrived to tell."""
        head = self._buffer.split("<", 1)[0]
        decidable = final or "<" in self._buffer or len(head) > len(THOUGHT)
        if not decidable and THOUGHT.startswith(head[: len(THOUGHT)]):
            return False
        rest = head[len(THOUGHT) :]
        if head.startswith(THOUGHT) and not (rest[:1].isalnum() or rest[:1] == "_"):
            self._buffer = self._buffer[len(THOUGHT) + rest.startswith("\n") :]
        self._channel_head_pending = False
        return True

    def _bare_call_head(self, final: bool) -> bool:
        """After `<channel|>`, `call:NAME{` starts a call whose `<|tool_call>` the model left out (vLLM issue
        #54256). Returns False while too little text has arrived to tell."""
        head = self._buffer.lstrip()
        name = head[len(BARE_CALL) :]
        if _BARE_CALL_START.match(head):
            self._mode, self._call_body, self._bare_call = "call", "", True
        elif not final and BARE_CALL.startswith(head[: len(BARE_CALL)]) and (not name or FUNCTION_NAME.fullmatch(name)):
            return False  # still the beginning of `call:NAME`
        self._call_may_follow = False
        return True

    def _route(self, text: str) -> None:
        if not text:
            return
        if self._mode == "content":
            self._content(text)
        elif self._mode == "channel":
            self._channel_text += text
            out = self._reasoning_out.push(text)
            if out:
                self._events.append(ReasoningDelta(out))
        elif self._mode == "call":
            self._call_body += text

    def _on_delimiter(self, delim: str) -> None:
        if self._mode == "call":
            self._end_call(terminated=True)
            if delim != CALL_OPEN:  # a `<|tool_call>` before this call was closed starts the next one
                self._mode = "done" if delim in TURN_ENDS else "content"
            return
        if delim in TURN_ENDS:
            self._ended_in_channel = self._mode == "channel"
            self._mode = "done"
        elif delim == CHANNEL_OPEN:  # also one nested in an open channel: its name is dropped again
            if self._mode == "content":
                self._channel_text = ""
            self._mode, self._channel_head_pending = "channel", True
            self._route("\n")  # separates the text of successive thoughts
        elif delim == CHANNEL_CLOSE:  # also a stray one, with no channel open
            self._mode, self._call_may_follow = "content", True
        elif delim == CALL_OPEN:
            self._mode, self._call_body = "call", ""
        # Anything else is a stray `<tool_call|>` with no call open: dropped.

    # ----------------------------------------------------------------------------------------- emitting
    def _content(self, text: str) -> None:
        out = self._content_out.push(text)
        if out:
            self._events.append(ContentDelta(out))

    def _end_call(self, terminated: bool) -> None:
        body, bare, self._call_body, self._bare_call = self._call_body, self._bare_call, "", False
        try:
            calls = parse_tool_call_body(body, terminated=terminated)
            if bare and len(calls) != 1:
                raise ArgumentSyntaxError("text after a call written without <|tool_call>")
        except (ArgumentSyntaxError, json.JSONDecodeError) as e:
            how = "cut off" if not terminated else "malformed"
            self._warn(f"tool call {how} ({e}); returned as content: {body[:120]!r}")
            self._content(body if bare else CALL_OPEN + body)
            return
        for name, arguments in calls:
            index = self._calls
            self._calls += 1
            self._events.append(ToolCallStart(index, self._make_id(index), name))
            self._events.append(ToolCallArguments(index, json.dumps(arguments, ensure_ascii=False)))

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        logger.warning("gemma4 response parsing: %s", message)

    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        return events


def _partial_delimiter_start(buffer: str) -> int:
    """Where a possibly incomplete delimiter begins at the end of `buffer` (len(buffer) if none).
    Every delimiter has a single '<', at its start, so only the last '<' can begin one."""
    start = buffer.rfind("<")
    tail = buffer[start:]
    return start if start >= 0 and any(d.startswith(tail) and d != tail for d in _ALL_DELIMS) else len(buffer)


def accumulate(events: Iterable[Event]) -> dict:
    """Fold events into {"role", "content", "reasoning_content", "tool_calls"} (the `parse_response` shape)."""
    content, reasoning = [], []
    calls: dict[int, dict] = {}
    for event in events:
        if isinstance(event, ContentDelta):
            content.append(event.text)
        elif isinstance(event, ReasoningDelta):
            reasoning.append(event.text)
        elif isinstance(event, ToolCallStart):
            calls[event.index] = {"id": event.id, "type": "function", "function": {"name": event.name, "arguments": ""}}
        elif isinstance(event, ToolCallArguments):
            calls[event.index]["function"]["arguments"] += event.arguments
    for call in calls.values():  # the JSON fragments, whole
        call["function"]["arguments"] = json.loads(call["function"]["arguments"] or "{}")
    return {"role": "assistant", "content": "".join(content) or None, "reasoning_content": "".join(reasoning) or None,
            "tool_calls": [calls[index] for index in sorted(calls)]}
