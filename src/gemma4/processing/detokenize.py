"""Incremental detokenization shared by `LLM.stream` and the server."""

from __future__ import annotations

from typing import Sequence


class IncrementalText:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character, and holds back
    text that might be the start of a stop string. `include_stop`: the matched stop string ends the text (vLLM's
    include_stop_str_in_output) instead of being cut off."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True,
                 include_stop: bool = False):
        self.tokenizer, self.stop, self.skip = tokenizer, list(stop), skip_special_tokens
        self.include_stop = include_stop
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        hits = [(at, at + len(stop)) for stop in self.stop if (at := text.find(stop)) >= 0]
        if hits:  # cut at the earliest stop string: it is not part of the output unless included
            start, end = min(hits)
            self.text, self.stopped = text[:end if self.include_stop else start], True
            return self._flush(len(self.text))
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its other bytes
            return ""
        self.text = text
        return self._flush(len(text) - self._partial_stop_length(text))

    def finish(self) -> str:
        """The text held back for a possible stop string, once nothing more will come."""
        return self._flush(len(self.text))

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest end of `text` that begins (but is not all of) a stop string."""
        return max((n for stop in self.stop for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)

    def _flush(self, upto: int) -> str:
        delta = self.text[self.emitted: upto]  # "" when nothing new is ready
        self.emitted = max(self.emitted, upto)
        return delta
