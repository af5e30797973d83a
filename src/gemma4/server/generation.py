"""One choice of a request: its engine sequence, incremental detokenization, stop strings, logprobs; `merged` reads
a request's choices together and aborts them as soon as its client disconnects."""

from __future__ import annotations

import asyncio

from ..engine.sequence import StepOutput
from ..processing.detokenize import IncrementalText
from .async_engine import AsyncEngine, RequestFailed


class Choice:
    def __init__(self, index: int, engine: AsyncEngine, tokenizer, prompt_ids, params, media=None,
                 stops: list[str] = (), skip_special_tokens: bool = False, include_stop: bool = False):
        self.index, self.engine = index, engine
        self.seq_id, self.queue = engine.add(prompt_ids, params, media)
        self.num_prompt = len(prompt_ids)
        self.detok = IncrementalText(tokenizer, stops, skip_special_tokens, include_stop)
        self.num_output = 0
        self.finish_reason: str | None = None
        self.logprobs: list = []  # TokenLogprobs of each token whose text was emitted
        self.text_offsets: list[int] = []  # where each of those tokens' text starts in `text`
        self.prompt_logprobs: list | None = None  # params.prompt_logprobs: each prompt token's (None for the first)

    @property
    def text(self) -> str:
        return self.detok.text

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    async def next(self) -> StepOutput:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if item.error is not None:
            self.finish_reason = "error"
            raise RequestFailed(f"generation failed inside the engine: {item.error}")
        return item

    def consume(self, out: StepOutput) -> str:
        """Apply one engine output; returns the new text safe to emit."""
        self.num_output = out.num_output_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        delta = ""
        stop_token = out.finished and out.finish_reason == "stop"  # a stop token has no text
        if out.token is not None and not stop_token and not self.detok.stopped:
            if out.logprobs is not None:
                self.logprobs.append(out.logprobs)
                self.text_offsets.append(len(self.detok.text))
            delta = self.detok.add(out.token)
        if out.finished:
            self.finish_reason = "stop" if out.finish_reason in ("stop", "abort") else out.finish_reason
        if self.detok.stopped and self.finish_reason is None:
            self.finish_reason = "stop"
            self.engine.abort(self.seq_id)
        if self.done:
            delta += self.detok.finish()
        return delta

    def abort(self) -> None:
        if not self.done:
            self.engine.abort(self.seq_id)
            self.finish_reason = "abort"


class ClientDisconnected(Exception):
    """The HTTP client went away before its request finished; its choices are aborted."""


async def _disconnect(request) -> None:
    """Returns when the client disconnects. The body has been read: what the server sends now is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def merged(choices: list[Choice], request):
    """Apply each choice's outputs as they arrive, yielding (choice, its new text safe to emit). If the client of
    `request` disconnects, raise ClientDisconnected at once; the choices are aborted whichever way this ends."""
    pending = {asyncio.ensure_future(c.next()): c for c in choices if not c.done}
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        while pending:
            done, _ = await asyncio.wait([*pending, gone], return_when=asyncio.FIRST_COMPLETED)
            if gone in done:
                raise ClientDisconnected()
            for task in done:
                choice = pending.pop(task)
                yield choice, choice.consume(task.result())
                if not choice.done:
                    pending[asyncio.ensure_future(choice.next())] = choice
    finally:
        for task in [*pending, gone]:
            task.cancel()
        for choice in choices:
            choice.abort()
