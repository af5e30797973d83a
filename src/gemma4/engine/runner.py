"""ModelRunner: turns a scheduled step into forwards (left-padded chunks, explicit positions, the paged cache view;
on CUDA, decode rows replay `GraphedDecode`'s graphs and a lone short chunk `GraphedPrefill`'s) and samples the rows
whose chunk reached the end of their known tokens, on the model's device (docs/architecture.md, "One step"). The
batched rows' token ids come back to the host only when the engine asks (`Launched.collect`: after it has queued the
next step, which reads them on the device)."""

from __future__ import annotations

import functools

import torch

from .. import kernels
from ..options import options
from ..threads import fit_threads_to_cores
from ..model.paged_cache import PagedCacheView
from .block_manager import BlockManager
from .graphs import GraphedDecode, GraphedPrefill
from .sampling import batchable, sample_batch, sample_token
from .structured import fill_masks
from .scheduler import Scheduled


class ModelRunner:
    def __init__(self, model, blocks: BlockManager, max_model_len: int | None = None, speculator=None):
        self.model, self.blocks, self.speculator = model, blocks, speculator
        self.device = model.device
        use_graphs = self.device.type == "cuda" and kernels.enabled(torch.empty(0, device=self.device)) \
            and max_model_len is not None and options().cuda_graphs
        # A verify step's rows (speculative.py) replay the decode graphs too: k + 1 rows per sequence.
        rows = speculator.max_batch * (speculator.num_tokens + 1) if speculator is not None else None
        self.graphs = GraphedDecode(model, blocks, max_model_len, rows) if use_graphs else None
        self.prefill_graphs = GraphedPrefill(model, blocks, max_model_len) \
            if use_graphs and options().prefill_graphs else None
        if self.device.type == "cpu":
            fit_threads_to_cores()

    @torch.no_grad()
    def launch(self, batch: list[Scheduled], ahead: Launched | None = None) -> Launched:
        """Queue one forward over the batch and its batched sampling on the device; rows that need the full sampler
        are sampled now (that waits for the device). `ahead`: the step still in flight, whose sampled tokens are
        the inputs of this batch's rows holding a PENDING token (their ids are read on the device). Rows that
        verify drafts (speculative.py) run first, as a forward of their own, and are read at once."""
        results: list = [None] * len(batch)
        verify = [row for row, item in enumerate(batch) if item.num_draft]
        if verify:
            for row, result in zip(verify, self._verify([batch[row] for row in verify])):
                results[row] = result
        rows = [row for row, item in enumerate(batch) if not item.num_draft]
        # Sequences that may verify drafts next step have their tokens read now: drafting starts from the host's ids.
        speculating = self.speculator is not None and self.speculator.on_for(sum(i.num_tokens == 1 for i in batch))
        fast, tokens, checked = self._sample([batch[row] for row in rows], results, rows, ahead, speculating) \
            if rows else ([], None, None)
        return Launched(batch, results, fast, tokens, checked)

    def _sample(self, batch: list[Scheduled], into: list, where: list[int], ahead: Launched | None,
                speculating: bool):
        """One forward over `batch` and its sampling: each row's result goes to into[where[row]]; returns the rows
        of `into` sampled together on the device (`fast`) with their tokens (see Launched)."""
        results = [None] * len(batch)
        sampling = [row for row, item in enumerate(batch) if item.samples]  # before the forward moves num_cached
        for row in [row for row in sampling if batch[row].seq.params.max_tokens == 0]:
            results[row] = []  # scoring only: the prompt's logprobs and no token (engine._accept ends the request)
            sampling.remove(row)
        logits, hidden = self.forward(batch, ahead)
        seqs, device = [item.seq for item in batch], logits.device
        spec = self.speculator
        if spec is not None:  # the hidden state a drafting round starts from (kept only while batches speculate)
            kept = hidden.clone() if speculating else None  # copied: it may be a graph's buffer
            for row in sampling:
                seqs[row].hidden = kept[row] if kept is not None and spec.eligible(seqs[row]) else None
        # Structured output: each constrained row's allowed tokens, computed on the host while the device runs the
        # forward. A constrained row's next mask needs this step's token on the host, so its token is read now
        # (`now`), never left on the device for the next step to read (`fast`: those rows run ahead).
        samples = set(sampling)
        masks = fill_masks([seqs[row].matcher if row in samples else None for row in range(len(batch))],
                           logits.shape[1])
        for row in sampling:
            if (matcher := seqs[row].matcher) is not None and matcher.error is not None:
                results[row] = SampleError(f"the structured output failed: {matcher.error}")
        masks = masks.to(device, non_blocking=True) if masks is not None else None
        sampling = [row for row in sampling if results[row] is None]
        batched = [row for row in sampling if batchable(seqs[row].params, len(seqs[row].output_ids),
                                                        seqs[row].stop_ids)]
        fast = [row for row in batched if seqs[row].matcher is None and not (speculating and spec.eligible(seqs[row]))]
        now = [row for row in batched if row not in fast]
        tokens = checked = None
        if batched:  # together, on the device; only the chosen ids [n] come back to the host
            order = fast + now
            rows, chosen = logits if order == list(range(len(batch))) else logits[order], [seqs[row] for row in order]
            try:
                # What the host reads: `read`, NAN_ROW where a row's logits hold a NaN (its token means nothing; the
                # next step may still read `drawn`'s, a valid id, before the engine fails that sequence).
                drawn, read = sample_batch(rows, [s.params for s in chosen], [s.generator_on(device) for s in chosen],
                                           None if masks is None else masks[order], nan_id=NAN_ROW,
                                           out=None if self.graphs is None else self.graphs.token_row(len(order)))
                tokens, checked = (drawn[:len(fast)], read[:len(fast)]) if fast else (None, None)
                for row, token in zip(now, read[len(fast):].tolist()):  # waits for the device
                    results[row] = (token, None) if token != NAN_ROW else \
                        SampleError("the model's logits for this sequence hold a NaN")
            except Exception:  # one row's logits: sample the rows one by one below, so that only that row fails
                batched, fast, tokens, checked = [], [], None, None
        for row in sorted(set(sampling) - set(batched)):  # penalties, logprobs or min_tokens: the full sampler
            # Output ids end in PENDING only for a row that batchable takes (it ran ahead), which no rule here reads:
            # such a row comes here only when the batched sampler failed.
            seq = seqs[row]
            try:
                results[row] = sample_token(logits[row], seq.params, seq.prompt_tensor(device), seq.output_ids,
                                            seq.stop_ids, seq.generator_on(device), seq.kept_rows,
                                            None if masks is None else masks[row])
            except Exception as e:  # noqa: BLE001  (the engine fails this sequence alone: engine._accept)
                results[row] = SampleError(f"{type(e).__name__}: {e}")
        for row, result in enumerate(results):
            into[where[row]] = result
        return [where[row] for row in fast], tokens, checked

    def _verify(self, batch: list[Scheduled]) -> list:
        """Draft, verify and accept (speculative.py) for rows that each compute their last token and then their
        drafts; per row the accepted tokens [(token, logprobs)], or a SampleError."""
        spec, seqs = self.speculator, [item.seq for item in batch]
        drafts, probs = spec.draft(seqs, [item.num_draft for item in batch])
        logits, hidden = self.verify_forward(batch, drafts)
        results = spec.accept(seqs, drafts, probs, logits)
        start = 0  # sequence b's rows in logits and hidden
        for b, (seq, result) in enumerate(zip(seqs, results)):
            if isinstance(result, str):
                results[b] = SampleError(result)
            else:
                seq.num_cached += len(result)  # its last token and the accepted drafts
                seq.hidden = hidden[start + len(result) - 1].clone()  # the position that gave the last token
            start += len(drafts[b]) + 1
        return results

    def verify_forward(self, batch: list[Scheduled], drafts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's forward of a verify step: the logits [N, V] (fp32) and final hidden states [N, H] at each
        row's last token and each of its drafts, row after row (len(drafts[b]) + 1 each). The decode graphs'
        flattened rows (GraphedDecode) where they serve, else one chunk of k + 1 tokens per sequence. num_cached is
        left to the caller."""
        counts = [len(d) + 1 for d in drafts]
        graphs, out = self.graphs, None
        if graphs is not None and graphs.usable and sum(counts) <= graphs.sizes[-1]:
            out = graphs.run([item.seq for item in batch], None, drafts)
        if out is not None:
            return out
        logits, hidden = self._forward_group(batch, decode=False, drafts=drafts)
        width = logits.shape[1]
        if all(count == width for count in counts):  # no padding: the rows as they are
            return logits.flatten(0, 1), hidden.flatten(0, 1)
        valid = (torch.arange(width) >= width - torch.tensor(counts)[:, None]).to(logits.device)  # left-padded chunks
        return logits[valid], hidden[valid]

    def forward(self, batch: list[Scheduled], ahead: Launched | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The last position's logits of every row [B, V], fp32, and its final hidden state [B, H], left on the
        model's device.

        Rows that feed one text token (decodes), prefill chunks, and chunks whose prompt tokens are scored
        (prompt_logprobs) run as separate forwards: one left-padded forward would widen every decode row to the
        chunk's width (and could not replay the decode graph), and a scored chunk runs every position through every
        layer and the LM head."""
        kinds = [_SCORED if _scores_prompt(item) else _DECODE if item.num_tokens == 1 and not _media_in(item)
                 else _CHUNK for item in batch]
        groups = [(kind, [row for row, k in enumerate(kinds) if k == kind]) for kind in (_DECODE, _CHUNK, _SCORED)
                  if kind in kinds]
        parts = [self._forward_group([batch[row] for row in rows], kind == _DECODE, ahead, scored=kind == _SCORED)
                 for kind, rows in groups]
        if len(parts) == 1:
            return parts[0]
        outputs = []
        for which in range(2):  # logits, hidden states
            first = parts[0][which]
            merged = torch.empty(len(batch), first.shape[1], dtype=first.dtype, device=first.device)
            for (_, rows), part in zip(groups, parts):
                merged[rows] = part[which]
            outputs.append(merged)
        return outputs[0], outputs[1]

    def _forward_group(self, batch: list[Scheduled], decode: bool, ahead: Launched | None = None,
                       drafts: list[list[int]] | None = None, scored: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, V] fp32, final hidden states [B, H]) of each row's last position. With `drafts` (a verify
        step: row b's chunk is followed by drafts[b]): those of every position, [B, W, V] and [B, W, H], rows
        left-padded to the longest, and num_cached is left to the caller. `scored`: the rows' chunks hold prompt
        tokens to score (`_scores_prompt`), whose scores go to their sequences' prompt_scores; eagerly (a graph's
        step keeps the last position alone)."""
        if decode and self.graphs is not None and self.graphs.usable and len(batch) <= self.graphs.sizes[-1]:
            out = self.graphs.run([item.seq for item in batch], ahead)
            if out is not None:
                for item in batch:
                    item.seq.num_cached += 1
                return out
        if not decode and not scored and drafts is None and len(batch) == 1 and self.prefill_graphs is not None \
                and not _media_in(batch[0]):
            item = batch[0]
            out = self.prefill_graphs.run(item.seq, item.num_tokens, ahead)
            if out is not None:
                item.seq.num_cached += item.num_tokens
                return out
        tails = drafts or [[] for _ in batch]
        width = max(item.num_tokens + len(tail) for item, tail in zip(batch, tails))
        num_blocks = max(max(len(item.seq.block_table) for item in batch), 1)
        ids, positions = torch.zeros(2, len(batch), width, dtype=torch.long)
        valid = torch.zeros(len(batch), width, dtype=torch.bool)
        tables = self.blocks.block_tables([item.seq for item in batch], num_blocks)
        on_device = []  # (row, source in ahead.tokens): a chunk ending at its sequence's PENDING token
        for row, (item, tail) in enumerate(zip(batch, tails)):
            seq, n = item.seq, item.num_tokens
            start = seq.num_cached
            tokens = seq.tokens[start:start + n] + tail
            ids[row, width - len(tokens):] = torch.tensor(tokens)  # left padding
            positions[row, width - len(tokens):] = torch.arange(start, start + len(tokens))
            valid[row, width - len(tokens):] = True
            if seq.pending and start + n == len(seq):
                on_device.append((row, ahead.source(seq)))
        media_embeds = self._media_embeds(batch, width) if drafts is None else None
        ring_slots = torch.tensor([item.seq.ring_slot for item in batch], dtype=torch.long)
        num_cached = torch.tensor([item.seq.num_cached for item in batch], dtype=torch.long)
        dev = self.device
        cache = PagedCacheView(self.blocks, tables.to(dev), ring_slots.to(dev), num_cached.to(dev),
                               max_cached=int(num_cached.max()))
        extra = {} if media_embeds is None else {"media_embeds": tuple(t.to(dev) for t in media_embeds)}
        ids = ids.to(dev)
        if on_device:
            rows, sources = zip(*on_device)
            ids[list(rows), -1] = ahead.tokens[list(sources)]
        if scored:
            at, targets, counts = _prompt_targets(batch, width)
            top = max(item.seq.params.prompt_logprobs for item in batch)
            extra["score"] = (torch.tensor(at).to(dev), torch.tensor(targets).to(dev), top)
        out = self.model(ids, attention_mask=valid.to(dev), position_ids=positions.to(dev), cache=cache,
                         last_only=drafts is None, return_hidden=True, **extra)
        logits, hidden = out[:2]
        if drafts is not None:
            return logits.float(), hidden
        if scored:  # each row's share of the scores, its top cut to its own count
            start = 0
            for item, count in zip(batch, counts):
                seq, k = item.seq, item.seq.params.prompt_logprobs
                logprob, rank, top_ids, top_values = (t[start:start + count] for t in out[2])
                seq.prompt_scores.append((seq.num_cached + 1, logprob, rank, top_ids[:, :k], top_values[:, :k]))
                start += count
        for item in batch:
            item.seq.num_cached += item.num_tokens
        return logits[:, -1].float(), hidden[:, -1]

    @staticmethod
    def _media_embeds(batch: list[Scheduled], width: int):
        """(mask [B, width], soft tokens [N, H]) for the media positions of this step's chunks, or None."""
        mask, features = None, []
        for row, item in enumerate(batch):
            lo, hi = _media_span(item)
            if hi <= lo:
                continue
            media, start, n = item.seq.media, item.seq.num_cached, item.num_tokens
            if mask is None:
                mask = torch.zeros(len(batch), width, dtype=torch.bool)
            mask[row, media.positions[lo:hi] - start + (width - n)] = True
            features.append(media.features[lo:hi])
        return None if mask is None else (mask, torch.cat(features))


