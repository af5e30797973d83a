"""Time to first token of the first request of a process against a warm one, through `gemma4.LLM` and through the
server's engine thread (what `gemma4 serve` runs behind HTTP), with random weights of an official size.

    python benchmarks/first_request.py --preset E2B [--prompt 512]

Prints how long start-up took (loading excluded: the weights are random) and the time to first token of the first
three requests; the first should be within 2x of the others (the engine warms up before it takes requests).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from gemma4.llm import LLM
from gemma4.random_init import random_config, random_model
from gemma4.server.state import build_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="E2B")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--server", action="store_true", help="the server's engine instead of LLM (run each in a "
                        "fresh process: a second engine in one process finds the kernels compiled)")
    args = parser.parse_args()
    model = random_model(random_config(args.preset, text_only=True), torch.bfloat16, device="cuda")
    vocab = model.config.text_config.vocab_size
    prompts = [torch.randint(10, min(200_000, vocab), (args.prompt,)).tolist() for _ in range(3)]

    if args.server:
        return serve(model, prompts, args.preset)
    start = time.perf_counter()
    llm = LLM(model)
    print(f"{args.preset} LLM start-up (warm-up, graph capture): {time.perf_counter() - start:.2f} s")
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        llm.generate([prompt], {"max_tokens": 1, "temperature": 0.0})
        print(f"  LLM request {i + 1}: time to first token {1e3 * (time.perf_counter() - start):.1f} ms")


def serve(model, prompts, preset) -> None:
    start = time.perf_counter()
    state = build_state(model, _NoTokenizer(), "bench", max_model_len=4096, max_num_seqs=16)
    print(f"{preset} server engine start-up (warm-up, graph capture): {time.perf_counter() - start:.2f} s")

    async def first_token(prompt):
        from gemma4.engine.sampling import SamplingParams
        begin = time.perf_counter()
        _, queue = state.engine.add(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        while (await queue.get()).token is None:
            pass
        return time.perf_counter() - begin

    for i, prompt in enumerate(prompts):
        seconds = asyncio.run(first_token(prompt))
        print(f"  server request {i + 1}: time to first token {1e3 * seconds:.1f} ms")
    state.engine.shutdown()


class _NoTokenizer:
    stop_token_ids = [1, 106, 50]


if __name__ == "__main__":
    main()
