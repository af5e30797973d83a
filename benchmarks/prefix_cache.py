"""Time to first token of a chat's second turn, from the prefix cache and without it (random weights of an official
preset, bf16, CUDA). Turn 1: a prompt of --prompt tokens and a reply of --reply tokens; turn 2: that conversation
and a new message of --message tokens. Turn 2 runs twice on the same engine: after turn 1 (its blocks and window
snapshots cached, up to the last block boundary of the reply) and again after `clear_prefix_cache()` (computed
whole). TTFT is measured as a server sees it: from add_request to the first token the engine hands out. Medians of
--repeat conversations, each with new tokens. The cached turn 2 runs a third time with its chunk prefilled eagerly
instead of from a CUDA graph (`GraphedPrefill`), turn 1 cached again before it. --profile: then the device kernels
of one more cached turn 2 (torch.profiler).

    python benchmarks/prefix_cache.py --preset 26B-A4B 31B --prompt 8192 [--profile]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from gemma4.engine.engine import LLMEngine
from gemma4.engine.sampling import SamplingParams
from gemma4.random_init import random_config, random_model


def first_token(engine: LLMEngine, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """(seconds to the first token, all output ids) of one greedy request."""
    start = time.perf_counter()
    seq_id = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    ttft, tokens = None, []
    for out in engine.run([seq_id]):
        out.raise_error()
        if out.token is not None:
            ttft = ttft or time.perf_counter() - start
            tokens.append(out.token)
    return ttft, tokens


def profile_turn2(engine: LLMEngine, args, vocab: int) -> None:
    """Device time of one cached turn 2, its kernels by total time."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(10_000)
    turn1 = torch.randint(10, vocab, (args.prompt,), generator=g).tolist()
    _, reply = first_token(engine, turn1, args.reply)
    turn2 = turn1 + reply + torch.randint(10, vocab, (args.message,), generator=g).tolist()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ttft, _ = first_token(engine, turn2, 1)
    kernels = prof.key_averages()
    device_ms = sum(k.self_device_time_total for k in kernels) / 1e3
    print(f"profiled cached turn 2: TTFT {ttft * 1e3:.1f} ms, device time {device_ms:.1f} ms")
    print(kernels.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", nargs="+", default=["26B-A4B", "31B"])
    parser.add_argument("--prompt", type=int, default=8192)
    parser.add_argument("--reply", type=int, default=128)
    parser.add_argument("--message", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    print(f"TTFT on {torch.cuda.get_device_name()}, bf16 random weights: turn 1 = {args.prompt} prompt tokens "
          f"(reply {args.reply}), turn 2 = + {args.reply} + {args.message} new tokens; medians of {args.repeat}, ms")
    print("| preset | turn 1 | turn 2, cached | turn 2, cached, eager chunk | turn 2, computed whole | cached / turn 1 "
          "| tokens from the cache | first tokens: cached = eager chunk, cached = whole |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for preset in args.preset:
        config = random_config(preset, None, text_only=True)
        model = random_model(config, torch.bfloat16, device="cuda")
        vocab = config.text_config.vocab_size
        length = args.prompt + args.reply + args.message + 16
        engine = LLMEngine(model, max_num_seqs=4, max_model_len=length, max_num_batched_tokens=8192)
        engine.warm_up()
        rows, hits, same_eager, same_whole = [], [], 0, 0
        for r in range(args.repeat + 1):  # the first conversation warms up the shapes of turn 2
            g = torch.Generator().manual_seed(r)
            turn1 = torch.randint(10, vocab, (args.prompt,), generator=g).tolist()
            t1, reply = first_token(engine, turn1, args.reply)
            turn2 = turn1 + reply + torch.randint(10, vocab, (args.message,), generator=g).tolist()
            before = engine.blocks.hit_tokens
            cached, out_cached = first_token(engine, turn2, 4)
            hit = engine.blocks.hit_tokens - before
            engine.blocks.clear_prefix_cache()
            first_token(engine, turn1, args.reply)  # turn 1 cached again
            graphs, engine.runner.prefill_graphs = engine.runner.prefill_graphs, None
            eager, out_eager = first_token(engine, turn2, 4)
            engine.runner.prefill_graphs = graphs
            engine.blocks.clear_prefix_cache()
            whole, out_whole = first_token(engine, turn2, 4)
            if r:
                rows.append((t1, cached, eager, whole))
                hits.append(hit)
                same_eager += out_cached[0] == out_eager[0]
                same_whole += out_cached[0] == out_whole[0]
        t1, cached, eager, whole = (statistics.median(column) * 1e3 for column in zip(*rows))
        print(f"| {preset} | {t1:.1f} | {cached:.1f} | {eager:.1f} | {whole:.1f} | {cached / t1:.1%} | {min(hits)} "
              f"| {same_eager}/{len(rows)}, {same_whole}/{len(rows)} |")
        if args.profile:
            profile_turn2(engine, args, vocab)
        del engine, model, graphs  # the graphs hold the model too
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
