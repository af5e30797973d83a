"""Where a serving-engine run spends its time: cProfile of `LLMEngine.generate` on an official preset with random
weights (bf16, or quantized on load with --quantization; CUDA), after a warm-up run that captures the decode graphs.
--kernels: then the device side of a run of decode steps only (every sequence prefilled first): wall time per step
against the device kernels' time, and those kernels by total time (torch.profiler).

    python benchmarks/profile_serving.py --preset E2B --concurrency 64 --prompt 512 --output 64 [--kernels]
"""

import argparse
import cProfile
import pstats
import time

import torch

from gemma4.engine.engine import LLMEngine
from gemma4.engine.sampling import SamplingParams
from gemma4.random_init import random_config, random_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="E2B")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--output", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--quantization", choices=["fp8", "int8", "int4"], default=None)
    parser.add_argument("--kernels", action="store_true")
    args = parser.parse_args()
    model = random_model(random_config(args.preset, args.num_layers, text_only=True), torch.bfloat16, device="cuda",
                         quantization=args.quantization)
    prompts = torch.randint(10, 200_000, (args.concurrency, args.prompt)).tolist()
    engine = LLMEngine(model, max_num_seqs=args.concurrency, max_model_len=args.prompt + args.output,
                       max_num_batched_tokens=8192, enable_prefix_caching=False)  # the warm-up's prompts again
    params = SamplingParams(max_tokens=args.output, ignore_eos=True, temperature=1.0, top_p=0.95, top_k=64)
    engine.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))
    graphs = engine.runner.graphs
    print("graphs:", None if graphs is None else (graphs.usable, sorted(graphs.graphs)))
    profile = cProfile.Profile()
    torch.cuda.synchronize()
    start = time.perf_counter()
    profile.enable()
    engine.generate(prompts, params)
    torch.cuda.synchronize()
    profile.disable()
    elapsed = time.perf_counter() - start
    print(f"{args.concurrency * args.output / elapsed:.0f} output tok/s ({elapsed:.2f} s)")
    pstats.Stats(profile).sort_stats("tottime").print_stats(18)
    if args.kernels:
        decode_kernels(engine, prompts, params)


def decode_kernels(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, steps: int = 30) -> None:
    """Wall and device time of `steps` decode steps with every sequence running, and their kernels."""
    from torch.profiler import ProfilerActivity, profile

    ids = [engine.add_request(p, params) for p in prompts]
    steps = max(1, min(steps, params.max_tokens - 8))  # every sequence still running at the end
    while any(i in engine.seqs and not engine.seqs[i].output_ids for i in ids):  # every prompt prefilled
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    for i in ids:
        engine.abort(i)
    while engine.has_unfinished():
        engine.step()
    kernels = prof.key_averages()
    device = sum(k.self_device_time_total for k in kernels) / 1e3 / steps
    print(f"decode steps of {len(ids)} rows: wall {wall * 1e3:.2f} ms a step (profiled), device kernels "
          f"{device:.2f} ms a step")
    print(kernels.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
