"""Continuous batching (docs/architecture.md, "One step"): every running sequence's next chunk under one token
budget, decodes first, then prefill chunks, then admissions; a decode that cannot get a block preempts the most
recently admitted sequence (recomputed later from its tokens, or from its cached prefix). An admitted sequence
starts after the prefix the cache holds for it (block_manager.py). A chunk never ends inside an image
(`Sequence.chunk_size`); a prefill waiting for room for a whole image stops admissions, so newer requests cannot
starve it. With a drafter (speculative.py), a decode step of a small batch also verifies each sequence's drafts: its
row computes 1 + num_draft tokens of the budget."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class Scheduled:
    seq: Sequence
    num_tokens: int  # this step computes tokens [seq.num_cached, seq.num_cached + num_tokens)
    num_draft: int = 0  # and then verifies this many draft tokens (a decode step: num_tokens is 1)

    @property
    def samples(self) -> bool:  # the chunk reaches the end of the known tokens: the step yields a new token
        return self.seq.num_cached + self.num_tokens == len(self.seq)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, speculator=None):
        self.blocks, self.speculator = blocks, speculator
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def schedule(self) -> list[Scheduled]:
        budget, batch = self.budget, []
        held = False  # a prefill waits for room for a whole image: admit no one before it
        spec = self.speculator
        speculate = spec is not None and spec.on_for(sum(seq.num_uncached <= 1 for seq in self.running))
        for seq in sorted(self.running, key=lambda s: s.num_uncached):  # decodes first
            if seq not in self.running or budget <= 0 or seq.num_uncached == 0:  # 0: its last token is in flight
                continue
            n = seq.chunk_size(seq.num_cached, min(seq.num_uncached, budget))
            if n == 0:
                held = True
                continue
            draft = min(spec.tokens_for(seq), budget - n) if speculate and seq.num_uncached == 1 else 0
            if draft and not self.blocks.reserve(seq, seq.num_cached + n + draft):
                draft = 0  # no room for the drafts: one token, which may preempt another sequence
            while not self.blocks.reserve(seq, seq.num_cached + n):
                if not self._preempt_other(seq, batch):
                    break
            if seq in self.running and len(seq.block_table) * self.blocks.block_size >= seq.num_cached + n + draft:
                batch.append(Scheduled(seq, n, draft))
                budget -= n + draft
        while not held and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.blocks.cached_prefix(seq)  # the prefix cache's tokens: the chunk starts after them
            n = seq.chunk_size(cached, min(len(seq) - cached, budget))
            if n == 0 or not self.blocks.can_admit(seq, cached):
                break
            self.waiting.popleft()
            self.blocks.admit(seq, cached)
            n = seq.chunk_size(cached, n)  # admit may have set a split point
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append(Scheduled(seq, n))
            budget -= n
        return batch

    def _preempt_other(self, keep: Sequence, batch: list[Scheduled]) -> bool:
        """Free the newest running sequence other than `keep`; False if there is none."""
        victim = next((s for s in reversed(self.running) if s is not keep), None)
        if victim is None:
            return False
        self.num_preemptions += 1
        batch[:] = [item for item in batch if item.seq is not victim]
        self.running.remove(victim)
        self.blocks.release(victim)
        victim.status = Status.WAITING
        self.waiting.appendleft(victim)
        return True

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
