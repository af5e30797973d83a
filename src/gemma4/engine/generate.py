"""Static-batch generation: `Model.generate` (transformers' semantics) and the token loop under `LLM`.

Two paths produce the same tokens: the cached one (prefill, possibly in chunks, then one token per step) and the
naive reference (`use_cache=False`: a full forward over everything each step), kept for tests.

The cached path decodes in one of three modes (`decode=` or the environment variable GEMMA4_DECODE):

* "dynamic": the reference; the cache attends over what was written so far (a few host syncs per step).
* "static": a static cache (fixed shapes, no host syncs in the step), run eagerly; the debugging twin of "graph".
* "graph": the static step (embedding -> logits -> greedy argmax) captured once per (batch, cache size) in a CUDA
  graph and replayed; sampling runs batched on the device (`sample_batch`) where the parameters allow, and then
  the next step is queued before the host reads this one's tokens (the device never waits for the host). CUDA only.
  With GEMMA4_COMPILE=1 the step is compiled with torch.compile (fused kernels) before capture.

"auto" (the default) is "graph" on CUDA and "dynamic" elsewhere; GEMMA4_EAGER=1 turns "graph" into "static".
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

from .. import kernels
from ..model.gemma4 import check_token_ids
from .graphs import CaptureFailed, capture_graph
from .sampling import (GEMMA4_DEFAULTS, GEMMA4_STOP_IDS, SamplingParams, TokenLogprobs, batchable, make_generator,
                       sample_batch, sample_token)

DECODE_MODES = ("auto", "dynamic", "static", "graph")
CACHE_BUCKET = 256  # static caches are sized up to a multiple of this, so nearby lengths share one graph
MAX_RUNNERS = 4  # captured (batch, cache size) pairs kept per model

_FROM_CONFIG = object()  # "use the checkpoint's generation_config" (None means "never stop early")


@dataclass
class Step:
    """One decoding step of a batch: the token each row produced and whether the row is done."""

    tokens: list[int]
    finished: list[bool]
    logprobs: list[TokenLogprobs | None]


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


def check_lengths(model, prompt_len: int, max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    limit = model.config.text_config.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise ValueError(f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds this model's "
                         f"context of {limit} tokens; shorten the prompt or lower max_new_tokens")


def decode_mode(model, requested: str | None = None) -> str:
    mode = requested or os.environ.get("GEMMA4_DECODE", "auto")
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
    if mode == "auto":
        mode = "graph" if model.device.type == "cuda" else "dynamic"
    if mode == "graph" and (model.device.type != "cuda" or os.environ.get("GEMMA4_EAGER", "0") not in ("", "0")):
        mode = "static"
    return mode


class DecodeRunner:
    """One decode step (one token per row) over a static cache, for a fixed batch size and cache size.

    `step(tokens)` feeds last step's tokens [B] (on the device) and returns (logits [B, V] fp32, greedy tokens [B]).
    With `graph=True` the step is captured in a CUDA graph on first use and replayed: its outputs are static buffers,
    overwritten by the next step, so read them before calling `step` again."""

    def __init__(self, model, batch: int, max_len: int, graph: bool, compile: bool = False):
        self.model, self.batch, self.max_len = model, batch, max_len
        self.cache = model.make_cache(batch, max_len, static=True)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
        self.valid = torch.ones(batch, 1, dtype=torch.bool, device=model.device)  # a static mask: no launch per step
        self.graph = None
        self.busy = False
        self.want_graph = graph
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fn = self._step
        if compile:
            self.fn = torch.compile(self._step, dynamic=False)

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(self.ids, attention_mask=self.valid, cache=self.cache, last_only=True)[:, -1]
        if kernels.enabled(logits):
            from ..kernels.logits import argmax
            return logits, argmax(logits)
        return logits, logits.argmax(-1)

    def reset(self) -> None:
        self.cache.reset()

    def capture(self) -> None:
        """Warm up (compiles, lazy inits) and capture; leaves the cache empty. Call before the prefill."""
        if self.graph is not None or not self.want_graph:
            return
        try:
            self.graph, self.outputs = capture_graph(self.fn)
        except CaptureFailed as failure:  # run the same step eagerly
            warnings.warn(f"CUDA graph capture of the decode step failed ({failure}); decoding eagerly")
            self.want_graph = False
        self.cache.reset()

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.ids.copy_(tokens.view(self.batch, 1))
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return self.outputs


def decode_runner(model, batch: int, max_len: int, graph: bool) -> DecodeRunner:
    """The model's runner for this batch size and a cache of at least max_len (kept for later calls)."""
    limit = model.config.text_config.max_position_embeddings
    size = min(-(-max_len // CACHE_BUCKET) * CACHE_BUCKET, limit)
    compile = os.environ.get("GEMMA4_COMPILE", "0") not in ("", "0")
    runners: dict = model.__dict__.setdefault("_decode_runners", {})
    key = (batch, size, graph, compile, model.device)
    runner = runners.pop(key, None)  # re-inserted below: most recently used last
    if runner is None:
        while len(runners) >= MAX_RUNNERS:
            runners.pop(next(iter(runners)))
        runner = DecodeRunner(model, batch, size, graph, compile)
    runners[key] = runner
    return runner


@torch.no_grad()
def token_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, params: list[SamplingParams],
                stop_ids: list[set[int]], use_cache: bool = True, prefill_chunk_size: int | None = None,
                decode: str | None = None, **media) -> Iterator[Step]:
    """Yield one Step per generated position until every row has stopped or used its max_tokens.

    `decode`: "auto", "dynamic", "static" or "graph" (see the module's docstring)."""
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

    mode = decode_mode(model, decode) if use_cache else "naive"
    if mode in ("static", "graph"):
        yield from _static_steps(model, input_ids, valid, params, stop_ids, prefill_chunk_size, media, mode,
                                 generators, prompts)
        return
    if use_cache:
        cache = model.make_cache(batch, prompt_len + max_new)
        logits = _prefill(model, input_ids, valid, cache, prefill_chunk_size, media)
    else:
        cache, sequence, seq_valid = None, input_ids, valid
        logits = model(sequence, attention_mask=seq_valid, **media)[:, -1]

    for step in range(max_new):
        tokens, logprobs = _sample_rows(logits, params, prompts, outputs, stop_ids, generators)
        _advance(tokens, outputs, finished, params, stop_ids)
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


def _static_steps(model, input_ids, valid, params, stop_ids, chunk_size, media, mode, generators,
                  prompts) -> Iterator[Step]:
    """The token loop over a static cache: one host sync per step (reading the tokens back), none inside it."""
    batch, prompt_len = input_ids.shape
    max_new = max(p.max_tokens for p in params)
    check_token_ids(model.config, input_ids)  # Model.forward does not over a static cache (no host syncs there)
    runner = decode_runner(model, batch, prompt_len + max_new, graph=mode == "graph")
    if runner.busy:  # another token loop (an unfinished stream) holds it: use a private one
        runner = DecodeRunner(model, batch, runner.max_len, graph=False)
    runner.busy = True
    try:
        yield from _run_static(runner, model, input_ids, valid, params, stop_ids, chunk_size, media, generators,
                               prompts)
    finally:
        runner.busy = False


def _run_static(runner, model, input_ids, valid, params, stop_ids, chunk_size, media, generators,
                prompts) -> Iterator[Step]:
    batch = input_ids.shape[0]
    max_new = max(p.max_tokens for p in params)
    if max_new > 1:
        runner.capture()  # before the prefill: its warm-up steps write into the cache, which it then empties
    runner.reset()
    logits = _prefill(model, input_ids, valid, runner.cache, chunk_size, media)
    greedy = logits.argmax(-1)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    on_cuda = logits.is_cuda
    tokens_on_host = torch.empty(batch, dtype=torch.long, pin_memory=on_cuda)
    copied = torch.cuda.Event() if on_cuda else None
    for step in range(max_new):
        more = step < max_new - 1
        if all(batchable(params[b], len(outputs[b]), stop_ids[b]) for b in range(batch)):
            chosen = greedy if all(p.greedy for p in params) else sample_batch(logits, params, generators)
            # One step ahead: the next step is queued on the device (it reads `chosen` there, and its replay
            # overwrites `greedy` only after this copy) before the host waits for these tokens, so the GPU runs it
            # while the host handles them. If every row stops here, that step is wasted: it only writes the cache
            # slot after the last token.
            tokens_on_host.copy_(chosen, non_blocking=True)
            if copied is not None:
                copied.record()
            if more:
                logits, greedy = runner.step(chosen)
            launched = more
            if copied is not None:
                copied.synchronize()
            tokens, logprobs = tokens_on_host.tolist(), [None] * batch
        else:
            tokens, logprobs = _sample_rows(logits, params, prompts, outputs, stop_ids, generators)
            chosen = torch.tensor(tokens, dtype=torch.long, device=logits.device)
            launched = False
        _advance(tokens, outputs, finished, params, stop_ids)
        yield Step(tokens, list(finished), logprobs)
        if all(finished) or not more:
            return
        if not launched:
            logits, greedy = runner.step(chosen)


def _sample_rows(logits, params, prompts, outputs, stop_ids, generators):
    """Each row's next token (and logprobs) through the full per-row sampler."""
    sampled = [sample_token(logits[b], params[b], prompts[b], outputs[b], stop_ids[b], generators[b])
               for b in range(len(params))]
    return [t for t, _ in sampled], [lp for _, lp in sampled]


def _advance(tokens, outputs, finished, params, stop_ids) -> None:
    """Append each unfinished row's token; a row finishes on a stop token or at its max_tokens."""
    for b, token in enumerate(tokens):
        if not finished[b]:
            outputs[b].append(token)
            hit_stop = token in stop_ids[b] and not params[b].ignore_eos
            finished[b] = hit_stop or len(outputs[b]) >= params[b].max_tokens


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
             decode: str | None = None, **media) -> torch.Tensor:
    """transformers-style generate: returns prompt + new tokens [B, L + n]; finished rows are padded.

    Unset sampling arguments come from the checkpoint's generation_config.json, as in transformers;
    `eos_token_id=None` means never stop early. `decode`: see token_steps."""
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
                            prefill_chunk_size, decode=decode, **media):
        columns.append([pad if done[b] else t for b, t in enumerate(step.tokens)])
        done = step.finished
    new = torch.tensor(columns, dtype=input_ids.dtype).T.to(input_ids.device)
    return torch.cat([input_ids, new], dim=1)
