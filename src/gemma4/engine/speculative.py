"""Speculative decoding with Gemma 4's MTP drafter (model/assistant.py) inside the engine's step.

A sequence that speculates decodes in rounds. Its last token t, at position P (not cached yet), and the target's final
hidden state that produced t start a round:

1. draft: the drafter proposes d_1..d_k, one drafting step each, all with queries at position P over the target's K/V
   of positions < P (the pools of its last sliding and last global producer layers, gathered once per round);
2. verify: one target forward over [t, d_1..d_k] at positions P..P+k gives k + 1 next-token distributions
   (runner.py: one chunk of k + 1 tokens);
3. accept: a greedy row keeps the drafts equal to the target's argmax, then adds the target's own next token: the
   tokens decoding one at a time gives. A sampled row accepts d_j with probability min(1, p(d_j) / q(d_j)) and, at
   the first rejection, draws from max(p - q, 0) renormalized; with every draft accepted it draws one more token from
   the last distribution. The tokens are then distributed as the target's own samples (Leviathan et al. 2023, Chen
   et al. 2023). p is the request's whole sampling rule (`sampling.token_scores`: logit_bias, penalties over the
   output including the tokens accepted before, min_tokens, temperature, top-k, top-p, min-p), q the drafter's
   distribution under the same temperature and cut-offs.

The sequence keeps the K/V of positions P..P+n (t and the n accepted drafts) that the verify forward wrote; the rest
is dropped by num_cached alone: attention reads no position at or past num_cached (model/paged_cache.py), and the
sliding rings have `num_tokens` slots more than the window, so rejected positions never overwrite the window that the
next queries read."""

from __future__ import annotations

import math

import torch

from .. import kernels
from ..config import SLIDING, ConfigError
from ..model.assistant import Assistant, DraftOutput, PagedKV, SharedKV
from ..model.paged_cache import PagedCacheView, dequantize_kv
from ..options import options
from .graphs import CaptureFailed, capture_graph
from .sampling import (UNSAMPLEABLE, Candidates, TokenLogprobs, adjusted_logits, batchable, distributions,
                       rows_logprobs)
from .sequence import Sequence

Accepted = list[tuple[int, TokenLogprobs | None]]  # one verify step's tokens of one sequence, in order


class TargetKV:
    """The target's K/V that one drafting round reads through `view` of its pools: each row's positions below its
    num_cached in the pools of the layers `DraftStep.sources` names. Read at the round's first step and kept for the
    others: in place (`paged`: PagedKV, the decode kernel) or gathered into SharedKV copies. Under tensor parallelism
    each rank reads its own pools (its KV heads) through the view rank 0 sends (distributed/runtime.py)."""

    def __init__(self, view: PagedCacheView, paged: bool):
        self.view, self.paged = view, paged
        self._read: dict[str, SharedKV] | PagedKV | None = None

    def read(self, sources: dict[str, int], dtype: torch.dtype) -> dict[str, SharedKV] | PagedKV:
        if self._read is None:
            self._read = self._in_place(sources) if self.paged else self._gathered(sources, dtype)
        return self._read

    def _in_place(self, sources: dict[str, int]) -> PagedKV:
        pools = self.view.pools
        self.view.begin_read()
        return PagedKV(self.view, {t: (pools.keys[i], pools.values[i]) for t, i in sources.items()})

    def _gathered(self, sources: dict[str, int], dtype: torch.dtype) -> dict[str, SharedKV]:
        """PagedKV's plain twin: the same keys, copied out of the pools (fp8 ones dequantized to `dtype`)."""
        view, pools = self.view, self.view.pools
        num_cached = view.num_cached
        ring_gather, global_gather = view.ring_gather, view.global_gather
        ring_positions = pools.ring_positions[ring_gather]
        global_positions = torch.arange(global_gather.shape[1], device=num_cached.device).expand_as(global_gather)
        visible = {SLIDING: (ring_gather, ring_positions)}
        kv = {}
        for layer_type, layer in sources.items():
            gather, positions = visible.get(layer_type, (global_gather, global_positions))
            pair = []
            for pool in (pools.keys[layer], pools.values[layer]):
                x = pool[:, gather].permute(1, 0, 2, 3)  # [Hkv, B, S, D] -> [B, Hkv, S, D]
                scale = getattr(pool, "kv_scales", None)
                pair.append(x if scale is None else dequantize_kv(x, scale, dtype))
            kv[layer_type] = SharedKV(*pair, torch.where(positions < num_cached[:, None], positions, -1))
        return kv


