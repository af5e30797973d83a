"""CUDA-graph capture (`capture_graph`, shared with engine/generate.py's static decode) and the serving engine's
decode steps replayed from CUDA graphs (see runner.py for when they are used)."""

from __future__ import annotations

import traceback
import warnings

import torch

from ..model.paged_cache import PagedCacheView
from .block_manager import BlockManager


class CaptureFailed(RuntimeError):
    """A step could not be captured (the message names the error and the line of ours it came from)."""


def capture_graph(fn, pool=None):
    """Warm `fn` up three times on a side stream (Triton compiles for these shapes, lazy initializations), then
    capture one call in a CUDA graph. Returns (graph, fn's outputs: static buffers that each replay overwrites);
    raises CaptureFailed when capture trips on anything (the caller then runs fn eagerly)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool):
            outputs = fn()
    except Exception as error:  # noqa: BLE001 - anything the capture trips on
        torch.cuda.synchronize()
        where = [f for f in traceback.extract_tb(error.__traceback__) if "gemma4" in f.filename][-1:]
        at = f" at {where[0].filename.rsplit('/', 1)[-1]}:{where[0].lineno} ({where[0].line})" if where else ""
        raise CaptureFailed(f"{type(error).__name__}: {error}{at}") from error
    return graph, outputs


class GraphedDecode:
    """Decode steps (one token per row) replayed from CUDA graphs, one per bucket of batch sizes.

    Inputs live in static buffers sized for the largest bucket; rows past the real batch are padding (invalid, trash
    block table, no position): they write only to the trash slots and see no key."""

    def __init__(self, model, blocks: BlockManager, max_model_len: int):
        self.model, self.blocks = model, blocks
        most = blocks.max_num_seqs
        self.sizes = sorted({s for s in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if s < most} | {most})
        width = blocks.blocks_for(max_model_len + 1)
        device = model.device
        self.ids = torch.zeros(most, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(most, 1, dtype=torch.long, device=device)
        self.valid = torch.zeros(most, 1, dtype=torch.bool, device=device)
        self.tables = torch.full((most, width), blocks.trash_block, dtype=torch.long, device=device)
        self.ring_slots = torch.zeros(most, dtype=torch.long, device=device)
        self.num_cached = torch.zeros(most, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.usable = True
        self.failure: str | None = None  # why capture failed, if it did

    def _step(self, size: int) -> torch.Tensor:
        cache = PagedCacheView(self.blocks, self.tables[:size], self.ring_slots[:size], self.num_cached[:size])
        logits = self.model(self.ids[:size], attention_mask=self.valid[:size], position_ids=self.positions[:size],
                            cache=cache, last_only=True)
        return logits[:, -1].float()

    def _capture(self, size: int) -> None:
        self.pool = self.pool or torch.cuda.graph_pool_handle()  # one memory pool for every bucket's graph
        self.valid.zero_()  # warm-up and capture run on padding rows only: nothing but the trash is written
        try:
            self.graphs[size] = capture_graph(lambda: self._step(size), self.pool)
        except CaptureFailed as failure:  # decode eagerly from now on
            self.usable, self.failure = False, str(failure)
            warnings.warn(f"CUDA graph capture of the serving decode step failed ({failure}); decoding eagerly")

    def run(self, seqs) -> torch.Tensor | None:
        """The logits [n, V] of n sequences' next token each (None when capture failed: run them eagerly)."""
        size = next(s for s in self.sizes if s >= len(seqs))
        captured = self.model.device.type == "cuda"  # elsewhere (tests): the same padded step, run eagerly
        if captured and size not in self.graphs:
            self._capture(size)
            if not self.usable:
                return None
        n, width = len(seqs), self.tables.shape[1]
        ids = torch.tensor([seq.token_at(seq.num_cached) for seq in seqs] + [0] * (size - n))
        cached = torch.tensor([seq.num_cached for seq in seqs] + [0] * (size - n))
        tables = self.blocks.block_tables(seqs, width, size)
        rings = torch.tensor([seq.ring_slot for seq in seqs] + [0] * (size - n))
        self.ids[:size, 0].copy_(ids, non_blocking=True)
        self.positions[:size, 0].copy_(cached, non_blocking=True)
        self.num_cached[:size].copy_(cached, non_blocking=True)
        self.valid[:size, 0] = torch.arange(size) < n
        self.tables[:size].copy_(tables, non_blocking=True)
        self.ring_slots[:size].copy_(rings, non_blocking=True)
        if not captured:
            return self._step(size)[:n]
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:n]

    def describe(self) -> str:
        if not self.usable:
            return f"eager (CUDA graph capture failed: {self.failure})"
        return f"CUDA graphs for batch sizes {sorted(self.graphs)}" if self.graphs else "no decode step yet"
