"""`gemma4 bench`: how fast an official preset runs here, with random weights (nothing to download), in bf16.

    gemma4 bench --preset 26B-A4B --compare transformers

Measures, in this order (each part can be skipped):

* decode tok/s at batch 1, 8, 32, 64 over a 1K-token context, greedy: batch x steps / the time from the first
  generated token to the last, clocked inside one generation of steps + 1 tokens (transformers: through a
  streamer); best of --repeat (transformers: one timing);
* the serving engine (`LLMEngine`, continuous batching) at concurrency 64, 512 prompt / 512 output tokens, with
  Gemma's default sampling (temperature 1, top-p 0.95, top-k 64) and no early stop: output tok/s of the whole run;
* prefill tok/s and time to first token of one prompt of 2K, 16K, 32K tokens;
* peak GPU memory of each engine.

`--speculative [K]` measures speculative decoding instead (`run_speculative`), with a random drafter of the preset's
shape: the verify step of K + 1 tokens against one decode step, one drafting round, the loop's tok/s with drafts
equal to a plain run's greedy tokens (an oracle, with its acceptance rate), with every draft accepted by force (the
loop's ceiling) and with the random drafter (its floor: it accepts about nothing), the tok/s that published
acceptance rates imply (a projection from the ceiling's round time, with its arithmetic), and decode at batch 64
with and without the drafter (speculation turns itself off above `speculative_max_batch`).

Where the time of a step goes (kernel by kernel, bandwidth reached): benchmarks/decode_timeline.py.

`--compare transformers` then frees our model and runs transformers' Gemma4ForCausalLM (random weights of its own) on
the same shapes, in the same process; having no serving engine, it serves one static batch through `generate`.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch

from .engine.engine import LLMEngine
from .engine.generate import engine_for, free_engine
from .engine.sampling import GEMMA4_DEFAULTS, SamplingParams
from .engine.scheduler import Scheduled
from .llm import PREFILL_BUDGET


@dataclass
class BenchSpec:
    preset: str = "E2B"
    batches: list[int] = field(default_factory=lambda: [1, 8, 32, 64])
    context: int = 1024
    steps: int = 64
    repeat: int = 2
    concurrency: int = 64
    serve_in: int = 512
    serve_out: int = 512
    prefill: list[int] = field(default_factory=lambda: [2048, 16384, 32768])
    prefill_chunk: int = PREFILL_BUDGET  # tokens per prefill step, as `LLM` runs them
    num_layers: int | None = None
    device: str = "cuda"
    quantization: str | None = None  # gemma4's weights quantized on load: fp8, int8 or int4 (transformers: bf16)
    kv_cache_dtype: str = "auto"  # gemma4's KV cache: auto (bf16) or fp8 (transformers: its own)
    speculative: int = 0  # > 0: speculative decoding's figures with this many draft tokens, instead of the others


def timed(fn, device: str, repeat: int = 1) -> float:
    """Best wall time of `repeat` calls of fn, the device synchronized around each."""
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    best = float("inf")
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _random_ids(shape, device, vocab: int) -> torch.Tensor:
    return torch.randint(10, min(200_000, vocab), shape, device=device)


class Engine:
    """What a benchmark needs of an implementation: its name and vocabulary size; `generate(ids, new_tokens, chunk)`
    (greedy); `serve(prompts, new_tokens)`, a serving run returning the tokens it produced; `token_times(ids,
    new_tokens, chunk)`, perf_counter() as each of the `new_tokens` generated tokens reaches the host (greedy)."""

    def decode_seconds(self, ids: torch.Tensor, steps: int, chunk: int, repeat: int) -> float:
        """Time of `steps` decode steps, clocked inside one generation from its first token to its last: no
        difference of two runs, so the prefill's own variation (large for a chunked 64 x 1K prompt) cannot leak into
        the figure. Each token is read back to the host as it comes, so the clock stops on finished work. Best of
        `repeat`."""
        return min(times[-1] - times[0] for times in (self.token_times(ids, steps + 1, chunk) for _ in range(repeat)))

    def free_caches(self) -> None:
        """Drop KV caches and captured graphs kept for reuse, so that one measurement's memory does not add to the
        next one's (the peak then is that of the largest single measurement, as for one user's workload)."""


class Gemma4Engine(Engine):
    name = "gemma4"

    def __init__(self, spec: BenchSpec):
        from .random_init import random_config, random_model

        config = random_config(spec.preset, spec.num_layers, text_only=True)
        self.model = random_model(config, torch.bfloat16, device=spec.device, quantization=spec.quantization)
        self.vocab = config.text_config.vocab_size
        self.engine = None
        self.max_new = spec.serve_out
        self.kv_cache_dtype = spec.kv_cache_dtype

    def generate(self, ids, new_tokens, chunk=None):
        self.model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                            prefill_chunk_size=chunk, kv_cache_dtype=self.kv_cache_dtype)

    def serve(self, prompts, new_tokens):
        batch, length = prompts.shape
        if self.engine is None:  # a server starts once (the warm-up run captures its CUDA graphs)
            self.engine = LLMEngine(self.model, max_num_seqs=batch, max_model_len=length + self.max_new,
                                    max_num_batched_tokens=8192, kv_cache_dtype=self.kv_cache_dtype,
                                    enable_prefix_caching=False)  # the measured run repeats the warm-up's prompts
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, **GEMMA4_DEFAULTS)
        return sum(len(tokens) for tokens in self.engine.generate(prompts.tolist(), params))

    def token_times(self, ids, new_tokens, chunk):
        engine = engine_for(self.model, ids.shape[0], ids.shape[1] + new_tokens, chunk * ids.shape[0],
                            self.kv_cache_dtype)
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        seq_ids = [engine.add_request(row, params) for row in ids.tolist()]
        # One time a step: when the first row's token reaches the host (every row's comes from the same step).
        return [time.perf_counter() for out in engine.run(seq_ids)
                if out.seq_id == seq_ids[0] and out.token is not None]

    def free_caches(self):
        free_engine(self.model)  # the engine kept for model.generate: KV pools and decode graphs
        self.engine = None


class TransformersEngine(Engine):
    def __init__(self, spec: BenchSpec):
        import transformers

        from .random_init import random_config

        self.name = f"transformers {transformers.__version__}"
        config = transformers.Gemma4TextConfig(**random_config(spec.preset, spec.num_layers).text_config.to_dict())
        with torch.device(spec.device):
            self.model = transformers.Gemma4ForCausalLM._from_config(config, dtype=torch.bfloat16,
                                                                     attn_implementation="sdpa").eval()
        self.vocab = config.vocab_size

    def generate(self, ids, new_tokens, chunk=None, streamer=None):
        self.model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            eos_token_id=None, pad_token_id=0, streamer=streamer)

    def token_times(self, ids, new_tokens, chunk):
        from transformers.generation.streamers import BaseStreamer

        times = []

        class Clock(BaseStreamer):  # generate() hands over the prompt, then each step's tokens, moved to the host
            def put(self, value):
                value.cpu()
                times.append(time.perf_counter())

            def end(self):
                pass

        self.generate(ids, new_tokens, streamer=Clock())
        return times[1:]  # the first put() is the prompt

    def serve(self, prompts, new_tokens):
        out = self.model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                                  eos_token_id=None, pad_token_id=0, **GEMMA4_DEFAULTS)
        return (out.shape[1] - prompts.shape[1]) * prompts.shape[0]


def run_engine(engine: Engine, spec: BenchSpec, log=print) -> dict:
    """Every figure of one engine: {(metric, shape): value}."""
    device, results = spec.device, {}
    peaks = []  # each phase's peak memory (see _free)
    repeat = spec.repeat if isinstance(engine, Gemma4Engine) else 1  # transformers: one timing (slow enough)

    def record(metric, shape, value):
        results[(metric, shape)] = value
        log(f"  {engine.name:<22} {metric:<22} {shape:<18} {value:,.2f}")

    for batch in spec.batches:
        ids = _random_ids((batch, spec.context), device, engine.vocab)
        # The prompt in chunks of about prefill_chunk tokens in all (64 x 1K tokens at once need more memory than
        # the 26B-A4B leaves on an 80 GB card); prefill time cancels out of the figure anyway.
        chunk = max(1, spec.prefill_chunk // batch)
        try:
            engine.generate(ids, spec.steps + 1, chunk)  # warm-up: captures / compiles this batch size
            seconds = engine.decode_seconds(ids, spec.steps, chunk, repeat)
            record("decode tok/s", f"b{batch} ctx{spec.context}", batch * spec.steps / seconds)
        except torch.OutOfMemoryError:
            record("decode tok/s", f"b{batch} ctx{spec.context}", float("nan"))
        engine.free_caches()
        _free(peaks)
    if spec.concurrency:
        prompts = _random_ids((spec.concurrency, spec.serve_in), device, engine.vocab)
        shape = f"c{spec.concurrency} {spec.serve_in}/{spec.serve_out}"
        try:
            engine.serve(prompts, min(8, spec.serve_out))  # warm-up, as a server's start-up: not in the figure
            start = time.perf_counter()
            produced = engine.serve(prompts, spec.serve_out)
            record("serving output tok/s", shape, produced / (time.perf_counter() - start))
            if getattr(engine, "engine", None) is not None:  # how our engine decoded: graphs or eager (and why)
                graphs = engine.engine.runner.graphs
                log(f"  serving decode steps: {graphs.describe() if graphs is not None else 'eager'}")
        except torch.OutOfMemoryError:
            record("serving output tok/s", shape, float("nan"))
        engine.free_caches()
        _free(peaks)
    for length in spec.prefill:
        ids = _random_ids((1, length), device, engine.vocab)
        label = f"{length // 1024}K" if length % 1024 == 0 else str(length)
        try:
            engine.generate(ids, 1, spec.prefill_chunk)  # warm-up: kernels compiled for these very shapes
            ttft = timed(lambda: engine.generate(ids, 1, spec.prefill_chunk), device, repeat)
            record("prefill tok/s", label, length / ttft)
            record("TTFT s", label, ttft)
        except torch.OutOfMemoryError:
            record("prefill tok/s", label, float("nan"))
        engine.free_caches()
        _free(peaks)
    if device == "cuda":
        record("peak memory GiB", "", max(peaks + [torch.cuda.max_memory_allocated()]) / 2**30)
    return results


def _free(peaks: list | None = None) -> None:
    """Release a phase's memory; `peaks` first gets the phase's peak (an engine made in a later phase resets the
    device's peak counter when it measures its largest prefill step: engine/memory.py)."""
    if peaks is not None and torch.cuda.is_available():
        peaks.append(torch.cuda.max_memory_allocated())
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench(spec: BenchSpec, compare: str | None = None, log=print) -> tuple[dict, dict | None]:
    """Our figures, then (with compare="transformers") transformers' on the same shapes: one model at a time."""
    def measure(make) -> dict:
        engine = make(spec)
        if spec.device == "cuda":  # the weights stay counted, not how they were made (bf16 first, then quantized)
            torch.cuda.reset_peak_memory_stats()
        results = run_engine(engine, spec, log)
        del engine
        _free()  # the engine, no longer referenced
        return results

    if spec.speculative:
        return run_speculative(Gemma4Engine(spec).model, spec, log), None
    return measure(Gemma4Engine), measure(TransformersEngine) if compare == "transformers" else None


# Acceptance of each draft position at 4 draft tokens reported for Gemma 4's released drafters (issue 24's sources:
# vLLM, SGLang, llama.cpp and Ollama reports): the share of rounds whose first j drafts are all accepted.
PUBLISHED_ACCEPTANCE = (0.84, 0.60, 0.39, 0.27)


def run_speculative(model, spec: BenchSpec, log=print) -> dict:
    """Speculative decoding's figures at batch 1 over a spec.context-token prompt (see the module's docstring)."""
    from .assistant_checkpoint import random_assistant, random_assistant_config

    k, steps, device, results = spec.speculative, spec.steps, spec.device, {}
    drafter = random_assistant(random_assistant_config(spec.preset), torch.bfloat16, device=device)

    def record(metric, shape, value):
        results[(metric, shape)] = value
        log(f"  {'gemma4':<22} {metric:<34} {shape:<12} {value:,.2f}")

    def engine(batch, with_drafter):
        made = LLMEngine(model, max_num_seqs=batch, max_model_len=max(spec.context + steps + k + 2, 512),
                         max_num_batched_tokens=max(spec.prefill_chunk, spec.context), enable_prefix_caching=False,
                         speculative_model=drafter if with_drafter else None, num_speculative_tokens=k)
        made.warm_up()
        return made

    def tok_s(made, prompts, oracle=None, accept_all=False):
        """Output tok/s of greedy generation, clocked from the step where the last sequence got its first token
        (every prefill done) to the last token; best of repeat."""
        if made.speculator is not None:
            made.speculator.oracle, made.speculator.accept_all = oracle, accept_all
            made.speculator.num_drafted = made.speculator.num_accepted = 0
        params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
        best = 0.0
        for _ in range(max(spec.repeat, 1)):
            ids = [made.add_request(p, params) for p in prompts]
            times = [(time.perf_counter(), out.num_output_tokens) for out in made.run(ids) if out.token is not None]
            start = max(i for i, (_, n) in enumerate(times) if n == 1)
            best = max(best, (len(times) - 1 - start) / (times[-1][0] - times[start][0]))
        return best

    prompt = _random_ids((1, spec.context), device, model.config.text_config.vocab_size).tolist()
    plain = engine(1, False)
    reference = plain.generate(prompt, SamplingParams(max_tokens=steps + k + 1, temperature=0.0, ignore_eos=True))[0]
    baseline = tok_s(plain, prompt)
    record("decode tok/s", "b1", baseline)
    del plain
    _free()
    fast = engine(1, True)
    # One sequence after its prefill: one decode step, one verify step of k + 1 rows, one drafting round.
    seq_id = fast.add_request(prompt[0], SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True))
    fast.step()
    seq, runner = fast.seqs[seq_id], fast.runner
    row = [Scheduled(seq, 1)]  # forwards that leave num_cached as it is: each timing repeats the same step
    decode_ms = _median_ms(lambda: runner.verify_forward(row, [[]]), device)
    verify_ms = _median_ms(lambda: runner.verify_forward(row, [reference[1:k + 1]]), device)
    draft_ms = _median_ms(lambda: fast.speculator.draft([seq], [k]), device)
    fast.abort(seq_id)
    while fast.has_unfinished():
        fast.step()
    record("decode step ms", "b1", decode_ms)
    record(f"verify step ms ({k + 1} tokens)", "b1", verify_ms)
    record("verify / decode step", "b1", verify_ms / decode_ms)
    record(f"drafting round ms ({k} steps)", "b1", draft_ms)
    # The target's greedy tokens of a plain run as drafts: in bf16 the verify step's numerics differ from the decode
    # step's, so a random model's greedy text drifts off them after a while (the acceptance rate shows how soon).
    # Hence also every draft accepted by force: the same loop, the same work, as if the drafts were always right.
    record("oracle drafter tok/s", "b1", tok_s(fast, prompt, lambda s: reference[len(s.output_ids):]))
    spec_state = fast.speculator
    record("oracle acceptance rate", "b1", spec_state.num_accepted / max(spec_state.num_drafted, 1))
    oracle = tok_s(fast, prompt, accept_all=True)
    record("all drafts accepted tok/s", "b1", oracle)
    record("all accepted / plain decode", "b1", oracle / baseline)
    record("random drafter tok/s", "b1", tok_s(fast, prompt))
    rates = PUBLISHED_ACCEPTANCE[:k]
    expected = 1 + sum(rates)  # tokens per round: the target's own, plus each draft accepted with its rate
    log(f"  projection: {expected:.2f} tokens a round (1 + {' + '.join(map(str, rates))}) in the full round's time "
        f"of {(k + 1) / oracle * 1e3:.2f} ms ({k + 1} tokens a round): {expected:.2f} / {k + 1} x {oracle:,.1f} tok/s")
    record("projected tok/s (published rates)", "b1", oracle * expected / (k + 1))
    record("projected / plain decode", "b1", oracle * expected / (k + 1) / baseline)
    del fast
    _free()
    prompts = _random_ids((64, spec.context), device, model.config.text_config.vocab_size).tolist()
    for with_drafter in (False, True):
        made = engine(64, with_drafter)
        record(f"decode tok/s {'with' if with_drafter else 'without'} drafter", "b64", tok_s(made, prompts))
        del made
        _free()
    return results


def _median_ms(fn, device: str, repeat: int = 21) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    fn()
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def table(spec: BenchSpec, mine: dict, theirs: dict | None) -> str:
    device = torch.cuda.get_device_name() if spec.device == "cuda" else "cpu"
    kv = ", fp8 KV cache" if spec.kv_cache_dtype == "fp8" else ""
    weights = f"{spec.quantization} weights (quantized on load)" if spec.quantization else "bf16"
    lines = [f"{spec.preset} {weights}{kv}, random weights, on {device}, torch {torch.__version__}",
             "| metric | shape | gemma4 |" + (" transformers | ratio |" if theirs else ""),
             "| --- | --- | ---: |" + (" ---: | ---: |" if theirs else "")]
    for (metric, shape), value in mine.items():
        row = f"| {metric} | {shape} | {value:,.2f} |"
        if theirs is not None:
            other = theirs.get((metric, shape), float("nan"))
            lower_is_better = metric in ("TTFT s", "peak memory GiB")
            ratio = (other / value if lower_is_better else value / other) if other and value else float("nan")
            row += f" {other:,.2f} | {ratio:.1f}x |"
        lines.append(row)
    return "\n".join(lines)
