"""The engine in a background thread; asyncio callers get each request's StepOutputs on an asyncio.Queue.

A request that fails inside the engine (StepOutput.error) raises RequestFailed in its caller alone. An error that
escapes `engine.step()` (a device error) stops the engine: every request gets EngineDead, `error` is set (for
/health) and `on_fatal` is called. An abort is queued and applied before the next step, never waiting for one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable

from ..engine.engine import LLMEngine
from ..engine.sampling import SamplingParams

logger = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    pass


class RequestFailed(RuntimeError):
    """This request failed inside the engine (the message says why); the engine serves the others."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.on_fatal: Callable[[], None] = lambda: None  # `gemma4 serve` sets it: stop the server
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.aborts: deque[int] = deque()  # filled by any thread, emptied by the engine thread
        self.stopped = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="gemma4-engine", daemon=True)
        self.thread.start()

    def add(self, prompt_ids: list[int], params: SamplingParams, media=None) -> tuple[int, asyncio.Queue]:
        """`media`: the prompt's soft tokens from `engine.encode_media` (run the towers before, not under the lock)."""
        if self.error is not None or self.stopped:
            raise EngineDead(f"the engine stopped: {self.error!r}")
        queue: asyncio.Queue = asyncio.Queue()
        with self.lock:
            seq_id = self.engine.add_request(prompt_ids, params, media)
            self.queues[seq_id] = (asyncio.get_running_loop(), queue)
        self.wake.set()
        return seq_id, queue

    def abort(self, seq_id: int) -> None:
        self.aborts.append(seq_id)
        self.wake.set()

    def stats(self) -> dict:
        scheduler, blocks = self.engine.scheduler, self.engine.blocks
        return {"running": len(scheduler.running), "waiting": len(scheduler.waiting), "kv_usage": self.engine.kv_usage,
                "prefix_cache_hit_rate": blocks.hit_rate, "prefix_cache_hit_tokens": blocks.hit_tokens,
                "prefix_cache_query_tokens": blocks.prompt_tokens}

    def shutdown(self) -> None:
        """Stop stepping; requests still waiting for outputs get EngineDead rather than waiting forever."""
        self.stopped = True
        self.wake.set()
        self.thread.join(timeout=5)
        with self.lock:
            self._fail_all(EngineDead("the engine was shut down"))

    def fail(self, error: BaseException) -> None:
        """Stop the engine from another thread (a rank of a tensor-parallel model ended while it idled), as an error
        escaping `step()` does: every request gets EngineDead, `error` is set and `on_fatal` called."""
        with self.lock:
            if self.error is not None:
                return
            self.error, self.stopped = error, True
            self._fail_all(EngineDead(f"the engine stopped: {error!r}"))
        self.wake.set()
        self.on_fatal()

    def _fail_all(self, error: EngineDead) -> None:
        for loop, queue in self.queues.values():
            _deliver(loop, queue, error)
        self.queues.clear()

    def _loop(self) -> None:
        while not self.stopped:
            with self.lock:
                while self.aborts:
                    seq_id = self.aborts.popleft()
                    if self.queues.pop(seq_id, None) is not None:  # not finished meanwhile
                        self.engine.abort(seq_id)
                busy = self.engine.has_unfinished()
                if busy:
                    try:
                        outputs = self.engine.step()
                    except BaseException as e:  # a device error: fail every request instead of hanging them
                        logger.exception("the engine stopped")
                        self.error = e
                        self._fail_all(EngineDead(f"the engine stopped: {e!r}"))
                        self.on_fatal()
                        return
                    for out in outputs:
                        target = self.queues.pop(out.seq_id, None) if out.finished else self.queues.get(out.seq_id)
                        if target is not None:
                            _deliver(*target, out)
            if not busy:
                self.wake.wait(timeout=0.5)
                self.wake.clear()


def _deliver(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item) -> None:
    """Put `item` on a caller's queue from the engine thread."""
    with contextlib.suppress(RuntimeError):  # the caller's loop is closed
        loop.call_soon_threadsafe(queue.put_nowait, item)
