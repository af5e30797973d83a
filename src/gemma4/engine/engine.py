"""LLMEngine: requests in (token ids + SamplingParams), one StepOutput per sequence per step out.

    engine = LLMEngine(model, max_num_seqs=64, max_model_len=4096)
    seq_id = engine.add_request(prompt_ids, SamplingParams(max_tokens=32, temperature=0))
    while engine.has_unfinished():
        for out in engine.step(): ...

Not thread-safe: one thread drives it (server/async_engine.py runs it in a background thread).

The host runs one step ahead of the device (docs/architecture.md, "One step"): `step()` queues the next forward
before it reads the tokens of the one in flight, so the GPU is not idle while Python works. A sequence whose token is
still on the device holds a PENDING placeholder as its last output id (`Sequence.pending`), which the next forward
reads on the device; one that stops on that token costs the device a step whose result is dropped.

A row that cannot be sampled (NaN logits) or a forward that raises (out of memory) ends only the sequences concerned,
with finish_reason "error" and a message (`StepOutput.error`); only a device error (CUDA's are sticky) propagates
out of `step()`."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator

import torch

from ..model.gemma4 import check_token_ids
from ..model.multimodal import SoftTokens, compute_soft_tokens, vision_runs
from ..model.paged_cache import kv_cache_dtype_for
from ..quantization import kv_cache_scales
from .block_manager import BlockManager
from .graphs import CAPTURE_LOCK
from .memory import kv_budget, plan_kv
from .runner import Launched, ModelRunner, SampleError
from .sampling import GEMMA4_STOP_IDS, SamplingParams, finish_reason, prompt_logprobs
from .scheduler import Scheduler
from .sequence import PENDING, Sequence, StepOutput
from .speculative import Speculator
from .structured import BadWords, GrammarCompiler

logger = logging.getLogger(__name__)

# Errors after which the device cannot be trusted (CUDA's errors are sticky): the engine stops instead of failing
# one batch after another.
_FATAL = tuple(kind for kind in [getattr(torch, "AcceleratorError", None)] if kind is not None)


class LLMEngine:
    def __init__(self, model, max_num_seqs: int = 64, max_model_len: int | None = None, block_size: int = 16,
                 num_blocks: int | None = None, max_num_batched_tokens: int = 512,
                 stop_token_ids: list[int] | None = None, run_ahead: bool = True,
                 gpu_memory_utilization: float = 0.9, kv_cache_memory: int | None = None,
                 kv_cache_dtype: str = "auto", enable_prefix_caching: bool = True, tokenizer=None,
                 speculative_model=None, num_speculative_tokens: int | None = None, speculative_max_batch: int = 8):
        # KV sized from the memory there is (memory.py), unless num_blocks or kv_cache_memory (bytes) say otherwise;
        # max_model_len None: the longest one sequence fits. ValueError when one sequence of max_model_len cannot.
        # kv_cache_dtype: "auto" (the model's dtype) or "fp8" (e4m3 with per-head scales, 1.0 or the checkpoint's
        # calibrated ones: model/paged_cache.py).
        # tokenizer: gemma4's Tokenizer (or a `tokenizers.Tokenizer`), for structured outputs' grammars over its ids.
        # enable_prefix_caching: requests reuse the K/V of a prompt prefix computed before (block_manager.py), which
        # keeps max(2, max_num_seqs // 4) extra sliding-window rings for it.
        # speculative_model: a drafter (`gemma4_assistant`: a checkpoint path or id, or a loaded model.assistant.
        # Assistant) that proposes num_speculative_tokens (default 4) tokens per decode step of batches of at most
        # speculative_max_batch sequences (speculative.py).
        text = model.config.text_config
        kv_cache_dtype_for(kv_cache_dtype, model.dtype)  # a bad name fails before the memory is profiled
        if num_blocks is None and kv_cache_memory is None:
            kv_cache_memory = kv_budget(model, gpu_memory_utilization, max_num_batched_tokens)
        snapshot_rings = max(2, max_num_seqs // 4) if enable_prefix_caching else 0
        drafter = _drafter(model, speculative_model)
        num_speculative_tokens = (num_speculative_tokens or 4) if drafter is not None else 0
        self.max_model_len, num_blocks = plan_kv(text, model.dtype, max_num_seqs, block_size, max_model_len,
                                                 num_blocks, kv_cache_memory, kv_cache_dtype, snapshot_rings,
                                                 ring_extra=BlockManager.ring_slots_past_window(
                                                     num_speculative_tokens, block_size, snapshot_rings > 0))
        default = getattr(model, "generation_config", {}).get("eos_token_id", list(GEMMA4_STOP_IDS))
        self.stop_token_ids = list(stop_token_ids if stop_token_ids is not None else
                                   [default] if isinstance(default, int) else default)
        self.blocks = BlockManager(text, num_blocks, block_size, max_num_seqs, model.dtype, model.device,
                                   kv_cache_dtype, snapshot_rings, frozenset(self.stop_token_ids),
                                   ring_extra=num_speculative_tokens)
        self.blocks.load_scales_(kv_cache_scales(model))
        self.speculator = Speculator(model, drafter, self.blocks, num_speculative_tokens, speculative_max_batch,
                                     self.max_model_len) if drafter is not None else None
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max(max_num_batched_tokens, 1), self.speculator)
        self.runner = ModelRunner(model, self.blocks, self.max_model_len, self.speculator)
        self.seqs: dict[int, Sequence] = {}
        self.aborted: list[Sequence] = []
        self.run_ahead = run_ahead
        self.in_flight: Launched | None = None  # a step whose batch-sampled tokens the host has not read
        self.mailbox: dict[int, deque[StepOutput]] = {}  # outputs waiting for their `run` (see there)
        self.grammars = GrammarCompiler(tokenizer) if tokenizer is not None else None

    def encode_media(self, prompt_ids: list[int], media: dict) -> SoftTokens:
        """Run the towers once for one prompt: `media` are its processor outputs (pixel_values, image_position_ids,
        input_features, input_features_mask, ...); `prompt_ids` hold the expanded placeholders. ValueError when they
        do not match or an image has more tokens than one step's budget (it must be prefilled in one forward).
        Thread-safe against `step()` (one tower forward at a time, none during a graph capture: graphs.CAPTURE_LOCK),
        so servers may call it off the engine thread."""
        config = self.runner.model.config
        vision = {config.image_token_id, config.video_token_id}
        self._check_runs(vision_runs([t in vision for t in prompt_ids]))  # before running any tower
        with CAPTURE_LOCK:
            soft = compute_soft_tokens(self.runner.model, prompt_ids, **media)
        self._check_runs(soft.vision_runs)
        return soft

    def _check_runs(self, runs: list[tuple[int, int]]) -> None:
        longest = max((b - a for a, b in runs), default=0)
        if longest > self.scheduler.budget:
            raise ValueError(f"an image gives {longest} soft tokens, more than this engine's token budget per step "
                             f"of {self.scheduler.budget} (--max-num-batched-tokens); an image is prefilled in one "
                             "step: use a smaller image budget or raise the limit")

    def add_request(self, prompt_ids: list[int], params: SamplingParams, media: dict | SoftTokens | None = None
                    ) -> int:
        """`media`: the prompt's processor outputs (run through the towers now) or `encode_media`'s result (which
        several requests may share, e.g. the n choices of one prompt)."""
        if len(prompt_ids) == 0:
            raise ValueError("empty prompt: a request needs at least one token")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens + max_tokens {params.max_tokens} exceeds the "
                             f"maximum context length of {self.max_model_len} tokens")
        check_token_ids(self.runner.model.config, prompt_ids)
        if isinstance(media, dict):
            media = self.encode_media(prompt_ids, media) if media else None
        elif media is not None:
            self._check_runs(media.vision_runs)
            if len(media) and int(media.positions[-1]) >= len(prompt_ids):
                raise ValueError("the media's soft tokens lie beyond the prompt")
        stops = [] if params.ignore_eos else (params.stop_token_ids if params.stop_token_ids is not None
                                               else self.stop_token_ids)
        matcher = self._matcher(params, stops)
        seq = Sequence(list(prompt_ids), params, frozenset(stops), media=media, matcher=matcher,
                       prompt_scores=[] if params.prompt_logprobs is not None else None)
        self.seqs[seq.seq_id] = seq
        self.scheduler.waiting.append(seq)
        return seq.seq_id

    def _matcher(self, params: SamplingParams, stops: list[int]):
        """The structured output's matcher, or the bad words' mask (structured.py), or None; ValueError when a
        grammar cannot be compiled."""
        if params.bad_words is not None:
            return BadWords(params.bad_words, self.runner.model.config.text_config.vocab_size)
        if params.structured_outputs is None:
            return None
        if self.grammars is None:
            raise ValueError("structured outputs need the tokenizer: make the engine with LLMEngine(..., tokenizer=)")
        if not stops:
            raise ValueError("structured outputs end on a stop token once the grammar is complete: they cannot be "
                             "combined with ignore_eos or empty stop_token_ids")
        return self.grammars.matcher(params.structured_outputs, stops)

    def abort(self, seq_id: int, output: bool = True) -> None:
        """End a request; the next step reports it (finish_reason "abort") unless `output` is False."""
        if (seq := self.seqs.get(seq_id)) is not None:
            self._finish(seq, "abort")
            if output:
                self.aborted.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self.aborted) or self.in_flight is not None

    def step(self) -> list[StepOutput]:
        outputs = [self._output(seq, None, None) for seq in self.aborted]
        self.aborted = []
        ahead, self.in_flight = self.in_flight, None
        batch = self.scheduler.schedule()
        launched = None
        try:
            launched = self.runner.launch(batch, ahead) if batch else None
        except _FATAL:
            raise
        except Exception as e:  # noqa: BLE001  (out of memory, a bug on one input: those sequences fail, not all)
            logger.exception("a step over %d sequences failed; they are ended with an error", len(batch))
            outputs += [self._fail(item.seq, f"{type(e).__name__}: {e}") for item in batch if not item.seq.finished]
        if launched is not None:  # queued after the forward that computed them: the prefix cache's snapshots
            for item in batch:
                if item.seq.snapshot_points and not item.seq.finished:
                    self.blocks.snapshot(item.seq)
        if ahead is not None:  # the device now has the next step queued: read this one's tokens
            outputs += self._accept(ahead, ahead.collect())
        if launched is not None:
            if self.run_ahead and launched.fast:
                outputs += self._accept(launched, launched.results)  # the rows sampled at once
                self._hold(launched)
            else:
                outputs += self._accept(launched, launched.all_results())
        return outputs

    def _accept(self, launched: Launched, results) -> list[StepOutput]:
        outputs = []
        for item, sampled in zip(launched.batch, results):
            seq = item.seq
            if sampled is None or seq.finished:  # no sample, or dropped: stopped, aborted or finished meanwhile
                continue
            if isinstance(sampled, SampleError):
                outputs.append(self._fail(seq, sampled))
                continue
            prompt = None  # the prompt's logprobs, on the sequence's first output (its prefill's: one token)
            if seq.prompt_scores is not None:
                prompt, seq.prompt_scores = prompt_logprobs(seq.prompt_ids, seq.prompt_scores), None
            if sampled == []:  # scoring only (max_tokens 0): no token, the request ends
                self._finish(seq, "length")
                outputs.append(self._output(seq, None, None, prompt_logprobs=prompt))
                continue
            for token, logprobs in sampled if isinstance(sampled, list) else [sampled]:  # a list: verified drafts
                if seq.pending:  # the placeholder gives way to the token
                    seq.output_ids.pop()
                seq.output_ids.append(token)
                if seq.matcher is not None:  # never PENDING: the runner reads a constrained row's token at once
                    seq.matcher.accept(token)
                if reason := finish_reason(token, len(seq.output_ids), seq.params, seq.stop_ids):
                    self._finish(seq, reason)
                outputs.append(self._output(seq, token, logprobs, prompt_logprobs=prompt))
                if seq.finished:  # a stop token inside an accepted run: the tokens after it are dropped
                    break
        return outputs

    def _hold(self, launched: Launched) -> None:
        """Keep `launched` in flight; its sequences that will go on hold a PENDING token, which the scheduler then
        schedules (and the runner reads on the device) as any other. One that reaches max_tokens with it does not:
        it is not scheduled again before its token is read."""
        self.in_flight = launched
        for row in launched.fast:
            seq = launched.batch[row].seq
            if not seq.finished and len(seq.output_ids) + 1 < seq.params.max_tokens:
                seq.output_ids.append(PENDING)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.pending:  # its token, still on the device, is dropped
            seq.output_ids.pop()
        self.scheduler.finish(seq, reason)
        self.seqs.pop(seq.seq_id, None)

    def _fail(self, seq: Sequence, error: str) -> StepOutput:
        """End `seq` alone with finish_reason "error" (its blocks freed); the engine goes on with the others."""
        self._finish(seq, "error")
        return self._output(seq, None, None, error)

    def _output(self, seq, token, logprobs, error: str | None = None, prompt_logprobs=None) -> StepOutput:
        return StepOutput(seq.seq_id, token, logprobs, seq.finished, seq.finish_reason, len(seq.output_ids), error,
                          prompt_logprobs)

    @property
    def kv_usage(self) -> float:
        return self.blocks.usage

    @property
    def kv_cache_dtype(self) -> str:
        return self.blocks.kv_cache_dtype

    @property
    def max_num_seqs(self) -> int:
        return self.scheduler.max_num_seqs

    def run(self, seq_ids: list[int]) -> Iterator[StepOutput]:
        """Step until the requests `seq_ids` finish, yielding their outputs as they come. Outputs of the other
        requests that this stepping produces wait in their mailboxes for their own `run` (an unfinished
        `LLM.stream` beside a `generate`). Closing the iterator early aborts the requests still running."""
        mine = set(seq_ids)
        try:
            while mine:
                for seq_id in [i for i in seq_ids if i in mine]:
                    box = self.mailbox.get(seq_id)
                    while box:
                        out = box.popleft()
                        if out.finished:
                            mine.discard(seq_id)
                            del self.mailbox[seq_id]
                        yield out
                if mine:
                    for out in self.step():
                        self.mailbox.setdefault(out.seq_id, deque()).append(out)
        finally:
            for seq_id in mine:  # closed early: nobody reads these any more
                self.mailbox.pop(seq_id, None)
                self.abort(seq_id, output=False)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 media: list | None = None) -> list[list[int]]:
        """Run prompts to completion (all submitted at once); returns each one's output token ids. `media`: per
        prompt, None or what `add_request` takes. A request that fails in the engine raises RuntimeError."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        media = media or [None] * len(prompts)
        ids = [self.add_request(p, sp, m) for p, sp, m in zip(prompts, params, media)]
        seqs = [self.seqs[i] for i in ids]  # held here: the engine lets go of a sequence when it ends
        for out in self.run(ids):
            out.raise_error()
        return [seq.output_ids for seq in seqs]

    def warm_up(self) -> None:
        """Compile the kernels and capture the decode step of every batch bucket now (CUDA), so that no request
        pays for them: prompts of a few lengths (a multiple of 16 and not, one past twice the sliding window,
        chunked by the step budget; alone and two together) run through prefill and decode, greedy and sampled;
        then each bucket's decode graph is captured, and the prefill graphs of a new prompt's first chunk. The
        prefix cache forgets these prompts."""
        window = self.runner.model.config.text_config.sliding_window
        greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        sampled = SamplingParams(max_tokens=3, temperature=1.0, top_k=64, top_p=0.95, ignore_eos=True)
        longest = self.max_model_len - greedy.max_tokens  # no prompt longer than max_model_len takes
        for n in sorted({min(n, longest) for n in (256, 2 * window + 37)}):  # one row at a time (kernels specialize)
            self.generate([[0] * n], greedy)
        self.generate([[0] * min(16, longest), [0] * min(23, longest)], [greedy, sampled])
        for graphs in (self.runner.graphs, self.runner.prefill_graphs):
            if graphs is not None:
                graphs.capture_all()
        if self.speculator is not None:
            self.speculator.warm_up()
        self.blocks.clear_prefix_cache()


def _drafter(model, speculative_model):
    """The drafter as a model on the target's device and dtype (None without one). Tensor parallel: every rank loads
    its part of the checkpoint (distributed/runtime.py)."""
    if speculative_model is None:
        return None
    from ..model.assistant import Assistant
    runtime = getattr(model, "parallel_runtime", None)
    if isinstance(speculative_model, Assistant):
        if runtime is not None:
            raise ValueError("with tensor parallelism every rank loads its part of the drafter: pass its checkpoint "
                             "directory, not a loaded model")
        return speculative_model
    if runtime is not None:
        return runtime.load_drafter(speculative_model)
    from ..assistant_checkpoint import load_assistant
    return load_assistant(speculative_model, dtype=model.dtype, device=model.device)
