"""Decode attention alone (one query token per row, bf16 queries, CUDA): the split-K kernel at a preset's sliding and
global layer shapes, over its split counts and keys per block, each timed inside a CUDA graph of calls that cycle
through K/V copies of ~200 MB (read from memory, as in a decode step, whose ~4 GB of weights evict the 50 MB L2
between a layer's steps), on a bf16 cache and/or an fp8 one (`--kv-cache-dtype auto fp8`, per-head scales).

    python benchmarks/decode_attention.py --preset E2B [--batch 1] [--context 1024] [--kv-cache-dtype auto fp8]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gemv import graph_us  # noqa: E402

from gemma4.config import Config  # noqa: E402
from gemma4.kernels.attention import _block_n, decode_attention  # noqa: E402
from gemma4.kernels.tuning import tile  # noqa: E402
from gemma4.model.paged_cache import KV_CACHE_DTYPES  # noqa: E402


def layer_shapes(preset: str, context: int) -> list[tuple]:
    """(name, query heads, kv heads, head dim, candidates, window) of the sliding and the global layers."""
    text = Config.preset(preset).text_config
    window = text.sliding_window
    global_kv = getattr(text, "num_global_key_value_heads", None) or text.num_key_value_heads
    return [("sliding", text.num_attention_heads, text.num_key_value_heads, text.head_dim, window + 1, window),
            ("global", text.num_attention_heads, global_kv, text.global_head_dim, context + 64, None)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="E2B")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--kv-cache-dtype", nargs="+", choices=KV_CACHE_DTYPES, default=["auto"])
    args = parser.parse_args()
    print(f"{args.preset} on {torch.cuda.get_device_name()}, batch {args.batch}, {args.context}-token context: "
          "us per call (fastest first)")
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    for (name, heads, kv_heads, dim, candidates, window), cache in itertools.product(
            layer_shapes(args.preset, args.context), args.kv_cache_dtype):
        fp8 = cache == "fp8"
        kv_bytes = 2 * args.batch * kv_heads * candidates * dim * (1 if fp8 else 2)
        copies = max(1, min(200, 200_000_000 // kv_bytes))
        keys, values = (torch.randn(copies, args.batch, kv_heads, candidates, dim, **bf16) for _ in range(2))
        scales = {}
        if fp8:  # the store's scale: 1.0 a head (RMS-normed K/V), as model/paged_cache.py's default
            keys, values = keys.to(torch.float8_e4m3fn), values.to(torch.float8_e4m3fn)
            scales = {"key_scale": torch.ones(kv_heads, device="cuda"),
                      "value_scale": torch.ones(kv_heads, device="cuda")}
        query = torch.randn(args.batch, heads, dim, **bf16) * dim ** -0.5
        query_positions = torch.full((args.batch,), args.context, device="cuda")
        if window:  # a full ring: slot s holds the position p with p % window == s; the trash slot is empty
            ring = torch.arange(args.context - window + 1, args.context + 1, device="cuda")
            positions = torch.full((candidates,), -1, device="cuda")
            positions[ring % window] = ring
            positions = positions.expand(args.batch, candidates)
            bound = {}
        else:
            positions = torch.arange(candidates, device="cuda").expand(args.batch, candidates)
            bound = {"num_keys": query_positions + 1}
        default_block = _block_n(dim, 2, args.batch * kv_heads, candidates, torch.device("cuda"))
        results = []
        for block_n, splits in itertools.product(sorted({16, 32, 64, default_block}), (None, 8, 16, 32, 64)):
            if block_n * dim * 2 > tile("attention", "MAX_TILE_BYTES", torch.device("cuda")):  # shared memory
                continue

            def call(i, block_n=block_n, splits=splits):
                return decode_attention(query, keys[i % copies], values[i % copies], positions, query_positions,
                                        window, num_splits=splits, block_n=block_n, **bound, **scales)
            results.append((graph_us(call, calls=100), block_n, splits or "default"))
        results.sort()
        default = next(r for r in results if r[1] == default_block and r[2] == "default")
        print(f"{name}, {'fp8' if fp8 else 'bf16'} cache: {heads} heads / {kv_heads} kv heads, D {dim}, {candidates} "
              f"candidates, {kv_bytes / 1e6:.2f} MB of K/V | default (block {default_block}) {default[0]:.2f} us "
              f"({kv_bytes / default[0] / 1e3:,.0f} GB/s)")
        for us, block_n, splits in results[:6]:
            print(f"  {us:6.2f} us  block {block_n:2d}  splits {splits}")


if __name__ == "__main__":
    main()
