"""Static-batch generation: `Model.generate` (transformers' semantics) and the token loop under `LLM`.

Two paths produce the same tokens: the cached one (prefill, possibly in chunks, then one token per step) and the
naive reference (`use_cache=False`: a full forward over everything each step), kept for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .sampling import (GEMMA4_DEFAULTS, GEMMA4_STOP_IDS, SamplingParams, TokenLogprobs, make_generator,
                       sample_token)

_FROM_CONFIG = object()  # "use the checkpoint's generation_config" (None means "never stop early")


@dataclass
class Step:
    """One decoding step of a batch: the token each row produced and whether the row is done."""

    tokens: list[int]
    finished: list[bool]
    logprobs: list[TokenLogprobs | None]


def check_lengths(model, prompt_len: int, max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    limit = model.config.text_config.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise ValueError(f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds this model's "
                         f"context of {limit} tokens; shorten the prompt or lower max_new_tokens")


@torch.no_grad()
def token_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, params: list[SamplingParams],
                stop_ids: list[set[int]], use_cache: bool = True, prefill_chunk_size: int | None = None,
                **media) -> Iterator[Step]:
    """Yield one Step per generated position until every row has stopped or used its max_tokens."""
    batch, prompt_len = input_ids.shape
    device = model.device
    input_ids = input_ids.to(device)
    valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
             else attention_mask.to(device=device, dtype=torch.bool))
    max_new = max(p.max_tokens for p in params)
    check_lengths(model, prompt_len, max_new)
    generators = [make_generator(p.seed, device) for p in params]
    prompts = [input_ids[b][valid[b]] for b in range(batch)]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch

    if use_cache:
        cache = model.make_cache(batch, prompt_len + max_new)
        logits = _prefill(model, input_ids, valid, cache, prefill_chunk_size, media)
    else:
        cache, sequence, seq_valid = None, input_ids, valid
        logits = model(sequence, attention_mask=seq_valid, **media)[:, -1]

    for step in range(max_new):
        sampled = [sample_token(logits[b], params[b], prompts[b], outputs[b], stop_ids[b], generators[b])
                   for b in range(batch)]
        tokens, logprobs = [t for t, _ in sampled], [lp for _, lp in sampled]
        for b, token in enumerate(tokens):
            if not finished[b]:
                outputs[b].append(token)
                hit_stop = token in stop_ids[b] and not params[b].ignore_eos
                finished[b] = hit_stop or len(outputs[b]) >= params[b].max_tokens
        yield Step(tokens, list(finished), logprobs)
        if all(finished) or step == max_new - 1:
            return
        new = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        if cache is not None:
            logits = model(new, cache=cache, last_only=True)[:, -1]
        else:
            sequence = torch.cat([sequence, new], dim=1)
            seq_valid = torch.cat([seq_valid, torch.ones_like(new, dtype=torch.bool)], dim=1)
            logits = model(sequence, attention_mask=seq_valid, **media)[:, -1]


def _prefill(model, input_ids, valid, cache, chunk_size, media) -> torch.Tensor:
    """Run the prompt through the cache, in chunks if asked; return the last position's logits."""
    length = input_ids.shape[1]
    chunk_size = chunk_size or length
    if media and chunk_size < length:
        raise ValueError("prompts with images or audio are prefilled in one chunk")
    logits = None
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        logits = model(input_ids[:, start:end], attention_mask=valid[:, start:end], cache=cache,
                       last_only=True, **media)
    return logits[:, -1]


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 20, do_sample: bool | None = None, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
             repetition_penalty: float | None = None, eos_token_id=_FROM_CONFIG, pad_token_id: int | None = None,
             seed: int | None = None, use_cache: bool = True, prefill_chunk_size: int | None = None,
             **media) -> torch.Tensor:
    """transformers-style generate: returns prompt + new tokens [B, L + n]; finished rows are padded.

    Unset sampling arguments come from the checkpoint's generation_config.json, as in transformers;
    `eos_token_id=None` means never stop early."""
    check_lengths(model, input_ids.shape[1], max_new_tokens)
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
    stop = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else defaults.get("pad_token_id", 0)
    batch = input_ids.shape[0]
    params = [SamplingParams(max_tokens=max_new_tokens, seed=None if seed is None else seed + b, **values)
              for b in range(batch)]
    columns = []
    done = [False] * batch
    for step in token_steps(model, input_ids, attention_mask, params, [stop] * batch, use_cache,
                            prefill_chunk_size, **media):
        columns.append([pad if done[b] else t for b, t in enumerate(step.tokens)])
        done = step.finished
    new = torch.tensor(columns, dtype=input_ids.dtype).T.to(input_ids.device)
    return torch.cat([input_ids, new], dim=1)