class DraftStep:
    """One drafting step from token ids: the target's (scaled) embedding of the last tokens, then the drafter over
    the target's K/V (`TargetKV`). Under tensor parallelism both parts hold collectives, so rank 0's steps are
    mirrored to the other ranks (distributed/runtime.py), each of which runs its own twin of this on its shards."""

    def __init__(self, model, drafter: Assistant):
        self.model, self.drafter = model, drafter
        text = model.config.text_config
        first_shared = text.num_hidden_layers - text.num_kv_shared_layers
        # The K/V each drafter layer type reads: the last layer of that type that computes its own.
        self.sources = {t: max(i for i in range(first_shared) if text.layer_types[i] == t)
                        for t in set(drafter.config.text_config.layer_types)}

    def __call__(self, ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, kv: TargetKV):
        return self.forward(ids, hidden, positions, kv)  # an attribute the runtime may wrap (as a model's forward)

    def forward(self, ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, kv: TargetKV) -> DraftOutput:
        embeds = self.model.text.embed_tokens(ids)
        return self.drafter(embeds, hidden, positions, kv.read(self.sources, self.model.dtype))


class Speculator:
    """The drafter, with what the engine's scheduler and runner ask of it. `max_batch`: speculation runs in steps
    with at most that many decoding sequences; a larger batch decodes one token at a time (its forward is already
    bound by compute, where verifying k + 1 tokens per sequence would cost more than it saves)."""

    def __init__(self, model, drafter: Assistant, blocks, num_tokens: int, max_batch: int,
                 max_model_len: int | None = None):
        text, config = model.config.text_config, drafter.config
        if num_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {num_tokens}")
        if config.backbone_hidden_size != text.hidden_size or config.text_config.vocab_size != text.vocab_size:
            raise ConfigError(f"the drafter (backbone_hidden_size {config.backbone_hidden_size}, vocabulary "
                              f"{config.text_config.vocab_size}) does not fit this model (hidden size "
                              f"{text.hidden_size}, vocabulary {text.vocab_size}): use the drafter released with it")
        self.model, self.drafter, self.blocks = model, drafter, blocks
        self.step = DraftStep(model, drafter)
        if (runtime := getattr(model, "parallel_runtime", None)) is not None:  # tensor parallel (distributed/)
            runtime.mirror_drafts(self.step)  # every rank runs each drafting step on its shards and pools
        device = model.device
        graphed = device.type == "cuda" and kernels.enabled(torch.empty(0, device=device)) and \
            options().cuda_graphs and max_model_len is not None
        self.num_tokens, self.max_batch = num_tokens, max_batch
        self.oracle = None  # benchmarks only: seq -> the tokens to draft instead of the drafter's (its compute stays)
        self.accept_all = False  # benchmarks only: every draft accepted whatever the target says (the loop's ceiling)
        self.num_drafted, self.num_accepted = 0, 0
        self.rounds = GraphedRounds(self, max_model_len) if graphed else None

    def warm_up(self) -> None:
        """Capture the greedy drafting round of every batch size now (CUDA), before any request."""
        if self.rounds is not None:
            self.rounds.capture_all()

    @staticmethod
    def eligible(seq: Sequence) -> bool:
        """Whether `seq` may speculate: not under a grammar (its matcher reads one token at a time) nor keeping
        every step's scores."""
        params = seq.params
        return seq.matcher is None and not params.output_scores and not params.output_logits

    def on_for(self, num_decodes: int) -> bool:
        return num_decodes <= self.max_batch

    def tokens_for(self, seq: Sequence) -> int:
        """How many tokens `seq` drafts in its next decode step (0: it decodes one token)."""
        if seq.hidden is None or seq.pending or not self.eligible(seq):
            return 0
        return max(0, min(self.num_tokens, seq.params.max_tokens - len(seq.output_ids) - 1))

    @torch.no_grad()
    def draft(self, seqs: list[Sequence], ks: list[int]) -> tuple[list[list[int]], list[Candidates] | None]:
        """Each sequence's ks[b] drafts, and the distributions they were drawn from (one Candidates over the rows per
        drafting step; None when every row is greedy: each draft is the drafter's argmax). On CUDA the drafter reads
        the target's pools in place (PagedKV), and a greedy round replays a CUDA graph; elsewhere it reads gathered
        copies (`TargetKV`)."""
        device, k = self.model.device, max(ks)
        greedy = all(seq.params.greedy for seq in seqs)
        paged = kernels.enabled(torch.empty(0, device=device))
        probs = None
        if greedy and paged and self.rounds is not None and len(seqs) <= self.max_batch:
            drafted = self.rounds.run(seqs)  # num_tokens drafts each: one graph per batch size
        else:
            ids = torch.tensor([[seq.output_ids[-1]] for seq in seqs], device=device)
            hidden = torch.stack([seq.hidden for seq in seqs])[:, None]
            num_cached = torch.tensor([seq.num_cached for seq in seqs], device=device)
            kv = TargetKV(self._view(seqs, num_cached), paged)
            generators = [seq.generator_on(device) for seq in seqs]
            drafted, probs = self._round(ids, hidden, num_cached[:, None], kv, k, [s.params for s in seqs], generators)
        rows = drafted.tolist()
        if self.oracle is not None:  # after the drafter's round, whose compute stays in the figures
            rows = [[(known[j] if j < len(known) else row[j]) for j in range(k)]
                    for row, known in zip(rows, (self.oracle(seq) for seq in seqs))]
        return [row[:n] for row, n in zip(rows, ks)], probs

    def _round(self, ids, hidden, positions, kv, k: int, params=None, generators=None):
        """k drafting steps from ids [B, 1] and hidden [B, 1, H] with queries at positions [B, 1] over the target's
        K/V `kv` (a TargetKV): drafts [B, k] (device) and their distributions, one Candidates per step (None when
        greedy: `params` None or all greedy)."""
        greedy = params is None or all(p.greedy for p in params)
        drafted, probs = [], []
        for _ in range(k):
            out = self.step(ids, hidden, positions, kv)
            logits = out.logits[:, -1].float()
            if greedy:
                ids = logits.argmax(-1, keepdim=True)
            else:
                q = distributions(logits, params)
                probs.append(q)
                ids = q.draw(generators)[:, None]
            drafted.append(ids)
            hidden = out.hidden
        return torch.cat(drafted, dim=1), probs or None

    def _view(self, seqs: list[Sequence], num_cached: torch.Tensor, width: int | None = None) -> PagedCacheView:
        blocks, device = self.blocks, num_cached.device
        rings = torch.tensor([seq.ring_slot for seq in seqs], device=device)
        tables = blocks.block_tables(seqs, width or max(len(seq.block_table) for seq in seqs)).to(device)
        return PagedCacheView(blocks, tables, rings, num_cached)

    @torch.no_grad()
    def accept(self, seqs: list[Sequence], drafts: list[list[int]], probs: list[Candidates] | None,
               logits: torch.Tensor) -> list[Accepted | str]:
        """Per sequence, its tokens of this step (see the module's docstring), or why it failed (a str).
        logits: [N, V] fp32, the target's at positions P..P+k of each sequence in turn (len(drafts[b]) + 1 rows)."""
        starts = [sum(len(tail) + 1 for tail in drafts[:b]) for b in range(len(seqs))]
        # The output's length at the first position: min_tokens' ban on the stop tokens is over once it is reached.
        plain = [b for b, seq in enumerate(seqs) if seq.params.greedy and not seq.params.logit_bias
                 and seq.params.allowed_token_ids is None and batchable(seq.params, len(seq.output_ids), seq.stop_ids)]
        rest = [b for b in range(len(seqs)) if b not in plain]
        results: list[Accepted | str] = [[] for _ in seqs]
        if plain:  # each row's argmax (exact in fp32: ids < 2**24) and its max, NaN or +inf where the row holds either
            best, peaks = torch.stack([logits.argmax(-1).to(logits.dtype), logits.amax(-1)]).tolist()  # one read
            for b in plain:
                rows = range(starts[b], starts[b] + len(drafts[b]) + 1)
                if any(math.isnan(peaks[row]) or peaks[row] == math.inf for row in rows):
                    results[b] = UNSAMPLEABLE
                else:
                    results[b] = self._greedy(drafts[b], [int(best[row]) for row in rows], self.accept_all)
        if rest:
            if len(rest) < len(seqs):
                probs = None if probs is None else [step.rows(rest) for step in probs]
                logits = logits[[starts[b] + j for b in rest for j in range(len(drafts[b]) + 1)]]
            sampled = self._sampled([seqs[b] for b in rest], [drafts[b] for b in rest], probs, logits)
            for b, result in zip(rest, sampled):
                results[b] = result
        for b, result in enumerate(results):
            if not isinstance(result, str):
                self.num_drafted += len(drafts[b])
                self.num_accepted += len(result) - 1
        return results

    @staticmethod
    def _greedy(drafts: list[int], best: list[int], accept_all: bool = False) -> Accepted:
        n = len(drafts) if accept_all else 0
        while n < len(drafts) and drafts[n] == best[n]:
            n += 1
        return [(token, None) for token in drafts[:n] + best[n:n + 1]]

    @staticmethod
    def _sampled(seqs: list[Sequence], drafts: list[list[int]], q: list[Candidates] | None,
                 logits: torch.Tensor) -> list[Accepted | str]:
        """The rows that are not plain greedy: sampled ones, and greedy ones with logit_bias, allowed_token_ids,
        penalties, logprobs or min_tokens. Every position of every row is scored in one batch, position j as if
        drafts[:j] were accepted (its penalties and min_tokens count them as output; it is read only if they were).
        Then each row accepts its drafts from one read of p(d_j), q(d_j) and u_j (sampled) or of the argmax
        (greedy), and the rows draw their last tokens together. q: the drafts' distributions, one Candidates per
        drafting step (None: each draft's is its one-hot). logits: [N, V], as accept takes them."""
        device, vocab = logits.device, logits.shape[-1]
        owners = [(b, j) for b, tail in enumerate(drafts) for j in range(len(tail) + 1)]  # row -> (sequence, position)
        starts = [row for row, (_, j) in enumerate(owners) if j == 0]
        params = [seqs[b].params for b, _ in owners]
        peaks = logits.amax(-1)  # NaN or +inf where a row holds either (a max propagates NaN)
        adjusted = adjusted_logits(logits, params, None)
        banned = [(row, token) for row, (b, j) in enumerate(owners)
                  if len(seqs[b].output_ids) + j < params[row].min_tokens and not params[row].ignore_eos
                  for token in seqs[b].stop_ids]
        if banned:  # too early to stop: the stop tokens are forbidden (what logprobs report too)
            rows, tokens = torch.tensor(banned, device=device).T
            adjusted = adjusted.index_put((rows, tokens), torch.tensor(float("-inf"), device=device))
        penalized = any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params)
        p = distributions(adjusted, params, *(_penalty_ids(seqs, drafts, device) if penalized else ()))

        drafted = torch.tensor([drafts[b][j] if j < len(drafts[b]) else 0 for b, j in owners], device=device)
        p_draft = p.prob_at(drafted[:, None])[:, 0]
        q_draft = torch.ones_like(p_draft)  # q(d) of a draft whose q is its one-hot
        for j, step in enumerate(q or []):  # the drafts of step j: those of the sequences with more than j
            if verifying := [b for b, tail in enumerate(drafts) if j < len(tail)]:
                rows = [starts[b] + j for b in verifying]
                q_draft[rows] = step.rows(verifying).prob_at(drafted[rows][:, None])[:, 0]
        uniform = torch.rand(len(owners), device=device)  # an unseeded row's; a seeded row draws its own
        for b, seq in enumerate(seqs):
            if (generator := seq.generator_on(device)) is not None and drafts[b]:
                uniform[starts[b]:starts[b] + len(drafts[b])] = torch.rand(len(drafts[b]), generator=generator,
                                                                           device=device)
        best, peaks = p.most_likely().tolist(), peaks.tolist()  # a greedy row's argmax
        p_draft, q_draft, uniform = torch.stack([p_draft, q_draft, uniform]).tolist()

        ends: dict[int, int] = {}  # sequence -> the row of its last token, for those that did not fail
        for b, (seq, tail) in enumerate(zip(seqs, drafts)):
            start = starts[b]
            if seq.params.greedy:
                n = next((j for j, d in enumerate(tail) if best[start + j] != d), len(tail))
            else:  # d_j is kept with probability min(1, p(d_j) / q(d_j))
                n = next((j for j, d in enumerate(tail)
                          if not uniform[start + j] * q_draft[start + j] <= p_draft[start + j]), len(tail))
            if not any(math.isnan(peak) or peak == math.inf for peak in peaks[start:start + n + 1]):
                ends[b] = start + n
        # The last token: a greedy row's argmax. A sampled row draws it, all rows together: at a rejection from
        # max(p - q, 0) (from p where that is 0), after every draft from p.
        tokens = {row: best[row] for row in ends.values()}
        if drawing := [row for row in ends.values() if not params[row].greedy]:
            last = p.rows(drawing)
            for i, row in enumerate(drawing):
                b, n = owners[row]
                if n < len(drafts[b]):  # rejected: q of that draft at p's candidates
                    one = last.rows([i])
                    q_n = q[n].rows([b]) if q is not None else \
                        Candidates(torch.ones(1, 1, device=device), drafted[row].reshape(1, 1), vocab)
                    residual = (one.probs - q_n.prob_at(one.ids)).clamp(min=0)
                    last.probs[i] = torch.where(residual.sum() > 0, residual, one.probs)[0]
            generators = [seqs[owners[row][0]].generator_on(device) for row in drawing]
            tokens.update(zip(drawing, last.draw(generators).tolist()))
        accepted = {b: drafts[b][:end - starts[b]] + [tokens[end]] for b, end in ends.items()}
        asked = [(row, token, seqs[b].params.logprobs) for b, end in ends.items() if seqs[b].params.logprobs is not None
                 for row, token in zip(range(starts[b], end + 1), accepted[b])]
        rows = [row for row, _, _ in asked]
        logprobs = iter(rows_logprobs(adjusted if rows == list(range(len(owners))) else adjusted[rows],
                                      [token for _, token, _ in asked], [n for _, _, n in asked]) if asked else [])
        return [UNSAMPLEABLE if b not in ends else
                [(token, next(logprobs) if seq.params.logprobs is not None else None) for token in accepted[b]]
                for b, seq in enumerate(seqs)]


