"""transformers-style generation on the one engine, and the naive reference generator (tests only).

`generate(model, input_ids, ...)` is `Model.generate`: a left-padded batch in, `[batch, prompt + new]` out, rows that
stopped padded with `pad_token_id`; unset sampling arguments come from the checkpoint's generation_config, as in
transformers; `eos_token_id=None` never stops; `min_new_tokens` holds the stop back; row b draws from `seed + b`.
Each row is one request of the model's `LLMEngine` (`engine_for`: kept on the model and reused, so its CUDA graphs
are captured once). `use_cache=False` runs `reference_generate` instead: a full forward over everything at every
step, no cache, the same sampler and stop rule.
"""

from __future__ import annotations

import gc

import torch

from ..model.multimodal import batch_soft_tokens
from .engine import LLMEngine
from .sampling import GEMMA4_DEFAULTS, GEMMA4_STOP_IDS, SamplingParams, finish_reason, make_generator, sample_token

_FROM_CONFIG = object()  # "use the checkpoint's generation_config" (None means "never stop early")
CONTEXT_BUCKET = 1024  # an engine's context is rounded up to this, so nearby lengths share one engine


def check_lengths(model, prompt_len: int, max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    limit = model.config.text_config.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise ValueError(f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds this model's "
                         f"context of {limit} tokens; shorten the prompt or lower max_new_tokens")


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


class _Kept:
    """Holds the engine kept on a model (`model.__dict__["_engine"]`); a copy of the model starts without one."""

    def __init__(self, engine: LLMEngine | None = None):
        self.engine = engine

    def __deepcopy__(self, memo) -> "_Kept":
        return _Kept()


def engine_for(model, num_seqs: int, length: int, budget: int | None = None) -> LLMEngine:
    """The engine kept on `model`, rebuilt (larger, never smaller) when a call needs more sequences or a longer
    context than it holds. `budget`: tokens per step (the prefill chunk of all rows together); None: as many as
    `num_seqs` rows of `length` tokens."""
    kept = model.__dict__.setdefault("_engine", _Kept())
    engine, limit = kept.engine, model.config.text_config.max_position_embeddings
    if engine is None or engine.max_num_seqs < num_seqs or engine.max_model_len < length:
        seqs = max(num_seqs, engine.max_num_seqs if engine else 1)
        context = min(max(-(-length // CONTEXT_BUCKET) * CONTEXT_BUCKET, engine.max_model_len if engine else 0),
                      limit)
        kept.engine = engine = None  # its KV pools and graphs are freed before the new ones are allocated
        free_memory(model)
        engine = kept.engine = LLMEngine(model, max_num_seqs=seqs, max_model_len=context)
    engine.scheduler.budget = budget or num_seqs * length
    return engine


def free_engine(model) -> None:
    """Drop the engine kept on `model` (its KV pools and CUDA graphs)."""
    model.__dict__.pop("_engine", None)
    free_memory(model)


def free_memory(model) -> None:
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()


def generation_params(model, batch: int, max_new_tokens: int, min_new_tokens: int = 0, do_sample: bool | None = None,
                      temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                      min_p: float | None = None, repetition_penalty: float | None = None,
                      eos_token_id=_FROM_CONFIG, seed: int | None = None) -> list[SamplingParams]:
    """transformers' generate arguments -> one SamplingParams per row (unset ones from generation_config)."""
    defaults = {**GEMMA4_DEFAULTS, "do_sample": True, **getattr(model, "generation_config", {})}
    do_sample = defaults.get("do_sample", True) if do_sample is None else do_sample
    given = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
             "repetition_penalty": repetition_penalty}
    values = {k: (v if v is not None else defaults.get(k)) for k, v in given.items()}
    values = {k: v for k, v in values.items() if v is not None}
    if not do_sample:
        values["temperature"] = 0.0
    if eos_token_id is _FROM_CONFIG:
        eos_token_id = defaults.get("eos_token_id", list(GEMMA4_STOP_IDS))
    stops = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return [SamplingParams(max_tokens=max_new_tokens, min_tokens=min_new_tokens, stop_token_ids=stops,
                           seed=None if seed is None else seed + row, **values) for row in range(batch)]


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 20, min_new_tokens: int = 0, do_sample: bool | None = None,
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             min_p: float | None = None, repetition_penalty: float | None = None, eos_token_id=_FROM_CONFIG,
             pad_token_id: int | None = None, seed: int | None = None, use_cache: bool = True,
             prefill_chunk_size: int | None = None, **media) -> torch.Tensor:
    """`Model.generate`; see the module docstring. `prefill_chunk_size`: prompt tokens per row and step (default:
    the whole prompt in one step)."""
    batch, length = input_ids.shape
    check_lengths(model, length, max_new_tokens)
    params = generation_params(model, batch, max_new_tokens, min_new_tokens, do_sample, temperature, top_p, top_k,
                               min_p, repetition_penalty, eos_token_id, seed)
    pad = pad_token_id if pad_token_id is not None else getattr(model, "generation_config", {}).get("pad_token_id", 0)
    valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
             else attention_mask.to(input_ids.device, torch.bool))
    media = {k: v for k, v in media.items() if v is not None}
    if not use_cache:
        outputs = reference_generate(model, input_ids, valid, params, **media)
    else:
        prompts = [row[keep].tolist() for row, keep in zip(input_ids.cpu(), valid.cpu())]
        soft = batch_soft_tokens(model, input_ids, valid, **media) if media else None
        engine = engine_for(model, batch, length + max_new_tokens,
                            prefill_chunk_size * batch if prefill_chunk_size else None)
        outputs = engine.generate(prompts, params, soft)
    new = torch.full((batch, max(len(o) for o in outputs)), pad, dtype=input_ids.dtype)
    for row, tokens in enumerate(outputs):
        new[row, :len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    return torch.cat([input_ids, new.to(input_ids.device)], dim=1)


@torch.no_grad()
def reference_generate(model, input_ids: torch.Tensor, valid: torch.Tensor, params: list[SamplingParams],
                       **media) -> list[list[int]]:
    """Each row's new tokens, from a full forward over the prompt and everything generated so far at every step (no
    cache): the reference that the engine's tokens are tested against."""
    device = model.device
    sequence, valid = input_ids.to(device), valid.to(device)
    prompts = [row[keep] for row, keep in zip(sequence, valid)]
    generators = [make_generator(p.seed, device) for p in params]
    outputs: list[list[int]] = [[] for _ in params]
    done = [False] * len(params)
    while not all(done):
        logits = model(sequence, attention_mask=valid, **media)[:, -1]
        tokens = []
        for row, p in enumerate(params):
            token = 0
            if not done[row]:
                stops = set() if p.ignore_eos else set(p.stop_token_ids or ())
                token, _ = sample_token(logits[row], p, prompts[row], outputs[row], stops, generators[row])
                outputs[row].append(token)
                done[row] = finish_reason(token, len(outputs[row]), p, stops) is not None
            tokens.append(token)
        sequence = torch.cat([sequence, torch.tensor(tokens, device=device)[:, None]], dim=1)
        valid = torch.cat([valid, torch.ones(len(params), 1, dtype=torch.bool, device=device)], dim=1)
    return outputs
