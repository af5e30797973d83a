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

`StreamParser(prefix=prompt)` starts where the prompt leaves the answer: `generation_prefix(prompt)`, the
prompt's text after its last turn boundary (e.g. `<|channel>thought\n` that a template wrote after the
generation prompt, or a tool call the server forced: `<|tool_call>call:NAME{`), is read first for its state
only. It was not generated, so none of it is reported, except as part of a call that the generated text
completes; nothing of the prompt's earlier turns can reach the output.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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
        call = {"index": self.index, "id": self.id, "type": "function", "function": {"name": self.name, "arguments": ""}}
        return {"tool_calls": [call]}


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


@dataclass
class _State:
    mode: str = "content"  # content | channel | call | done
    buffer: str = ""
    channel_head_pending: bool = False  # the channel name ("thought") is not decided yet
    call_may_follow: bool = False  # just after `<channel|>`: a call may follow without `<|tool_call>`
    channel_text: str = ""  # the open channel's text, for the unterminated-channel fallback
    ended_in_channel: bool = False
    call_body: str = ""
    bare_call: bool = False  # the call being read had no `<|tool_call>` before it
    calls: int = 0
    content: _Stripped = field(default_factory=_Stripped)
    reasoning: _Stripped = field(default_factory=_Stripped)


class StreamParser:
    """Incremental Gemma 4 response parser; see the module docstring. `prefix`: the prompt the text continues
    (whole, or its `generation_prefix`)."""

    def __init__(self, make_id: Callable[[int], str] | None = None, prefix: str | None = None):
        self._make_id = make_id or default_call_id
        self._s = _State()
        self._events: list[Event] = []
        self._finished = False
        self.warnings: list[str] = []
        if prefix:
            self._start_after(generation_prefix(prefix))

    # ------------------------------------------------------------------------------------------ public
    def feed(self, text: str) -> list[Event]:
        if self._finished:
            raise RuntimeError("StreamParser.feed() called after finish()")
        self._s.buffer += text
        self._process(final=False)
        return self._take()

    def finish(self, complete: bool = False) -> list[Event]:
        """Flush everything held back. `complete`: generation stopped on an end-of-turn token that is not in
        the text (see `parse_response`)."""
        if self._finished:
            raise RuntimeError("StreamParser.finish() called twice")
        self._finished = True
        self._process(final=True)
        s = self._s
        if s.mode == "call":
            self._end_call(terminated=complete)
        unterminated = s.ended_in_channel or (s.mode == "channel" and complete)
        if unterminated and not s.content.started and s.channel_text.strip():
            self._warn("the thought channel was never closed; its text is returned as content too")
            self._content(s.channel_text)
        return self._take()

    def _start_after(self, written: str) -> None:
        """Read the answer's pre-written start for the state it leaves (mode, open channel or call); what it
        says is not reported and does not count as generated text."""
        s = self._s
        s.buffer = written
        self._process(final=False)
        s.channel_text, s.calls, s.content, s.reasoning = "", 0, _Stripped(), _Stripped()
        self._events, self.warnings = [], []

    # ----------------------------------------------------------------------------------------- scanning
    def _process(self, final: bool) -> None:
        s = self._s
        while s.buffer and s.mode != "done":
            if s.mode == "channel" and s.channel_head_pending and not self._channel_head(final):
                return
            if s.mode == "content" and s.call_may_follow and not self._bare_call_head(final):
                return
            match = _WATCH_RE[s.mode].search(s.buffer)
            if match:
                self._route(s.buffer[: match.start()])
                s.buffer = s.buffer[match.end() :]
                self._on_delimiter(match.group())
                continue
            hold = len(s.buffer) if final else _partial_delimiter_start(s.buffer)
            self._route(s.buffer[:hold])
            s.buffer = s.buffer[hold:]
            return
        if s.mode == "done":
            s.buffer = ""

    def _channel_head(self, final: bool) -> bool:
        """Drop the channel name `thought` and the newline after it (kept if it starts a word: "thoughtful").
        Returns False while too little text has arrived to tell."""
        s = self._s
        head = s.buffer.split("<", 1)[0]
        decidable = final or "<" in s.buffer or len(head) > len(THOUGHT)
        if not decidable and THOUGHT.startswith(head[: len(THOUGHT)]):
            return False
        rest = head[len(THOUGHT) :]
        if head.startswith(THOUGHT) and not (rest[:1].isalnum() or rest[:1] == "_"):
            s.buffer = s.buffer[len(THOUGHT) + rest.startswith("\n") :]
        s.channel_head_pending = False
        return True

    def _bare_call_head(self, final: bool) -> bool:
        """After `<channel|>`, `call:NAME{` starts a call whose `<|tool_call>` the model left out (vLLM issue
        #54256). Returns False while too little text has arrived to tell."""
        s = self._s
        head = s.buffer.lstrip()
        name = head[len(BARE_CALL) :]
        if _BARE_CALL_START.match(head):
            s.mode, s.call_body, s.bare_call = "call", "", True
        elif not final and BARE_CALL.startswith(head[: len(BARE_CALL)]) and (not name or FUNCTION_NAME.fullmatch(name)):
            return False  # still the beginning of `call:NAME`
        s.call_may_follow = False
        return True

    def _route(self, text: str) -> None:
        if not text:
            return
        s = self._s
        if s.mode == "content":
            self._content(text)
        elif s.mode == "channel":
            s.channel_text += text
            out = s.reasoning.push(text)
            if out:
                self._events.append(ReasoningDelta(out))
        elif s.mode == "call":
            s.call_body += text

    def _on_delimiter(self, delim: str) -> None:
        s = self._s
        if s.mode == "call":
            self._end_call(terminated=True)
            if delim != CALL_OPEN:  # a `<|tool_call>` before this call was closed starts the next one
                s.mode = "done" if delim in TURN_ENDS else "content"
            return
        if delim in TURN_ENDS:
            s.ended_in_channel = s.mode == "channel"
            s.mode = "done"
        elif delim == CHANNEL_OPEN:  # also one nested in an open channel: its name is dropped again
            if s.mode == "content":
                s.channel_text = ""
            s.mode, s.channel_head_pending = "channel", True
            self._route("\n")  # separates the text of successive thoughts
        elif delim == CHANNEL_CLOSE:  # also a stray one, with no channel open
            s.mode, s.call_may_follow = "content", True
        elif delim == CALL_OPEN:
            s.mode, s.call_body = "call", ""
        # Anything else is a stray `<tool_call|>` with no call open: dropped.

    # ----------------------------------------------------------------------------------------- emitting
    def _content(self, text: str) -> None:
        out = self._s.content.push(text)
        if out:
            self._events.append(ContentDelta(out))

    def _end_call(self, terminated: bool) -> None:
        s = self._s
        body, bare, s.call_body, s.bare_call = s.call_body, s.bare_call, "", False
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
            index = s.calls
            s.calls += 1
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
    if start >= 0 and any(d.startswith(tail) and d != tail for d in _ALL_DELIMS):
        return start
    return len(buffer)


def accumulate(events: Iterable[Event]) -> dict:
    """Fold events into {"role", "content", "reasoning_content", "tool_calls"} (the `parse_response` shape)."""
    content, reasoning = [], []
    calls: dict[int, dict] = {}
    arguments: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, ContentDelta):
            content.append(event.text)
        elif isinstance(event, ReasoningDelta):
            reasoning.append(event.text)
        elif isinstance(event, ToolCallStart):
            calls[event.index] = {"id": event.id, "type": "function", "function": {"name": event.name}}
            arguments[event.index] = []
        elif isinstance(event, ToolCallArguments):
            arguments[event.index].append(event.arguments)
    for index, call in calls.items():
        call["function"]["arguments"] = json.loads("".join(arguments[index]) or "{}")
    return {"role": "assistant", "content": "".join(content) or None, "reasoning_content": "".join(reasoning) or None,
            "tool_calls": [calls[index] for index in sorted(calls)]}