def _penalty_ids(seqs: list[Sequence], drafts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt and output ids [N, L] (-1: none) that the penalties of each verified position read, rows in
    `Speculator._sampled`'s order: position j's output is the sequence's output then drafts[:j]."""
    prompts, outputs = [], []
    for seq, tail in zip(seqs, drafts):
        width, done = len(tail) + 1, len(seq.output_ids)
        ids = torch.tensor(seq.output_ids + tail, device=device).expand(width, -1)
        after = torch.arange(ids.shape[1], device=device) >= done + torch.arange(width, device=device)[:, None]
        outputs.append(ids.masked_fill(after, -1))
        prompts.append(seq.prompt_tensor(device).expand(width, -1))
    return _padded(prompts), _padded(outputs)


def _padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """[n_i, L_i] id matrices stacked into [sum n_i, max L_i], padded with -1."""
    width = max(part.shape[1] for part in parts)
    return torch.cat([torch.nn.functional.pad(part, (0, width - part.shape[1]), value=-1) for part in parts])


class GraphedRounds:
    """Greedy drafting rounds (k drafter steps reading the target's pools in place) replayed from CUDA graphs, one
    per batch size up to the speculator's max_batch, from static input buffers: the last token, the target hidden
    state, num_cached (the queries' position), ring slot and block table of each row."""

    def __init__(self, speculator: Speculator, max_model_len: int):
        self.spec = speculator
        blocks, most, device = speculator.blocks, speculator.max_batch, speculator.model.device
        hidden = speculator.model.config.text_config.hidden_size
        self.ids = torch.zeros(most, 1, dtype=torch.long, device=device)
        self.hidden = torch.zeros(most, 1, hidden, dtype=speculator.model.dtype, device=device)
        self.num_cached = torch.zeros(most, dtype=torch.long, device=device)
        self.rings = torch.zeros(most, dtype=torch.long, device=device)
        self.tables = torch.full((most, blocks.blocks_for(max_model_len + 1)), blocks.trash_block, dtype=torch.long,
                                 device=device)
        self.graphs: dict[int, tuple] = {}  # batch -> (graph, drafts [batch, num_tokens])
        self.pool = None
        self.usable = True

    def _round(self, batch: int, k: int) -> torch.Tensor:
        view = PagedCacheView(self.spec.blocks, self.tables[:batch], self.rings[:batch], self.num_cached[:batch])
        kv = TargetKV(view, paged=True)
        return self.spec._round(self.ids[:batch], self.hidden[:batch], self.num_cached[:batch, None], kv, k)[0]

    def capture_all(self) -> None:
        for batch in range(1, self.spec.max_batch + 1):
            self._capture(batch)

    def _capture(self, batch: int) -> None:
        if not self.usable or batch in self.graphs:
            return
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        try:
            self.graphs[batch] = capture_graph(lambda: self._round(batch, self.spec.num_tokens), self.pool)
        except CaptureFailed:  # drafting rounds run eagerly from now on
            self.usable = False

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Drafts [B, num_tokens] on the device for `seqs` (greedy; a sequence that needs fewer uses the first)."""
        batch, k = len(seqs), self.spec.num_tokens
        self._capture(batch)
        self.ids[:batch, 0].copy_(torch.tensor([seq.output_ids[-1] for seq in seqs]), non_blocking=True)
        self.hidden[:batch, 0].copy_(torch.stack([seq.hidden for seq in seqs]))
        self.num_cached[:batch].copy_(torch.tensor([seq.num_cached for seq in seqs]), non_blocking=True)
        self.rings[:batch].copy_(torch.tensor([seq.ring_slot for seq in seqs]), non_blocking=True)
        tables = self.spec.blocks.block_tables(seqs, self.tables.shape[1])
        self.tables[:batch].copy_(tables, non_blocking=True)
        if not self.usable:
            return self._round(batch, k)
        graph, drafts = self.graphs[batch]
        graph.replay()
        return drafts