_DECODE, _CHUNK, _SCORED = "decode", "chunk", "scored"  # the forwards of a step (ModelRunner.forward)


def _scores_prompt(item: Scheduled) -> bool:
    """Whether a chunk holds prompt positions whose next prompt token its sequence scores (prompt_logprobs)."""
    seq = item.seq
    return seq.prompt_scores is not None and seq.num_cached < len(seq.prompt_ids) - 1


def _prompt_targets(batch: list[Scheduled], width: int) -> tuple[list[int], list[int], list[int]]:
    """The positions of a scored step's chunks (left-padded to `width`) that a prompt token follows: their indices
    in the flattened [B * width] positions, those tokens, and how many per row."""
    at, targets, counts = [], [], []
    for row, item in enumerate(batch):
        seq, start = item.seq, item.seq.num_cached
        end = min(start + item.num_tokens, len(seq.prompt_ids) - 1)  # positions start..end-1 score prompt[p + 1]
        first = row * width + width - item.num_tokens
        at.extend(range(first, first + end - start))
        targets.extend(seq.prompt_ids[start + 1:end + 1])
        counts.append(end - start)
    return at, targets, counts


def _media_span(item: Scheduled) -> tuple[int, int]:
    """[lo, hi): the indices of the sequence's (sorted) image/audio positions that lie in this chunk."""
    media, start = item.seq.media, item.seq.num_cached
    if media is None or not len(media):
        return 0, 0
    lo, hi = torch.searchsorted(media.positions, torch.tensor([start, start + item.num_tokens])).tolist()
    return lo, hi


