"""The Gemma 4 network: text decoder, optional vision/audio towers, tied LM head with logit softcap.

It knows nothing of checkpoint files or generation: `gemma4.Model` (pretrained.py) adds loading, saving and
`generate` on top, and the engine drives `forward` with its paged cache."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..config import Config
from ..options import options
from .attention import ForwardContext
from .cache import KVCache
from .common import MultimodalEmbedder
from .fused import QuantizedLinear, linear
from .pages import page_out
from .quantized import ON_LOAD, QuantizedWeight, Scheme, cpu_int4_takes, native_int4, quantize
from .text import TextModel


def check_token_ids(config: Config, ids) -> None:
    """ValueError unless every id (a tensor or a list) is in the model's vocabulary: the embedding kernel would read
    outside its table."""
    vocab = config.text_config.vocab_size
    ids = torch.as_tensor(ids)
    outside = (ids < 0) | (ids >= vocab)
    if bool(outside.any()):
        raise ValueError(f"token id {int(ids[outside][0])} is outside this model's vocabulary of {vocab} ids")


# Rows of the tied table quantized at once for the head (`ready_`): whole blocks of the CPU int4 kernel's layout
HEAD_ROWS_AT_ONCE = 16384
# The quantization on load (quantization.ON_LOAD's names) in which a tied head is quantized for the logits, per device
# type: the schemes its GEMV kernels read (the CPU's: int4 and int8)
HEAD_SCHEMES = {"cpu": ("int4", "int8"), "cuda": ("int4", "int8", "fp8")}
# Positions whose logits `score_tokens` makes at once: a whole prefill chunk's fp32 logits would take rows x vocabulary
# x 4 bytes (8.6 GB for 8K tokens of Gemma's 262,144); 256 rows take 268 MB.
SCORE_ROWS = 256

class Backbone(nn.Module):
    """Holds the submodules under the names the multimodal checkpoints use (`model.language_model`, ...)."""

    def __init__(self, config: Config):
        super().__init__()
        self.language_model = TextModel(config.text_config)
        self.vision_tower = self.embed_vision = self.audio_tower = self.embed_audio = None
        if config.vision_config is not None:
            from .vision import VisionTower
            self.vision_tower = VisionTower(config.vision_config)
            self.embed_vision = MultimodalEmbedder(config.vision_config, config.text_config)
        if config.audio_config is not None:
            from .audio import AudioTower
            self.audio_tower = AudioTower(config.audio_config)
            self.embed_audio = MultimodalEmbedder(config.audio_config, config.text_config)


class Gemma4(nn.Module):
    """`model(input_ids) -> logits [batch, seq, vocab]` (fp32, softcapped like the reference)."""

    def __init__(self, config: Config, with_towers: bool = True):
        super().__init__()
        if not with_towers:
            config.vision_config = config.audio_config = None
        self.config = config
        self.generation_config: dict = {}  # the checkpoint's generation_config.json, when loaded from one
        self.model = Backbone(config)
        text = config.text_config
        self.lm_head = None if text.tie_word_embeddings else nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.gather_vocabulary = None  # set by distributed/sharding.py when the vocabulary is split over ranks
        # With quantization asked for (quantization.quantize_model_), the tied LM head quantized in that scheme for the
        # logits (`ready_`): derived, never saved
        self.head_scheme: Scheme | None = None
        self.quantized_head: QuantizedWeight | None = None

    @property
    def text(self) -> TextModel:
        return self.model.language_model

    @property
    def dtype(self) -> torch.dtype:
        return self.text.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text.embed_tokens.weight.device

    def fuse_projections_(self) -> "Gemma4":
        """Run q/k/v and gate/up as one matmul each (fewer, larger GEMVs at decode). Parameters keep their names
        and values (they become views of the fused weights). Call after the model is on its device and dtype:
        a later `.to()` keeps the results right but gives the views their own memory again. On the CPU by default
        only where the native int4 kernel reads them (`_ready_for_cpu_`), which computes each row alike fused or not;
        dense products would be summed in another order than the reference's separate matmuls."""
        for module in self.modules():
            if module is not self and hasattr(module, "fuse_projections_"):
                module.fuse_projections_()
        self.text._cpu_decode_layers = None
        return self

    def ready_(self) -> "Gemma4":
        """What every loader does last: inference mode, no gradients, fused projections (option fuse_projections),
        quantized weights in the CPU kernels' layout."""
        self.eval().requires_grad_(False)
        fuse = options().fuse_projections
        if fuse is True or (fuse == "auto" and self.device.type == "cuda"):
            self.fuse_projections_()
        if self.device.type == "cpu":
            self._ready_for_cpu_()
        self._quantize_head_()
        self.text._cpu_decode_layers = None  # weights were fused or repacked: the C layers are built anew
        return self

    def _ready_for_cpu_(self) -> None:
        """int4 weights in the layout of PyTorch's CPU int4 kernel where the native one is not built, else stored chunk
        by chunk where K is wide (`for_cpu_`), and with the native one q/k/v and gate/up fused."""
        for module in self.modules():
            if isinstance(module, QuantizedLinear):
                module.for_cpu_()
        if options().fuse_projections == "auto":
            # The native int4 kernel computes each output row alike in a fused matrix: fewer, larger products.
            for module in self.modules():
                linears = [child for child in module.children() if isinstance(child, (nn.Linear, QuantizedLinear))]
                if (hasattr(module, "fuse_projections_") and module is not self and linears
                        and all(isinstance(child, QuantizedLinear) and native_int4(child.scheme) for child in linears)):
                    module.fuse_projections_()

    def _quantize_head_(self) -> None:
        """A tied LM head is 14% (31B) to 43% (E2B) of an int4 decode step's bytes in bf16: with quantization asked
        for in a scheme the device's kernels read (HEAD_SCHEMES), it is quantized too (as llama.cpp and MLX do), for
        the logits only; the embedding lookups keep reading the table."""
        scheme, cpu = self.head_scheme, self.device.type == "cpu"
        if (self.lm_head is not None or self.quantized_head is not None
                or scheme not in [ON_LOAD[name] for name in HEAD_SCHEMES.get(self.device.type, ())]):
            return
        # In row blocks: the temporaries stay small, and a memory-mapped table's pages are given back as they are read
        # (the lookups read a few rows again later).
        blocks = []
        for rows in self.text.embed_tokens.weight.split(HEAD_ROWS_AT_ONCE):
            blocks.append(quantize(rows, scheme, for_cpu=cpu and cpu_int4_takes(scheme, rows.shape[0])))
            if cpu:
                page_out(rows)
        self.quantized_head = QuantizedWeight.cat(blocks)

    def make_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache for incremental forwards: sliding layers get a ring of `sliding_window` slots (see cache.py)."""
        return KVCache(self.config.text_config, batch_size, max_len, self.dtype, self.device)

    def embed(self, input_ids: torch.Tensor, media_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
              **media) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(token embeddings with image/video/audio soft tokens merged in, ids for the per-layer-embedding lookup,
        image block ids or None); see multimodal.py for `media`.

        `media_embeds` (also accepted by `forward`): (mask [B, L] bool, features [N, text hidden size]), soft tokens
        computed earlier (`multimodal.compute_soft_tokens`) that fill the True positions of `mask` in row-major
        order, instead of raw media run through the towers; the serving engine passes them per prefill chunk.
        Image block ids (bidirectional vision attention) cover the filled image/video tokens of this forward only."""
        if media_embeds is not None:
            from .multimodal import merge_soft_tokens
            if any(v is not None for v in media.values()):
                raise ValueError("pass either media_embeds or raw media inputs, not both")
            return merge_soft_tokens(self, input_ids, *media_embeds)
        if self.config.layout == "text" and not any(v is not None for v in media.values()):
            return self.text.embed_tokens(input_ids), input_ids, None
        # Multimodal checkpoints read placeholder ids as the pad token in every forward, media or not (as the
        # reference does, e.g. for a placeholder id the model generates).
        table = self.text.embed_tokens
        # merge_media without media (every decode step): one launch
        if not media and kernels.enabled(table.weight) and table.whole_vocabulary:
            from ..kernels.step_inputs import scaled_embedding
            config = self.config
            placeholders = (config.image_token_id, config.video_token_id, config.audio_token_id)
            embeds, ple_ids = scaled_embedding(input_ids, table.weight, table.rounded_scale(), placeholders,
                                               config.text_config.pad_token_id or 0)
            return embeds, ple_ids, None
        from .multimodal import merge_media
        return merge_media(self, input_ids, **media)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.lm_head.weight if self.lm_head is not None else self.text.embed_tokens.weight
        if self.quantized_head is not None and self.quantized_head.values.device == hidden.device:
            weight = self.quantized_head
        # As a 2-D product: a 3-D non-contiguous `hidden` (the last position of a prefill) would make matmul expand
        # the [V, H] table into a batched product, which copies it on the CPU.
        logits = linear(hidden.reshape(-1, hidden.shape[-1]), weight).view(*hidden.shape[:-1], -1)
        if self.gather_vocabulary is not None:  # tensor parallel: each rank's rows of the vocabulary, side by side
            logits = self.gather_vocabulary(logits)
        cap = self.config.text_config.final_logit_softcapping
        if cap and kernels.enabled(logits):
            from ..kernels.logits import softcap
            return softcap(logits, cap)
        logits = logits.float()
        return torch.tanh(logits / cap) * cap if cap else logits

    def score_tokens(self, hidden: torch.Tensor, targets: torch.Tensor, top: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """How the model scores targets [N], the token that follows each position whose final hidden state is a row
        of hidden [N, H], by the log-softmax of its logits (fp32, softcapped): (each target's log-probability [N], its
        rank [N]: the count of tokens at least as likely, 1 for the most likely; the `top` most likely tokens' ids
        and log-probabilities [N, top], most likely first). The logits are made SCORE_ROWS positions at a time."""
        parts = []
        for start in range(0, len(hidden), SCORE_ROWS):
            logprobs = self.logits(hidden[start:start + SCORE_ROWS]).log_softmax(-1)
            own = logprobs.gather(1, targets[start:start + SCORE_ROWS, None])
            values, ids = logprobs.topk(top, dim=-1)
            parts.append((own[:, 0], (logprobs >= own).sum(-1), ids, values))
        return tuple(torch.cat(part) for part in zip(*parts))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None, last_only: bool = False,
                return_hidden: bool = False, score: tuple | None = None, **media):
        """input_ids [B, L]; attention_mask [B, L] (1 = token, 0 = padding, left or right); position_ids default to
        the count of real tokens before each one, continuing from the cache.

        `media`: what `gemma4.Processor` returns besides input_ids/attention_mask (pixel_values, image_position_ids,
        pixel_values_videos, video_position_ids, input_features, input_features_mask, ...); their soft tokens fill
        the placeholder tokens of `input_ids`. Pass them only with the forward that holds the placeholders (the
        prefill), not with later decode steps.

        `return_hidden`: (logits, the final hidden states the LM head reads) instead of the logits alone (speculative
        decoding's drafter starts from them).

        `score`: (at [N], targets [N], top): also score targets[n], the token that follows position at[n] of the
        flattened [B * L] positions (`score_tokens`); every position then runs through every layer, and the result
        gets that of `score_tokens` as its last element (the engine's prompt logprobs: inside the forward, so that
        tensor-parallel ranks, which mirror the forward, gather the vocabulary with it)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                 else attention_mask.to(device=input_ids.device, dtype=torch.bool))
        if position_ids is None:  # padding takes no position (and gets 0)
            cached = cache.row_lengths[:, None] if cache is not None else 0
            position_ids = (cached + valid.long().cumsum(dim=1) - 1).masked_fill(~valid, 0)
        limit = self.config.text_config.max_position_embeddings
        # The engine checked the lengths and ids of its requests up front (a host sync here would break CUDA-graph
        # capture).
        if not getattr(cache, "prechecked", False):
            if int(position_ids.max()) >= limit:
                raise ValueError(f"sequence reaches position {int(position_ids.max())}, beyond this model's "
                                 f"max_position_embeddings={limit}")
            check_token_ids(self.config, input_ids)
        embeds, ple_ids, blocks = self.embed(input_ids, **media)
        ctx = ForwardContext(position_ids, valid, cache, blocks, self.config.text_config.sliding_window,
                             cpu_decode=blocks is None and self.text.decodes_on_cpu(embeds, cache))
        if cache is not None:
            cache.begin(position_ids, valid, in_place=ctx.decode_kernel)
        hidden = self.text(embeds, ctx, ple_ids, last_only=last_only and score is None)
        if cache is not None:
            cache.end()
        if score is None:
            return (self.logits(hidden), hidden) if return_hidden else self.logits(hidden)
        at, targets, top = score
        scores = self.score_tokens(hidden.flatten(0, 1)[at], targets, top)
        hidden = hidden[:, -1:] if last_only else hidden
        return (self.logits(hidden), hidden, scores) if return_hidden else (self.logits(hidden), scores)
