"""Where a serving-engine run spends its time: cProfile of `LLMEngine.generate` on an official preset with random
weights (bf16, CUDA), after a warm-up run that captures the decode graphs.

    python benchmarks/profile_serving.py --preset E2B --concurrency 64 --prompt 512 --output 64
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
    args = parser.parse_args()
    model = random_model(random_config(args.preset, args.num_layers, text_only=True), torch.bfloat16, device="cuda")
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


if __name__ == "__main__":
    main()
