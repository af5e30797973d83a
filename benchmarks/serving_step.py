"""Where a serving-engine decode step's time goes at batch B (random weights of an official preset, bf16, CUDA):
the captured forward replayed alone, GraphedDecode.run (the host filling its static inputs, then the replay), the
sampler on the step's logits (Gemma's default sampling: temperature 1, top-p 0.95, top-k 64), and a whole
`LLMEngine.step()` (scheduler, forward, sampling, bookkeeping). Each is synchronized and timed on its own: medians
in ms. Then engine steps back to back (as a server runs them), the host reading each step's tokens before the next
("in turn") and one step ahead of the device (the default): ms per step.

    python benchmarks/serving_step.py --preset E2B --batch 1 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gemma4.engine.engine import LLMEngine
from gemma4.engine.sampling import SamplingParams, sample_batch
from gemma4.random_init import random_config, random_model


def median_ms(fn, repeat: int = 40) -> float:
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[5:])


def loop_ms(fn, steps: int = 40) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="E2B")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt", type=int, default=512)
    args = parser.parse_args()
    model = random_model(random_config(args.preset, None, text_only=True), torch.bfloat16, device="cuda")
    params = SamplingParams(max_tokens=1000, ignore_eos=True, temperature=1.0, top_p=0.95, top_k=64)
    print(f"{args.preset} serving decode step on {torch.cuda.get_device_name()}, ms (median)")
    print("| batch | replay | GraphedDecode.run | sample_batch | engine.step() | steps in turn | steps ahead | tok/s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch in args.batch:
        engine = LLMEngine(model, max_num_seqs=batch, max_model_len=args.prompt + 1100, max_num_batched_tokens=8192)
        for _ in range(batch):
            engine.add_request(torch.randint(10, 200_000, (args.prompt,)).tolist(), params)
        while any(seq.num_cached < len(seq.prompt_ids) for seq in engine.seqs.values()):
            engine.step()  # prefill
        for _ in range(5):
            engine.step()  # captures the graph
        graphs = engine.runner.graphs
        seqs = list(engine.seqs.values())
        graph, logits = graphs.graphs[next(s for s in graphs.sizes if s >= batch)]
        replay = median_ms(graph.replay)
        ahead = engine.in_flight
        run = median_ms(lambda: graphs.run(seqs, ahead))  # same inputs each time: num_cached is not advanced here
        gens = [s.generator_on(logits.device) for s in seqs]
        sample = median_ms(lambda: sample_batch(logits[:batch], [s.params for s in seqs], gens).tolist())
        step = median_ms(engine.step)
        engine.run_ahead = False
        in_turn = loop_ms(engine.step)
        engine.run_ahead = True
        loop_ms(engine.step, 5)
        ahead = loop_ms(engine.step)
        print(f"| {batch} | {replay:.3f} | {run:.3f} | {sample:.3f} | {step:.3f} | {in_turn:.3f} | {ahead:.3f} | "
              f"{batch / ahead * 1e3:,.1f} |")
        del engine


if __name__ == "__main__":
    main()