def _media_in(item: Scheduled) -> bool:
    """Whether a chunk holds an image/audio position (it then needs the media path, not a graph's step)."""
    lo, hi = _media_span(item)
    return hi > lo


class SampleError(str):
    """In `Launched.results`: why this row could not be sampled (the engine fails its sequence alone)."""


NAN_ROW = -1  # in Launched's host copy of the batched tokens: that row's logits held a NaN


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream of a device's host copies of sampled tokens."""
    return torch.cuda.Stream(device)


class Launched:
    """A step queued on the device. `results` per row: (token, logprobs) for the rows sampled at once, a
    SampleError, or None. The rows in `fast` were sampled together on the device ([len(fast)] `tokens` there, which
    the next step may read; `checked`, the same with NAN_ROW where the logits held a NaN, is what the host reads);
    `collect()` waits for them. Their copy to the host is queued at once (pinned memory on CUDA), so the wait is for
    the step alone, on a stream of its own: the next step, queued behind this one, does not wait for it."""

    def __init__(self, batch: list[Scheduled], results: list, fast: list[int], tokens: torch.Tensor | None,
                 checked: torch.Tensor | None):
        self.batch, self.results, self.fast, self.tokens = batch, results, fast, tokens
        self._sources = {batch[row].seq.seq_id: i for i, row in enumerate(fast)}
        self._host, self._copied, self._collected = checked, None, None
        if checked is not None and checked.is_cuda:
            stream = _copy_stream(checked.device)
            self._host = torch.empty(checked.shape, dtype=checked.dtype, pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(checked.device))
            with torch.cuda.stream(stream):
                self._host.copy_(checked, non_blocking=True)
                self._copied = torch.cuda.Event()
                self._copied.record(stream)
            checked.record_stream(stream)  # its memory is not reused before the copy has read it

    def source(self, seq) -> int:
        """Where `seq`'s token is in `tokens`."""
        return self._sources[seq.seq_id]

    def collect(self) -> list[tuple[int, None] | SampleError | None]:
        """The rows in `fast`: (token, None), or a SampleError where the logits held a NaN; None elsewhere."""
        if self._collected is None:
            self._collected = [None] * len(self.batch)
            if self._host is not None:
                if self._copied is not None:
                    self._copied.synchronize()
                for row, token in zip(self.fast, self._host.tolist()):
                    self._collected[row] = (token, None) if token != NAN_ROW else \
                        SampleError("the model's logits for this sequence hold a NaN")
        return self._collected

    def all_results(self) -> list[tuple[int, object] | None]:
        """(token, logprobs) per row that samples, else None (waits for the batched rows)."""
        return [late or now for now, late in zip(self.results, self.collect())]
