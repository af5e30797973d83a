"""The engine's steps replayed from CUDA graphs (see runner.py for when they are used): decode steps, one graph per
bucket of batch sizes (`GraphedDecode`), and one sequence's short prefill chunks, one graph per bucket of chunk
widths and cached contexts (`GraphedPrefill`); and `capture_graph`."""

from __future__ import annotations

import threading
import traceback
import warnings

import torch

from ..model.paged_cache import PagedCacheView
from .block_manager import BlockManager


class CaptureFailed(RuntimeError):
    """A step could not be captured (the message names the error and the line of ours it came from)."""


# Held by every capture, and by CUDA work that runs off the engine's thread (the towers: LLMEngine.encode_media). A
# capture in the default (global) mode is process-wide: a CUDA call of any other thread inside it fails both.
CAPTURE_LOCK = threading.Lock()


def capture_graph(fn, pool=None):
    """Warm `fn` up three times on a side stream (Triton compiles for these shapes, lazy initializations), then
    capture one call in a CUDA graph, holding CAPTURE_LOCK throughout. Returns (graph, fn's outputs: static buffers
    that each replay overwrites); raises CaptureFailed when capture trips on anything (the caller then runs fn
    eagerly)."""
    with CAPTURE_LOCK:
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
    """Decode steps (one token per row) replayed from CUDA graphs, one per bucket of batch sizes. Inputs live in static
    buffers sized for the largest bucket; rows past the real batch are padding (invalid, trash block table, no
    position): they write only to the trash slots and see no key.

    A speculative verify step runs here too, flattened: a sequence's last token and its k drafts are k + 1 rows
    that share its ring and blocks, at positions num_cached .. num_cached + k. Every row writes its K/V before any
    attends (the decode step's order), and each row's plan shows the positions [num_cached, its own] at their slots
    (paged_cache.py), so row j sees the drafts before it. `max_rows`: the most rows a step may have (the engine's
    max_num_seqs, or more for verify steps)."""

    def __init__(self, model, blocks: BlockManager, max_model_len: int, max_rows: int | None = None):
        self.model, self.blocks = model, blocks
        most = max(max_rows or 0, blocks.max_num_seqs)
        self.sizes = sorted({s for s in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if s < most} | {most})
        width = blocks.blocks_for(max_model_len + 1)
        device = model.device
        # The step's inputs, rows of `inputs`: 0 the last step's sampled tokens (written on the device), 1 the ids
        # the host knows, 2 positions, 3 ring slots, 4 valid (0/1), 5 where each row's id is (a flat index into rows
        # 0-1: a token still pending on the device is read from row 0), 6 the tokens its sequence had cached before
        # this step (= the position, but in a verify step); then the block tables, in the same flat buffer. Its host
        # mirror (pinned on CUDA) sends rows 1-6 and the step's table rows over in one asynchronous copy; the mirror's
        # table rows are rewritten only when their blocks changed.
        pinned = device.type == "cuda"
        self.flat = torch.full((7 * most + most * width,), blocks.trash_block, dtype=torch.long, device=device)
        self.host_flat = torch.full(self.flat.shape, blocks.trash_block, dtype=torch.long, pin_memory=pinned)
        self.inputs, self.tables = self._parts(self.flat, most, width)
        self.host_inputs, self.host_tables = self._parts(self.host_flat, most, width)
        self.inputs.zero_()
        self.host_inputs.zero_()
        self.table_rows: list[list[int] | None] = [None] * most  # the block list each host row holds (None: trash)
        # On CUDA the copy runs on a stream of its own as soon as the last replay no longer reads the inputs (while
        # that step's tokens are sampled), and the next replay waits for it.
        self.copy_stream = torch.cuda.Stream(device) if pinned else None
        self.replayed = torch.cuda.Event() if pinned else None  # the last replay is done with the inputs
        self.copied = torch.cuda.Event() if pinned else None  # the last copy out of the mirror is done
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.pool = None
        self.usable = True
        self.failure: str | None = None  # why capture failed, if it did

    @staticmethod
    def _parts(flat: torch.Tensor, most: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs [7, most] and block tables [most, width] in a flat buffer (or its mirror)."""
        return flat[:7 * most].view(7, most), flat[7 * most:].view(most, width)

    def _step(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions, rings, valid, source, cached = self.inputs[2:, :size]
        ids = self.inputs.view(-1)[source]
        cache = PagedCacheView(self.blocks, self.tables[:size], rings, cached)
        logits, hidden = self.model(ids[:, None], attention_mask=valid[:, None] != 0, position_ids=positions[:, None],
                                    cache=cache, last_only=True, return_hidden=True)
        return logits[:, -1].float(), hidden[:, -1]

    def _capture(self, size: int) -> None:
        self.pool = self.pool or torch.cuda.graph_pool_handle()  # one memory pool for every bucket's graph
        self.inputs[4].zero_()  # warm-up and capture run on padding rows only: nothing but the trash is written
        try:
            self.graphs[size] = capture_graph(lambda: self._step(size), self.pool)
        except CaptureFailed as failure:  # decode eagerly from now on
            self.usable, self.failure = False, str(failure)
            warnings.warn(f"CUDA graph capture of the serving decode step failed ({failure}); decoding eagerly")

    def capture_all(self) -> None:
        """Capture every bucket's step now (CUDA; at start-up, before any request), with a progress bar on stderr
        when it is a terminal."""
        from tqdm import tqdm

        if self.model.device.type != "cuda":
            return
        for size in tqdm(self.sizes, desc="capturing decode graphs", unit="graph", disable=None):
            if self.usable and size not in self.graphs:
                self._capture(size)

    def token_row(self, rows: int) -> torch.Tensor | None:
        """Where a step's batched sampler writes its tokens [rows]: the inputs' row of last tokens, which the next
        replay then reads as it lies (`run`); None where the graphs are not in use or the rows do not fit."""
        return self.inputs[0, :rows] if self.usable and rows <= self.inputs.shape[1] else None

    def run(self, seqs, ahead=None, drafts: list[list[int]] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The logits [n, V] of n sequences' next token each and their final hidden states [n, H] (None when capture
        failed: run them eagerly). `ahead` (runner.Launched): the step still in flight, which sampled the PENDING
        tokens of some of `seqs`. `drafts`: a verify step, sequence b's rows (its last token, then drafts[b]) one
        after the other; n is then their count."""
        rows = [(seq, token, seq.num_cached + j) for b, seq in enumerate(seqs)
                for j, token in enumerate([seq.token_at(seq.num_cached)] + (drafts[b] if drafts else []))]
        n = len(rows)
        size = next(s for s in self.sizes if s >= n)
        captured = self.model.device.type == "cuda"  # elsewhere (tests): the same padded step, run eagerly
        if captured and size not in self.graphs:
            self._capture(size)
            if not self.usable:
                return None
        pad, most = [0] * (size - n), self.inputs.shape[1]
        if self.copied is not None:
            self.copied.synchronize()  # the mirrors are free again (at once, in the engine: it read the last tokens)
        sources = [ahead.source(seq) if seq.pending and drafts is None else most + row
                   for row, (seq, _, _) in enumerate(rows)]
        sources += range(most + n, most + size)  # padding rows: their own (0) ids
        self.host_inputs[1:, :size] = torch.tensor([[token for _, token, _ in rows] + pad,
                                                    [position for _, _, position in rows] + pad,
                                                    [seq.ring_slot for seq, _, _ in rows] + pad, [1] * n + pad,
                                                    sources, [seq.num_cached for seq, _, _ in rows] + pad])
        self._update_table_rows([seq for seq, _, _ in rows], size)
        sent = slice(most, 7 * most + size * self.tables.shape[1])  # rows 1-6, then the step's table rows
        if self.copy_stream is None:
            self.flat[sent].copy_(self.host_flat[sent])
        else:
            self.copy_stream.wait_event(self.replayed)
            with torch.cuda.stream(self.copy_stream):
                self.flat[sent].copy_(self.host_flat[sent], non_blocking=True)
                self.copied.record()
            torch.cuda.current_stream().wait_event(self.copied)
        if ahead is not None and ahead.tokens is not None and ahead.tokens.data_ptr() != self.inputs.data_ptr():
            self.inputs[0, :len(ahead.tokens)].copy_(ahead.tokens)  # else the sampler wrote them here (token_row)
        if not captured:
            logits, hidden = self._step(size)
            return logits[:n], hidden[:n]
        graph, (logits, hidden) = self.graphs[size]
        graph.replay()
        self.replayed.record()
        return logits[:n], hidden[:n]

    def _update_table_rows(self, seqs, size: int) -> None:
        """Host rows [0, size) of the block tables: each sequence's blocks, padded with the trash block; trash past
        them. A row is rewritten only when its blocks differ from what it holds (at batch 64, a few rows a step:
        rebuilding the whole table took ~0.5 ms of host time per step)."""
        for row in range(size):
            blocks = seqs[row].block_table if row < len(seqs) else None
            if blocks == self.table_rows[row]:
                continue
            table = self.host_tables[row]
            table.fill_(self.blocks.trash_block)
            if blocks:
                table[:len(blocks)] = torch.tensor(blocks, dtype=torch.long)
            self.table_rows[row] = None if blocks is None else list(blocks)

    def describe(self) -> str:
        if not self.usable:
            return f"eager (CUDA graph capture failed: {self.failure})"
        return f"CUDA graphs for batch sizes {sorted(self.graphs)}" if self.graphs else "no decode step yet"


class GraphedPrefill:
    """One sequence's text chunk of up to `widths[-1]` tokens replayed from a CUDA graph: eagerly, such a chunk is
    bound by the host launching the forward's hundreds of kernels (26B-A4B: 35-50 ms for any chunk of 16 to 1,024
    tokens), while its device work may be a few milliseconds.

    A chunk is left-padded to the next width of `widths`, and its cached context is gathered up to the next context
    bucket: none, or a power of two from `contexts[0]` to `contexts[1]` tokens (the gathered slots past the
    sequence's cached tokens hold no position: unseen, and the prefill kernel skips their tiles). One graph per
    (width, context), captured the first time it is needed (the widths with no context by `capture_all`), in a memory
    pool of its own: a step may still read a decode graph's outputs after this graph ran. Padding columns write only
    to the trash slots. Longer chunks and contexts run eagerly, as do chunks with images or audio."""

    # At most 512 x top-8 = 4,096 expert pairs (the sorted MoE kernels); 384 halves the padding of chunks past 256.
    WIDTHS = (16, 32, 64, 128, 256, 384, 512)
    # A graph's pool keeps its largest transient: a global layer's gathered and joined K/V, 31B's 0.5 GB at 32,768
    CONTEXTS = (1024, 32768)

    def __init__(self, model, blocks: BlockManager, max_model_len: int, widths: tuple[int, ...] = WIDTHS,
                 contexts: tuple[int, int] = CONTEXTS):
        self.model, self.blocks, self.widths, self.contexts = model, blocks, tuple(widths), contexts
        table_width = blocks.blocks_for(max_model_len + 1)
        self.capacity = table_width * blocks.block_size  # the global slots a block table covers
        most, device = self.widths[-1], model.device
        # The step's inputs in one buffer: ids, positions and valid (0/1) of `most` columns each, the chunk in the
        # last ones; the sequence's ring slot and cached token count; its block table. The host's mirror (pinned on
        # CUDA) goes over in one asynchronous copy.
        self.inputs = torch.zeros(3 * most + 2 + table_width, dtype=torch.long, device=device)
        self.host = torch.zeros(self.inputs.shape, dtype=torch.long, pin_memory=device.type == "cuda")
        self.host[3 * most + 2:] = blocks.trash_block
        self.table_row: list[int] | None = None  # the block list the host's table holds
        self.copied = torch.cuda.Event() if device.type == "cuda" else None
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.pool = None
        self.usable = True
        self.failure: str | None = None

    @staticmethod
    def _parts(buffer: torch.Tensor, most: int):
        """(ids, positions, valid [most] each; ring slot, num_cached [1] each; block table [1, width]) of a buffer."""
        ids, positions, valid = buffer[:3 * most].view(3, most)
        return ids, positions, valid, buffer[3 * most:3 * most + 1], buffer[3 * most + 1:3 * most + 2], \
            buffer[3 * most + 2:][None]

    def bucket(self, num_tokens: int, num_cached: int) -> tuple[int, int] | None:
        """(width, context) of a chunk of `num_tokens` after `num_cached` cached tokens; None: it runs eagerly."""
        low, high = self.contexts
        if num_tokens > self.widths[-1] or num_cached > high:
            return None
        width = next(w for w in self.widths if w >= num_tokens)
        context = 0 if num_cached == 0 else min(max(low, 1 << (num_cached - 1).bit_length()), self.capacity)
        return width, context

    def _step(self, width: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        most = self.widths[-1]
        ids, positions, valid, ring_slot, num_cached, table = self._parts(self.inputs, most)
        ids, positions, valid = (row[most - width:][None] for row in (ids, positions, valid))
        cache = PagedCacheView(self.blocks, table, ring_slot, num_cached, max_cached=context)
        logits, hidden = self.model(ids, attention_mask=valid != 0, position_ids=positions, cache=cache,
                                    last_only=True, return_hidden=True)
        return logits[:, -1].float(), hidden[:, -1]

    def _capture(self, key: tuple[int, int]) -> None:
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        self._parts(self.inputs, self.widths[-1])[2].zero_()  # warm-up and capture: padding only, trash written
        try:
            self.graphs[key] = capture_graph(lambda: self._step(*key), self.pool)
        except (CaptureFailed, torch.OutOfMemoryError) as failure:  # prefill chunks run eagerly from now on
            self.usable, self.failure = False, f"{type(failure).__name__}: {failure}"
            warnings.warn(f"CUDA graph capture of a prefill chunk failed ({failure}); prefilling eagerly")

    def capture_all(self) -> None:
        """Capture every width's graph for chunks with nothing cached (a new prompt's first chunk) now (CUDA)."""
        from tqdm import tqdm

        if self.model.device.type != "cuda":
            return
        for width in tqdm(self.widths, desc="capturing prefill graphs", unit="graph", disable=None):
            if self.usable and (width, 0) not in self.graphs:
                self._capture((width, 0))

    def run(self, seq, num_tokens: int, ahead=None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits [1, V] fp32, final hidden state [1, H]) at the last of the `num_tokens` tokens of `seq` from its
        num_cached on (left to the caller to advance); None when the chunk fits no bucket or capture failed.
        `ahead` (runner.Launched): the step in flight, which sampled `seq`'s PENDING last token, if it has one."""
        key = self.bucket(num_tokens, seq.num_cached)
        if key is None or not self.usable:
            return None
        captured = self.model.device.type == "cuda"  # elsewhere (tests): the same padded step, run eagerly
        if captured and key not in self.graphs:
            self._capture(key)
            if not self.usable:
                return None
        most, start = self.widths[-1], seq.num_cached
        if self.copied is not None:
            self.copied.synchronize()  # the last copy out of the mirror is done
        ids, positions, valid, ring_slot, num_cached, table = self._parts(self.host, most)
        for row in (ids, positions, valid):
            row[:most - num_tokens] = 0
        ids[most - num_tokens:] = torch.tensor(seq.tokens[start:start + num_tokens])
        positions[most - num_tokens:] = torch.arange(start, start + num_tokens)
        valid[most - num_tokens:] = 1
        ring_slot[0], num_cached[0] = seq.ring_slot, start
        if seq.block_table != self.table_row:
            table.fill_(self.blocks.trash_block)
            table[0, :len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.long)
            self.table_row = list(seq.block_table)
        self.inputs.copy_(self.host, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if seq.pending and start + num_tokens == len(seq):  # the last token is still on the device
            source = ahead.source(seq)
            self._parts(self.inputs, most)[0][-1:].copy_(ahead.tokens[source:source + 1])
        if not captured:
            return self._step(*key)
        graph, outputs = self.graphs[key]
        graph.replay()
        return outputs

    def describe(self) -> str:
        if not self.usable:
            return f"eager prefill (CUDA graph capture failed: {self.failure})"
        return f"prefill graphs for (width, context) {sorted(self.graphs)}" if self.graphs else "no prefill graph yet"
