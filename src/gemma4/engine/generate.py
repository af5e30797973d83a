"""transformers-style generation on the one engine, and the naive reference generator (tests only).

`generate(model, input_ids, ...)` is `Model.generate`: a left-padded batch in, `[batch, prompt + new]` out, rows that
stopped padded with `pad_token_id`; unset sampling arguments come from the checkpoint's generation_config, as in
transformers; `eos_token_id=None` never stops; `min_new_tokens` holds the stop back; row b draws from `seed + b`.
Each row is one request of the model's `LLMEngine` (`engine_for`: kept on the model and reused, so its CUDA graphs
are captured once, and without prefix caching: each call computes its prompts, as transformers; `kv_cache_dtype`
"auto" or "fp8" picks its KV cache, None keeps the kept engine's);
`use_cache=False` runs `reference_generate` instead. `return_dict_in_generate=True`: a
`GenerateOutput` instead of the tensor.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Mapping

import torch

from ..model.multimodal import batch_soft_tokens
from ..model.paged_cache import kv_cache_dtype_for
from .engine import LLMEngine
from .sampling import GEMMA4_DEFAULTS, GEMMA4_STOP_IDS, SamplingParams, finish_reason, make_generator, sample_token

_FROM_CONFIG = object()  # "use the checkpoint's generation_config" (None means "never stop early")
CONTEXT_BUCKET = 1024  # an engine's context is rounded up to this, so nearby lengths share one engine


def left_pad(prompts, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists (or 1-D tensors) of different lengths -> (ids [B, L], attention_mask [B, L]), left-padded so that
    every row ends at the last column."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
        mask[row, longest - len(prompt):] = 1
    return ids, mask


@dataclasses.dataclass(eq=False)
class GenerateOutput(Mapping):
    """`Model.generate(..., return_dict_in_generate=True)`, as transformers' GenerateDecoderOnlyOutput.

    `sequences` [batch, prompt + new]. `scores` (output_scores): one [batch, vocab] fp32 tensor per new token, the
    scores it was chosen by (sampling.processed_scores: penalties and, when sampling, temperature, then -inf where
    top-k, top-p or min-p drop a token). `logits` (output_logits): the raw logits, likewise. A row's entries after
    it stopped are 0 (transformers keeps what its model computed on the padding). Read as attributes, as keys
    (`out["scores"]`) or by position over the fields that are set (`out[0]` is `sequences`), as transformers'
    ModelOutput."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in iter(self):
                raise KeyError(key)
            return getattr(self, key)
        return tuple(self.values())[key]

    def __iter__(self):  # the names of the fields that are set
        return (f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _Kept:
    """Holds the engine kept on a model (`model.__dict__["_engine"]`); a copy of the model starts without one."""

    def __init__(self, engine: LLMEngine | None = None):
        self.engine = engine

    def __deepcopy__(self, memo) -> "_Kept":
        return _Kept()


def engine_for(model, num_seqs: int, length: int, budget: int | None = None,
               kv_cache_dtype: str | None = None) -> LLMEngine:
    """The engine kept on `model`, rebuilt (larger, never smaller) when a call needs more sequences or a longer
    context than it holds, or another `kv_cache_dtype` ("auto", "fp8"; None: the kept engine's, "auto" for a first
    one). `budget`: tokens per step (the prefill chunk of all rows together); None: as many as `num_seqs` rows of
    `length` tokens."""
    kept = model.__dict__.setdefault("_engine", _Kept())
    engine, limit = kept.engine, model.config.text_config.max_position_embeddings
    if kv_cache_dtype is None:
        kv_cache_dtype = engine.kv_cache_dtype if engine is not None else "auto"
    kv_cache_dtype_for(kv_cache_dtype, model.dtype)  # a bad name fails before the kept engine is dropped
    other_dtype = engine is not None and engine.kv_cache_dtype != kv_cache_dtype
    if engine is None or other_dtype or engine.max_num_seqs < num_seqs or engine.max_model_len < length:
        seqs = max(num_seqs, engine.max_num_seqs if engine else 1)
        context = min(max(-(-length // CONTEXT_BUCKET) * CONTEXT_BUCKET, engine.max_model_len if engine else 0), limit)
        kept.engine = engine = None  # its KV pools and graphs are freed before the new ones are allocated
        free_memory(model)
        engine = kept.engine = LLMEngine(model, max_num_seqs=seqs, max_model_len=context,
                                         kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False)
    engine.scheduler.budget = budget or num_seqs * length
    return engine


def keep_engine(model, engine: LLMEngine) -> None:
    """Make `engine` the one `engine_for` hands out for `model` while calls fit it (LLM's: `llm.model.generate`
    then shares its KV pools and graphs instead of allocating a second engine beside them)."""
    model.__dict__["_engine"] = _Kept(engine)


def free_engine(model) -> None:
    """Drop the engine kept on `model` (its KV pools and CUDA graphs)."""
    model.__dict__.pop("_engine", None)
    free_memory(model)


def free_memory(model) -> None:
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 20, min_new_tokens: int = 0, do_sample: bool | None = None,
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             min_p: float | None = None, repetition_penalty: float | None = None, eos_token_id=_FROM_CONFIG,
             pad_token_id: int | None = None, seed: int | None = None, use_cache: bool = True,
             prefill_chunk_size: int | None = None, return_dict_in_generate: bool = False,
             output_scores: bool = False, output_logits: bool = False, kv_cache_dtype: str | None = None,
             **media) -> torch.Tensor | GenerateOutput:
    """`Model.generate`; see the module docstring. `prefill_chunk_size`: prompt tokens per row and step (default:
    the whole prompt in one step). `output_scores` / `output_logits` count only with `return_dict_in_generate`
    (as in transformers); otherwise nothing is kept."""
    batch, length = input_ids.shape
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    limit = model.config.text_config.max_position_embeddings
    if length + max_new_tokens > limit:
        raise ValueError(f"prompt of {length} tokens + {max_new_tokens} new tokens exceeds this model's "
                         f"context of {limit} tokens; shorten the prompt or lower max_new_tokens")
    # One SamplingParams per row; unset arguments from generation_config.
    defaults = {**GEMMA4_DEFAULTS, "do_sample": True, **getattr(model, "generation_config", {})}
    given = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
             "repetition_penalty": repetition_penalty}
    values = {k: (v if v is not None else defaults.get(k)) for k, v in given.items()}
    values = {k: v for k, v in values.items() if v is not None}
    if not (defaults["do_sample"] if do_sample is None else do_sample):
        values["temperature"] = 0.0
    if eos_token_id is _FROM_CONFIG:
        eos_token_id = defaults.get("eos_token_id", list(GEMMA4_STOP_IDS))
    stops = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if return_dict_in_generate:
        values.update(output_scores=output_scores, output_logits=output_logits)
    params = [SamplingParams(max_tokens=max_new_tokens, min_tokens=min_new_tokens, stop_token_ids=stops,
                             seed=None if seed is None else seed + row, **values) for row in range(batch)]
    pad = pad_token_id if pad_token_id is not None else defaults.get("pad_token_id", 0)
    valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
             else attention_mask.to(input_ids.device, torch.bool))
    media = {k: v for k, v in media.items() if v is not None}
    kept: list[list] = [[] for _ in range(batch)]  # per row: (scores, logits) per new token, when asked
    if not use_cache:
        outputs = reference_generate(model, input_ids, valid, params, kept, **media)
    else:
        prompts = [row[keep].tolist() for row, keep in zip(input_ids.cpu(), valid.cpu())]
        soft = batch_soft_tokens(model, input_ids, valid, **media) if media else [None] * batch
        engine = engine_for(model, batch, length + max_new_tokens,
                            prefill_chunk_size * batch if prefill_chunk_size else None, kv_cache_dtype)
        seq_ids = [engine.add_request(p, sp, m) for p, sp, m in zip(prompts, params, soft)]
        seqs = [engine.seqs[i] for i in seq_ids]  # held here: the engine lets go of a sequence when it ends
        for out in engine.run(seq_ids):
            out.raise_error()
        outputs, kept = [seq.output_ids for seq in seqs], [seq.kept_rows for seq in seqs]
    new = torch.full((batch, max(len(o) for o in outputs)), pad, dtype=input_ids.dtype)
    for row, tokens in enumerate(outputs):
        new[row, :len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
    if not return_dict_in_generate:
        return sequences
    return GenerateOutput(sequences, _per_step(kept, 0, new.shape[1]) if output_scores else None,
                          _per_step(kept, 1, new.shape[1]) if output_logits else None)


def _per_step(kept: list[list], which: int, steps: int) -> tuple[torch.Tensor, ...]:
    """Rows' kept (scores, logits) pairs -> one [batch, vocab] tensor per step (`which`: 0 scores, 1 logits); 0 for
    the steps after a row stopped."""
    first = next(rows[0][which] for rows in kept if rows)
    out = torch.zeros(steps, len(kept), first.shape[-1], dtype=first.dtype, device=first.device)
    for row, rows in enumerate(kept):
        if rows:
            out[:len(rows), row] = torch.stack([pair[which] for pair in rows])
    return tuple(out.unbind(0))


@torch.no_grad()
def reference_generate(model, input_ids: torch.Tensor, valid: torch.Tensor, params: list[SamplingParams],
                       kept: list[list] | None = None, **media) -> list[list[int]]:
    """Each row's new tokens, from a full forward over the prompt and everything generated so far at every step (no
    cache): the reference that the engine's tokens are tested against. `kept`: per row, where sample_token keeps
    the scores and logits its params ask for."""
    device = model.device
    sequence, valid = input_ids.to(device), valid.to(device)
    prompts = [row[keep] for row, keep in zip(sequence, valid)]
    generators = [make_generator(p.seed, device) for p in params]
    outputs: list[list[int]] = [[] for _ in params]
    done = [False] * len(params)
    while not all(done):
        logits = model(sequence, attention_mask=valid, **media)[:, -1]
        tokens = [0] * len(params)  # rows that are done: padding
        for row, p in enumerate(params):
            if not done[row]:
                stops = set() if p.ignore_eos else set(p.stop_token_ids or ())
                tokens[row], _ = sample_token(logits[row], p, prompts[row], outputs[row], stops, generators[row],
                                              kept[row] if kept else None)
                outputs[row].append(tokens[row])
                done[row] = finish_reason(tokens[row], len(outputs[row]), p, stops) is not None
        sequence = torch.cat([sequence, torch.tensor(tokens, device=device)[:, None]], dim=1)
        valid = torch.cat([valid, torch.ones(len(params), 1, dtype=torch.bool, device=device)], dim=1)
    return outputs
