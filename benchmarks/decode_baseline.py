"""Baseline decode/prefill speed of gemma4 (current eager path) vs transformers 5.23, same weights, same device.

Writes a random-weight checkpoint of an official preset (bf16), loads it with both, and times greedy generation:
decode tok/s = new tokens / (time of generate(prompt, n+1) - time of generate(prompt, 1)).

    python benchmarks/decode_baseline.py --preset E2B --batch 1 8 --context 1024 --steps 64 --compare transformers
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from gemma4 import Model
from gemma4.random_init import write_random_checkpoint


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure(generate, batch: int, context: int, steps: int) -> dict:
    ids = torch.randint(10, 200_000, (batch, context), device="cuda")
    generate(ids, 2)  # warm-up
    first = timed(lambda: generate(ids, 1))
    full = timed(lambda: generate(ids, steps + 1))
    return {"prefill_tok_s": batch * context / first, "ttft_s": first,
            "decode_tok_s": batch * steps / (full - first)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="E2B")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--compare", choices=["transformers"], default=None)
    parser.add_argument("--out", default=None, help="write results as JSON here")
    args = parser.parse_args()

    directory = tempfile.mkdtemp()
    start = time.perf_counter()
    write_random_checkpoint(args.preset, directory, text_only=True, dtype=torch.bfloat16)
    print(f"wrote random {args.preset} in {time.perf_counter() - start:.0f}s", flush=True)
    rows = []
    ours = Model.from_pretrained(directory, dtype=torch.bfloat16, device="cuda")

    def ours_generate(ids, n):
        return ours.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None)

    for batch in args.batch:
        rows.append({"engine": "gemma4", "batch": batch, **measure(ours_generate, batch, args.context, args.steps)})
        print(rows[-1], flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del ours
    torch.cuda.empty_cache()
    if args.compare == "transformers":
        import transformers

        reference = transformers.Gemma4ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16,
                                                                   device_map="cuda").eval()

        def reference_generate(ids, n):
            return reference.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)

        for batch in args.batch:
            rows.append({"engine": "transformers", "batch": batch,
                         **measure(reference_generate, batch, args.context, args.steps)})
            print(rows[-1], flush=True)
    print(f"\n{args.preset} bf16 on {torch.cuda.get_device_name()}, context {args.context}, {args.steps} steps; "
          f"gemma4 peak memory {peak:.1f} GiB")
    print(f"{'engine':<14}{'batch':>6}{'decode tok/s':>14}{'prefill tok/s':>15}{'TTFT s':>9}")
    for row in rows:
        print(f"{row['engine']:<14}{row['batch']:>6}{row['decode_tok_s']:>14.1f}{row['prefill_tok_s']:>15.0f}"
              f"{row['ttft_s']:>9.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"preset": args.preset, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
