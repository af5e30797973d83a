"""The KV cache one GPU gives a preset (random weights): LLMEngine's plan for one sequence of the longest context,
with the model-dtype cache and with fp8, optionally with quantized weights.

    python benchmarks/kv_capacity.py --preset 31B [--quantization int4] [--max-num-seqs 1]
"""

from __future__ import annotations

import argparse
import gc

import torch

from gemma4.engine.engine import LLMEngine
from gemma4.engine.memory import summary
from gemma4.random_init import random_config, random_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="31B")
    parser.add_argument("--quantization", choices=["fp8", "int8", "int4"], default=None)
    parser.add_argument("--max-num-seqs", type=int, default=1)
    args = parser.parse_args()
    config = random_config(args.preset, None, text_only=True)
    for kv_cache_dtype in ("auto", "fp8"):
        model = random_model(config, torch.bfloat16, device="cuda", quantization=args.quantization)
        weights = torch.cuda.memory_allocated() / 2**30
        engine = LLMEngine(model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=8192,
                           kv_cache_dtype=kv_cache_dtype)
        tokens = engine.blocks.num_blocks * engine.blocks.block_size
        print(f"{args.preset} weights {args.quantization or 'bf16'} ({weights:.1f} GiB), KV {kv_cache_dtype}: "
              f"{tokens:,} tokens of KV; {summary(engine, 0)}", flush=True)
        del engine, model
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
