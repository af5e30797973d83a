"""`gemma4.LLM`: text in, text out — generate over many prompts, stream one, chat with tools and thinking."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .engine.engine import LLMEngine
from .engine.generate import keep_engine
from .engine.memory import summary
from .engine.sampling import SamplingParams, TokenLogprobs
from .model.gemma4 import Gemma4
from .pretrained import Model
from .processing.detokenize import IncrementalText

logger = logging.getLogger(__name__)

PREFILL_BUDGET = 8192  # prompt tokens per engine step (chunked prefill beyond it), as vLLM's default


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token or string) or "length"
    prompt_tokens: int
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # SamplingParams.prompt_logprobs: None for the first


class LLM:
    """Load once, then `generate`, `stream` or `chat`.

    `model` is a checkpoint directory, a hub id, or a ready `Model` (then pass `tokenizer`). `dtype` None: the
    checkpoint's; `device` "auto": CUDA when present, else the CPU. One engine serves every call, made here as
    `gemma4 serve` makes its own: up to `max_batch_size` sequences (None: 16, fewer if the KV cache of 16 does not
    fit) of up to `max_model_len` tokens (None: the longest that fits), its KV cache sized from the memory that the
    weights and the largest prefill step leave of `gpu_memory_utilization` x the GPU's (on the CPU: 4 GiB at most; see
    engine/memory.py). `quantization`: "fp8", "int8" or "int4" quantizes a bf16 checkpoint's decoder weights on load
    (a compressed-tensors checkpoint loads quantized without it). `kv_cache_dtype`: "auto" (the model's dtype) or
    "fp8" (e4m3 with per-head scales: half the bytes, twice the context). `enable_prefix_caching`: a prompt that
    starts with an earlier prompt reuses its KV cache (engine/block_manager.py). `tensor_parallel_size` N > 1: the
    checkpoint is split over N processes of this host (one GPU each, or CPU processes), this one driving the engine
    with the first part; `enable_expert_parallel` splits MoE experts whole rather than each expert's width
    (docs/distributed.md; `gemma4.distributed.shutdown()` ends the processes). `speculative_model`: a drafter
    checkpoint (`gemma4_assistant`, e.g. google/gemma-4-31B-it-assistant) that proposes `num_speculative_tokens`
    (None: 4) tokens per decode step, verified by the model in one forward: the same outputs, faster at small batches
    (engine/speculative.py). On CUDA it is warmed up (kernels compiled, decode graphs captured) before the first
    call. A summary is logged at INFO level."""

    def __init__(self, model: str | Path | Gemma4, dtype=None, device: str = "auto", tokenizer=None,
                 max_batch_size: int | None = None, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.9, quantization: str | None = None, kv_cache_dtype: str = "auto",
                 enable_prefix_caching: bool = True, tensor_parallel_size: int = 1,
                 enable_expert_parallel: bool = False, speculative_model: str | Path | None = None,
                 num_speculative_tokens: int | None = None):
        from .model.paged_cache import kv_cache_dtype_for
        from .processing.tokenizer import Tokenizer

        kv_cache_dtype_for(kv_cache_dtype, None)  # a bad name fails before the model is loaded
        if quantization is not None and isinstance(model, Gemma4):
            raise ValueError("quantization= applies when LLM loads a checkpoint; load the model with "
                             "Model.from_pretrained(path, quantization=...) instead")

        start = time.perf_counter()
        if tensor_parallel_size != 1:
            if isinstance(model, Gemma4):
                raise ValueError("tensor_parallel_size= applies when LLM loads a checkpoint: pass its directory")
            from .distributed import load_parallel
            model = load_parallel(model, tensor_parallel_size, enable_expert_parallel, dtype=dtype, device=device,
                                  quantization=quantization, speculative_model=speculative_model)
        self.model = model if isinstance(model, Gemma4) else Model.from_pretrained(model, dtype=dtype, device=device,
                                                                                    quantization=quantization)
        checkpoint = getattr(self.model, "checkpoint_dir", None)
        if tokenizer is None and checkpoint is not None and Path(checkpoint, "tokenizer.json").is_file():
            tokenizer = Path(checkpoint)
        self.tokenizer = Tokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        self.default_params = SamplingParams.defaults_for(checkpoint)
        seqs = max_batch_size or 16
        while True:  # each sequence holds sliding-window rings: 800 MiB for 31B, so 16 may not fit beside it
            try:
                self.engine = LLMEngine(self.model, max_num_seqs=seqs, max_model_len=max_model_len,
                                        max_num_batched_tokens=PREFILL_BUDGET, tokenizer=self.tokenizer,
                                        gpu_memory_utilization=gpu_memory_utilization, kv_cache_dtype=kv_cache_dtype,
                                        enable_prefix_caching=enable_prefix_caching,
                                        speculative_model=speculative_model,
                                        num_speculative_tokens=num_speculative_tokens)
                break
            except ValueError:
                if max_batch_size is not None or seqs == 1:
                    raise
                seqs //= 2
        self.max_batch_size = seqs
        keep_engine(self.model, self.engine)
        if self.model.device.type == "cuda":  # compile the kernels and capture the graphs before the first request
            self.engine.warm_up()
        logger.info("gemma4.LLM: %s", summary(self.engine, time.perf_counter() - start))

    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer files: pass token id lists, or tokenizer=DIR")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]  # the engine refuses an empty one

    def _params(self, params: SamplingParams | dict | None) -> SamplingParams:
        if params is None:
            return dataclasses.replace(self.default_params)
        if isinstance(params, dict):
            return SamplingParams.from_dict({**dataclasses.asdict(self.default_params), **params})
        return params

    def _requests(self, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[LLMEngine, list[int]]:
        """Add the requests to the engine, all or none (one it refuses, e.g. longer than max_model_len, raises)."""
        engine, seq_ids = self.engine, []
        engine.scheduler.budget = PREFILL_BUDGET  # Model.generate on the same engine may have set its own
        try:
            for ids, p in zip(prompts, params):
                seq_ids.append(engine.add_request(ids, p))  # stop_token_ids None: the checkpoint's
        except Exception:
            for seq_id in seq_ids:
                engine.abort(seq_id, output=False)
            raise
        return engine, seq_ids

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 params: SamplingParams | dict | Sequence[SamplingParams] | None = None,
                 skip_special_tokens: bool = True) -> list[Completion]:
        """Complete every prompt, up to `max_batch_size` at a time (continuous batching: a finished one makes room
        for the next); results do not depend on what runs beside them (greedy, or seeded)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self._ids(p) for p in prompts]
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [self._params(params)] * len(ids)
        if len(per_prompt) != len(ids):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(ids)} prompts")
        engine, seq_ids = self._requests(ids, per_prompt)
        rows = {seq_id: row for row, seq_id in enumerate(seq_ids)}
        texts = [IncrementalText(self.tokenizer, p.stop, skip_special_tokens) if self.tokenizer else None
                 for p in per_prompt]
        outputs: list[list[int]] = [[] for _ in ids]
        logprobs: list[list] = [[] for _ in ids]
        prompt_logprobs: list[list | None] = [None] * len(ids)
        reasons = ["length"] * len(ids)
        for out in engine.run(seq_ids):
            row = rows[out.seq_id]
            out.raise_error()
            if out.prompt_logprobs is not None:
                prompt_logprobs[row] = out.prompt_logprobs
            # After a stop string, the tokens that came in the same step (a drafter's accepted run) are dropped.
            cut = texts[row] is not None and texts[row].stopped
            if out.token is not None and not cut and not (out.finished and out.finish_reason == "stop"):
                outputs[row].append(out.token)
                if out.logprobs is not None:
                    logprobs[row].append(out.logprobs)
                if texts[row] is not None and not texts[row].stopped:
                    texts[row].add(out.token)
                    if texts[row].stopped:  # a stop string: the request ends here
                        reasons[row] = "stop"
                        engine.abort(out.seq_id)
            if out.finished and out.finish_reason != "abort":
                reasons[row] = out.finish_reason
        return [Completion(texts[r].text if texts[r] else "", outputs[r], reasons[r], len(ids[r]),
                           logprobs[r] if per_prompt[r].logprobs is not None else None, prompt_logprobs[r])
                for r in range(len(ids))]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | dict | None = None,
               skip_special_tokens: bool = True, usage: dict | None = None) -> Iterator[str]:
        """Yield text deltas as tokens arrive (never a partial UTF-8 character or a partial stop string).

        `usage`, if given, is filled with prompt_tokens and completion_tokens as the stream goes."""
        if self.tokenizer is None:
            raise ValueError("streaming text needs a tokenizer")
        params = self._params(params)
        ids = self._ids(prompt)
        text = IncrementalText(self.tokenizer, params.stop, skip_special_tokens)
        usage = usage if usage is not None else {}
        usage.update(prompt_tokens=len(ids), completion_tokens=0)
        engine, (seq_id,) = self._requests([ids], [params])
        for out in engine.run([seq_id]):  # leaving the loop early (a stop string) aborts the request
            out.raise_error()
            if out.token is None:
                continue
            usage["completion_tokens"] = out.num_output_tokens
            if out.finished and out.finish_reason == "stop":
                break
            if delta := text.add(out.token):
                yield delta
            if text.stopped:
                break
        if delta := text.finish():
            yield delta

    def chat_prompt(self, messages: list[dict], tools: list | None = None, enable_thinking: bool = False,
                    **template_kwargs) -> list[int]:
        from .processing.chat import openai_to_gemma_messages

        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template")
        return self.tokenizer.apply_chat_template(openai_to_gemma_messages(messages), tools=tools,
                                                  add_generation_prompt=True, tokenize=True,
                                                  enable_thinking=enable_thinking, **template_kwargs)

    def chat(self, messages: list[dict], tools: list | None = None, enable_thinking: bool = False,
             params: SamplingParams | dict | None = None, **template_kwargs) -> dict:
        """One assistant turn: {"role", "content", "reasoning_content", "tool_calls", "finish_reason", "usage"}.
        A structured output in `params` (`structured_outputs`) holds the answer; with thinking on, it starts once the
        thought channel closes."""
        prompt = self.chat_prompt(messages, tools, enable_thinking, **template_kwargs)
        params = self._params(params)
        if params.structured_outputs is not None and enable_thinking:  # the grammar starts after <channel|>
            params = dataclasses.replace(params, structured_outputs=dataclasses.replace(
                params.structured_outputs, start_after=self.tokenizer.channel_end_id))
        completion = self.generate([prompt], params, skip_special_tokens=False)[0]
        # The prompt's end says where the answer starts (e.g. inside a thought channel the template opened).
        message = self.tokenizer.parse_response(completion.text, prefix=prompt,
                                                complete=completion.finish_reason == "stop")
        finish = "tool_calls" if message.get("tool_calls") else completion.finish_reason
        usage = {"prompt_tokens": completion.prompt_tokens, "completion_tokens": len(completion.token_ids)}
        return {**message, "finish_reason": finish, "usage": usage}
