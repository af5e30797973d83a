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

import torch

from .. import kernels
from ..config import SLIDING, ConfigError
from ..model.assistant import Assistant, PagedKV, SharedKV
from ..model.paged_cache import PagedCacheView, dequantize_kv
from ..options import options
from .graphs import CaptureFailed, capture_graph
from .sampling import TokenLogprobs, batchable, draw, next_token_distribution, token_logprobs, token_scores
from .sequence import Sequence

Accepted = list[tuple[int, TokenLogprobs | None]]  # one verify step's tokens of one sequence, in order


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
        first_shared = text.num_hidden_layers - text.num_kv_shared_layers
        # The K/V each drafter layer type reads: the last layer of that type that computes its own.
        self.sources = {t: max(i for i in range(first_shared) if text.layer_types[i] == t)
                        for t in set(config.text_config.layer_types)}
        self.model, self.drafter, self.blocks = model, drafter, blocks
        device = model.device
        graphed = device.type == "cuda" and kernels.enabled(torch.empty(0, device=device)) and \
            options().cuda_graphs and max_model_len is not None
        self.num_tokens, self.max_batch = num_tokens, max_batch
        self.oracle = None  # benchmarks only: seq -> the tokens to draft instead of the drafter's (its compute stays)
        self.accept_all = False  # benchmarks only: every draft accepted whatever the target says (the loop's ceiling)
        self.num_drafted, self.num_accepted = 0, 0
        self.pools = {t: (blocks.keys[i], blocks.values[i]) for t, i in self.sources.items()}
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
    def draft(self, seqs: list[Sequence], ks: list[int]) -> tuple[list[list[int]], torch.Tensor | None]:
        """Each sequence's ks[b] drafts, and the distributions they were drawn from ([B, max(ks), V]; None when every
        row is greedy: each draft is the drafter's argmax). On CUDA the drafter reads the target's pools in place
        (PagedKV), and a greedy round replays a CUDA graph; elsewhere it reads gathered copies (`target_kv`)."""
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
            if paged:
                view = self._view(seqs, num_cached)
                view.begin_read()
                kv = PagedKV(view, self.pools)
            else:
                kv = self.target_kv(seqs, num_cached)
            generators = [seq.generator_on(device) for seq in seqs]
            drafted, probs = self._round(ids, hidden, num_cached[:, None], kv, k, [s.params for s in seqs], generators)
        rows = drafted.tolist()
        if self.oracle is not None:  # after the drafter's round, whose compute stays in the figures
            rows = [[(known[j] if j < len(known) else row[j]) for j in range(k)]
                    for row, known in zip(rows, (self.oracle(seq) for seq in seqs))]
        return [row[:n] for row, n in zip(rows, ks)], probs

    def _round(self, ids, hidden, positions, kv, k: int, params=None, generators=None):
        """k drafting steps from ids [B, 1] and hidden [B, 1, H] with queries at positions [B, 1]: drafts [B, k]
        (device) and their distributions [B, k, V] (None when greedy: `params` None or all greedy)."""
        embed = self.model.text.embed_tokens
        greedy = params is None or all(p.greedy for p in params)
        drafted, probs = [], []
        for _ in range(k):
            out = self.drafter(embed(ids), hidden, positions, kv)
            logits = out.logits[:, -1].float()
            if greedy:
                ids = logits.argmax(-1, keepdim=True)
            else:
                q = torch.stack([next_token_distribution(logits[b], p) for b, p in enumerate(params)])
                probs.append(q)
                ids = torch.cat([torch.multinomial(q[b], 1, generator=g) for b, g in enumerate(generators)])[:, None]
            drafted.append(ids)
            hidden = out.hidden
        return torch.cat(drafted, dim=1), torch.stack(probs, dim=1) if probs else None

    def _view(self, seqs: list[Sequence], num_cached: torch.Tensor, width: int | None = None) -> PagedCacheView:
        blocks, device = self.blocks, num_cached.device
        rings = torch.tensor([seq.ring_slot for seq in seqs], device=device)
        tables = blocks.block_tables(seqs, width or max(len(seq.block_table) for seq in seqs)).to(device)
        return PagedCacheView(blocks, tables, rings, num_cached)

    def target_kv(self, seqs: list[Sequence], num_cached: torch.Tensor) -> dict[str, SharedKV]:
        """The K/V the drafter reads, gathered: each row's positions below num_cached of the source layers' pools
        (PagedKV's plain twin)."""
        blocks, device = self.blocks, num_cached.device
        view = self._view(seqs, num_cached)
        ring_gather, global_gather = view.ring_gather, view.global_gather
        ring_positions = blocks.ring_positions[ring_gather]
        global_positions = torch.arange(global_gather.shape[1], device=device).expand_as(global_gather)
        visible = {SLIDING: (ring_gather, ring_positions)}
        kv = {}
        for layer_type, layer in self.sources.items():
            gather, positions = visible.get(layer_type, (global_gather, global_positions))
            pair = []
            for pool in (blocks.keys[layer], blocks.values[layer]):
                x = pool[:, gather].permute(1, 0, 2, 3)  # [Hkv, B, S, D] -> [B, Hkv, S, D]
                scale = getattr(pool, "kv_scales", None)
                pair.append(x if scale is None else dequantize_kv(x, scale, self.model.dtype))
            kv[layer_type] = SharedKV(*pair, torch.where(positions < num_cached[:, None], positions, -1))
        return kv

    @torch.no_grad()
    def accept(self, seqs: list[Sequence], drafts: list[list[int]], probs: torch.Tensor | None,
               logits: list[torch.Tensor]) -> list[Accepted | str]:
        """Per sequence, its tokens of this step (see the module's docstring), or why it failed (a str).
        logits[b]: [len(drafts[b]) + 1, V] fp32, the target's at positions P..P+k."""
        # The output's length at the first position: min_tokens' ban on the stop tokens is over once it is reached.
        plain = [b for b, seq in enumerate(seqs) if seq.params.greedy and not seq.params.logit_bias
                 and batchable(seq.params, len(seq.output_ids), seq.stop_ids)]
        results: list[Accepted | str] = [[] for _ in seqs]
        if plain:  # argmax for each position of every such row, and whether a row holds NaN: one read
            stacked = torch.nn.utils.rnn.pad_sequence([logits[b] for b in plain], batch_first=True)
            best = torch.cat([stacked.argmax(-1), (stacked.isnan() | stacked.isposinf()).any(-1)], dim=1).tolist()
            for b, row in zip(plain, best):
                width = len(row) // 2
                if any(row[width:]):
                    results[b] = "the model's logits for this sequence are NaN or +inf: it cannot be sampled"
                    continue
                results[b] = self._greedy(drafts[b], row[:len(drafts[b]) + 1], self.accept_all)
        for b, seq in enumerate(seqs):
            if b not in plain:
                try:
                    results[b] = self._sampled(seq, drafts[b], None if probs is None else probs[b], logits[b])
                except ValueError as e:  # NaN logits
                    results[b] = str(e)
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
    def _sampled(seq: Sequence, drafts: list[int], q: torch.Tensor | None, logits: torch.Tensor) -> Accepted:
        params, device = seq.params, logits.device
        generator, prompt, output = seq.generator_on(device), seq.prompt_tensor(device), list(seq.output_ids)
        accepted: Accepted = []
        for j in range(len(drafts) + 1):
            adjusted, scores = token_scores(logits[j], params, prompt, output, seq.stop_ids)
            draft = drafts[j] if j < len(drafts) else None
            if params.greedy:
                token = int(scores.argmax())
                kept = token == draft
            elif draft is None:
                token, kept = draw(scores.softmax(-1), generator), False
            else:
                p = scores.softmax(-1)
                q_j = q[j] if q is not None else torch.nn.functional.one_hot(
                    torch.tensor(draft, device=device), p.shape[0]).float()
                u = float(torch.rand(1, generator=generator, device=device))
                kept = u * float(q_j[draft]) <= float(p[draft])
                if kept:
                    token = draft
                else:
                    residual = (p - q_j).clamp(min=0)
                    token = draw(residual if float(residual.sum()) > 0 else p, generator)
            logprobs = token_logprobs(adjusted, token, params.logprobs) if params.logprobs is not None else None
            accepted.append((token, logprobs))
            output.append(token)
            if not kept:
                break
        return accepted


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
        view.begin_read()
        kv = PagedKV(view, self.spec.pools)
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
