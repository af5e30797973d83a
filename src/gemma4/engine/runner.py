"""ModelRunner: turns a scheduled step into one forward (left-padded chunks, explicit positions, the paged cache
view) and samples the rows whose chunk reached the end of their known tokens. Image/audio soft tokens, computed
once per request (`Sequence.media`), go in as `media_embeds` for the prompt positions each chunk covers."""

from __future__ import annotations

import torch

from ..model.paged_cache import PagedCacheView
from .block_manager import BlockManager
from .sampling import sample_token
from .scheduler import Scheduled


class ModelRunner:
    def __init__(self, model, blocks: BlockManager):
        self.model, self.blocks = model, blocks
        self.device = model.device

    @torch.no_grad()
    def run(self, batch: list[Scheduled]) -> list[tuple[int, object] | None]:
        """One forward over the batch; returns (token, logprobs) per row that samples, else None."""
        samples = [item.samples for item in batch]  # decided before the forward advances num_cached
        logits = self.forward(batch)
        return [self.sample(item, logits[row]) if s else None for row, (item, s) in enumerate(zip(batch, samples))]

    def forward(self, batch: list[Scheduled]) -> torch.Tensor:
        width = max(item.num_tokens for item in batch)
        num_blocks = max(max(len(item.seq.block_table) for item in batch), 1)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        positions = torch.zeros(len(batch), width, dtype=torch.long)
        valid = torch.zeros(len(batch), width, dtype=torch.bool)
        tables = torch.full((len(batch), num_blocks), self.blocks.trash_block, dtype=torch.long)
        for row, item in enumerate(batch):
            seq, n = item.seq, item.num_tokens
            start = seq.num_cached
            ids[row, width - n:] = torch.tensor(seq.tokens[start:start + n])  # left padding
            positions[row, width - n:] = torch.arange(start, start + n)
            valid[row, width - n:] = True
            tables[row, :len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.long)
        media_embeds = self._media_embeds(batch, width)
        ring_slots = torch.tensor([item.seq.ring_slot for item in batch], dtype=torch.long)
        num_cached = torch.tensor([item.seq.num_cached for item in batch], dtype=torch.long)
        dev = self.device
        cache = PagedCacheView(self.blocks, tables.to(dev), ring_slots.to(dev), num_cached.to(dev))
        extra = {} if media_embeds is None else {"media_embeds": tuple(t.to(dev) for t in media_embeds)}
        logits = self.model(ids.to(dev), attention_mask=valid.to(dev), position_ids=positions.to(dev), cache=cache,
                            last_only=True, **extra)
        for item in batch:
            item.seq.num_cached += item.num_tokens
        return logits[:, -1].float().cpu()

    @staticmethod
    def _media_embeds(batch: list[Scheduled], width: int):
        """(mask [B, width], soft tokens [N, H]) for the media positions of this step's chunks, or None."""
        mask, features = None, []
        for row, item in enumerate(batch):
            media, start, n = item.seq.media, item.seq.num_cached, item.num_tokens
            if media is None or not len(media):
                continue
            lo, hi = torch.searchsorted(media.positions, torch.tensor([start, start + n])).tolist()
            if hi <= lo:
                continue
            if mask is None:
                mask = torch.zeros(len(batch), width, dtype=torch.bool)
            mask[row, media.positions[lo:hi] - start + (width - n)] = True
            features.append(media.features[lo:hi])
        return None if mask is None else (mask, torch.cat(features))

    def sample(self, item: Scheduled, logits: torch.Tensor):
        seq = item.seq
        return sample_token(logits, seq.params, seq.prompt_tensor(), seq.output_ids, seq.stop_ids, seq.generator)
