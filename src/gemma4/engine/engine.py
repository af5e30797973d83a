"""LLMEngine: requests in (token ids + SamplingParams), one StepOutput per sequence per step out.

    engine = LLMEngine(model, max_num_seqs=64, max_model_len=4096)
    seq_id = engine.add_request(prompt_ids, SamplingParams(max_tokens=32, temperature=0))
    while engine.has_unfinished():
        for out in engine.step(): ...

Not thread-safe: one thread drives it (server/async_engine.py runs it in a background thread)."""

from __future__ import annotations

from .block_manager import BlockManager
from .runner import ModelRunner
from .sampling import GEMMA4_STOP_IDS, SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, StepOutput


class LLMEngine:
    def __init__(self, model, max_num_seqs: int = 64, max_model_len: int | None = None, block_size: int = 16,
                 num_blocks: int | None = None, max_num_batched_tokens: int = 512,
                 stop_token_ids: list[int] | None = None):
        text = model.config.text_config
        self.max_model_len = min(max_model_len or text.max_position_embeddings, text.max_position_embeddings)
        min_blocks = -(-(self.max_model_len + 1) // block_size)  # one sequence of max_model_len always fits
        num_blocks = max(num_blocks or min_blocks * max_num_seqs, min_blocks)
        self.blocks = BlockManager(text, num_blocks, block_size, max_num_seqs, model.dtype, model.device)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max(max_num_batched_tokens, 1))
        self.runner = ModelRunner(model, self.blocks)
        default = getattr(model, "generation_config", {}).get("eos_token_id", list(GEMMA4_STOP_IDS))
        self.stop_token_ids = list(stop_token_ids if stop_token_ids is not None else
                                   [default] if isinstance(default, int) else default)
        self.seqs: dict[int, Sequence] = {}
        self.aborted: list[Sequence] = []

    def check_request(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        if num_prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        if num_prompt_tokens + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt of {num_prompt_tokens} tokens + max_tokens {params.max_tokens} exceeds the "
                             f"maximum context length of {self.max_model_len} tokens")

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        self.check_request(len(prompt_ids), params)
        stops = [] if params.ignore_eos else (params.stop_token_ids if params.stop_token_ids is not None
                                               else self.stop_token_ids)
        seq = Sequence(list(prompt_ids), params, frozenset(stops))
        self.seqs[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq.seq_id

    def abort(self, seq_id: int) -> None:
        if (seq := self.seqs.pop(seq_id, None)) is not None:
            self.scheduler.finish(seq, "abort")
            self.aborted.append(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self.aborted)

    def step(self) -> list[StepOutput]:
        outputs = [self._output(seq, None, None) for seq in self.aborted]
        self.aborted = []
        batch = self.scheduler.schedule()
        if batch:
            for item, sampled in zip(batch, self.runner.run(batch)):
                if sampled is not None:
                    outputs.append(self._append(item.seq, *sampled))
        return outputs

    def _append(self, seq: Sequence, token: int, logprobs) -> StepOutput:
        seq.output_ids.append(token)
        if token in seq.stop_ids and len(seq.output_ids) > seq.params.min_tokens - 1:
            self._finish(seq, "stop")
        elif len(seq.output_ids) >= seq.params.max_tokens:
            self._finish(seq, "length")
        return self._output(seq, token, logprobs)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.seqs.pop(seq.seq_id, None)

    def _output(self, seq, token, logprobs) -> StepOutput:
        return StepOutput(seq.seq_id, token, logprobs, seq.finished, seq.finish_reason, len(seq.prompt_ids),
                          len(seq.output_ids))

    @property
    def kv_usage(self) -> float:
        return self.blocks.usage

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion (all submitted at once); returns each one's output token ids."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        results: dict[int, list[int]] = {i: [] for i in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.token is not None and out.seq_id in results:
                    results[out.seq_id].append(out.token)
        return [results[i] for i in ids]
