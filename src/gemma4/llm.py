"""`gemma4.LLM`: text in, text out — generate over many prompts, stream one, chat with tools and thinking."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .engine.generate import left_pad, token_steps
from .engine.sampling import GEMMA4_STOP_IDS, SamplingParams, TokenLogprobs
from .model.gemma4 import Model
from .processing.detokenize import IncrementalText


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token or string) or "length"
    prompt_tokens: int
    logprobs: list[TokenLogprobs] | None = None


class LLM:
    """Load once, then `generate`, `stream` or `chat`.

    `model` is a checkpoint directory, a hub id, or a ready `Model` (then pass `tokenizer`)."""

    def __init__(self, model: str | Path | Model, dtype=None, device: str = "cpu", tokenizer=None,
                 max_batch_size: int = 16):
        from .processing.tokenizer import Tokenizer

        if isinstance(model, Model):
            self.model = model
        else:
            self.model = Model.from_pretrained(model, dtype=dtype, device=device)
        checkpoint = getattr(self.model, "checkpoint_dir", None)
        if tokenizer is None and checkpoint is not None and Path(checkpoint, "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_pretrained(checkpoint)
        elif isinstance(tokenizer, (str, Path)):
            tokenizer = Tokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer
        self.default_params = SamplingParams.defaults_for(checkpoint)
        stops = self.model.generation_config.get("eos_token_id", list(GEMMA4_STOP_IDS))
        self.stop_ids = {stops} if isinstance(stops, int) else set(stops)
        self.max_batch_size = max_batch_size

    # --- prompts ----------------------------------------------------------------------------------
    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer files: pass token id lists, or tokenizer=DIR")
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt")
        return ids

    def _params(self, params: SamplingParams | dict | None) -> SamplingParams:
        if params is None:
            return dataclasses.replace(self.default_params)
        if isinstance(params, dict):
            return SamplingParams.from_dict({**dataclasses.asdict(self.default_params), **params})
        return params

    def _stops(self, params: SamplingParams) -> set[int]:
        return set(params.stop_token_ids) if params.stop_token_ids is not None else self.stop_ids

    # --- generation -------------------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 params: SamplingParams | dict | Sequence[SamplingParams] | None = None,
                 skip_special_tokens: bool = True) -> list[Completion]:
        """Complete every prompt. Prompts of different lengths are left-padded into batches; greedy results do not
        depend on the batching."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self._ids(p) for p in prompts]
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [self._params(params)] * len(ids)
        if len(per_prompt) != len(ids):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(ids)} prompts")
        results: list[Completion] = []
        for start in range(0, len(ids), self.max_batch_size):
            batch = slice(start, start + self.max_batch_size)
            results += self._generate_batch(ids[batch], per_prompt[batch], skip_special_tokens)
        return results

    def _generate_batch(self, prompts: list[list[int]], params: list[SamplingParams], skip: bool):
        ids, mask = left_pad(prompts)
        texts = [IncrementalText(self.tokenizer, p.stop, skip) if self.tokenizer else None for p in params]
        outputs: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list] = [[] for _ in prompts]
        reasons = ["length"] * len(prompts)
        done = [False] * len(prompts)
        stops = [self._stops(p) for p in params]
        for step in token_steps(self.model, ids, mask, params, stops):
            for row, token in enumerate(step.tokens):
                if done[row]:
                    continue
                if token in stops[row] and not params[row].ignore_eos:
                    reasons[row], done[row] = "stop", True
                    continue
                outputs[row].append(token)
                if step.logprobs[row] is not None:
                    logprobs[row].append(step.logprobs[row])
                if texts[row] is not None:
                    texts[row].add(token)
                    if texts[row].stopped:
                        reasons[row], done[row] = "stop", True
                done[row] = done[row] or step.finished[row]
            if all(done):
                break
        return [Completion(texts[r].text if texts[r] else "", outputs[r], reasons[r], len(prompts[r]),
                           logprobs[r] if params[r].logprobs is not None else None) for r in range(len(prompts))]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | dict | None = None,
               skip_special_tokens: bool = True, usage: dict | None = None) -> Iterator[str]:
        """Yield text deltas as tokens arrive (never a partial UTF-8 character or a partial stop string).

        `usage`, if given, is filled with prompt_tokens and completion_tokens as the stream goes."""
        if self.tokenizer is None:
            raise ValueError("streaming text needs a tokenizer")
        params = self._params(params)
        ids = torch.tensor([self._ids(prompt)])
        text = IncrementalText(self.tokenizer, params.stop, skip_special_tokens)
        stops = self._stops(params)
        usage = usage if usage is not None else {}
        usage.update(prompt_tokens=ids.shape[1], completion_tokens=0)
        for step in token_steps(self.model, ids, None, [params], [stops]):
            token = step.tokens[0]
            usage["completion_tokens"] += 1
            if token in stops and not params.ignore_eos:
                break
            if delta := text.add(token):
                yield delta
            if text.stopped or step.finished[0]:
                break
        if delta := text.finish():
            yield delta

    # --- chat -------------------------------------------------------------------------------------
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
        """One assistant turn: {"role", "content", "reasoning_content", "tool_calls", "finish_reason", "usage"}."""
        prompt = self.chat_prompt(messages, tools, enable_thinking, **template_kwargs)
        completion = self.generate([prompt], params, skip_special_tokens=False)[0]
        # The prompt's end says where the answer starts (e.g. inside a thought channel the template opened).
        message = self.tokenizer.parse_response(completion.text, prefix=prompt,
                                                complete=completion.finish_reason == "stop")
        finish = "tool_calls" if message.get("tool_calls") else completion.finish_reason
        usage = {"prompt_tokens": completion.prompt_tokens, "completion_tokens": len(completion.token_ids)}
        return {**message, "finish_reason": finish, "usage": usage}
