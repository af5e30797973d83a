"""Prefill attention alone, at official shapes: the flash prefill kernel (a few tile choices) against what the model
ran before it (SDPA with a materialized boolean mask), on one chunk of a chunked prefill, bf16, CUDA.

    python benchmarks/prefill_attention.py --preset 26B-A4B --context 16384 --chunk 4096 [--splits 0 1 4]

Shapes: the last chunk of a `context`-token prompt, as the static cache hands it over: a sliding layer attends over
its ring (window slots, in ring order) plus the chunk; a global layer over every position so far. Prints ms per call
(median of CUDA-event timings) and the largest difference from the SDPA output.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from gemma4.config import Config
from gemma4.kernels.prefill_attention import prefill_attention
from gemma4.model.attention import attend, attention_mask


def layer_shapes(preset: str):
    text = Config.preset(preset).text_config
    global_kv = text.num_global_key_value_heads or text.num_key_value_heads
    return {"sliding": (text.num_attention_heads, text.num_key_value_heads, text.head_dim, text.sliding_window),
            "global": (text.num_attention_heads, global_kv, text.global_head_dim, None)}


def inputs(heads, kv_heads, dim, window, context, chunk, device):
    start = context - chunk
    qpos = torch.arange(start, context, device=device)[None]
    if window:  # ring slot p % window holds p
        ring = torch.arange(start - window, start, device=device)
        ring = ring[torch.argsort(ring % window)]
        kpos = torch.cat([ring, qpos[0]])[None]
    else:
        kpos = torch.arange(context, device=device)[None]
    q = torch.randn(1, chunk, heads, dim, device=device, dtype=torch.bfloat16).transpose(1, 2)  # as the model's view
    k = torch.randn(1, kv_heads, kpos.shape[1], dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = q / dim ** 0.5
    return q, k, v, qpos, torch.ones_like(qpos, dtype=torch.bool), kpos


def median_ms(fn, repeat=10):
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="26B-A4B")
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--tiles", nargs="*", default=["64,64,128,4", "128,64,128,8", "64,32,128,4", "128,32,128,8"],
                        help="BLOCK_M,BLOCK_N,BLOCK_DV,warps choices to time beside the default")
    parser.add_argument("--stages", type=int, nargs="*", default=[2, 3])
    parser.add_argument("--splits", type=int, nargs="*", default=[0, 1],
                        help="key ranges per query tile (0: the kernel's choice from shapes)")
    parser.add_argument("--layers", nargs="*", default=["sliding", "global"])
    args = parser.parse_args()
    print(f"{args.preset}, last {args.chunk}-token chunk of {args.context}, {torch.cuda.get_device_name()}")
    print("| layer | variant | ms | max abs diff vs SDPA |\n| --- | --- | ---: | ---: |")
    for kind, (heads, kv_heads, dim, window) in layer_shapes(args.preset).items():
        if kind not in args.layers:
            continue
        q, k, v, qpos, qvalid, kpos = inputs(heads, kv_heads, dim, window, args.context, args.chunk, "cuda")

        def sdpa():
            return attend(q, k, v, attention_mask(qpos, qvalid, kpos, window))

        expected = sdpa()
        print(f"| {kind} D{dim} | SDPA + bool mask | {median_ms(sdpa):.2f} | |")
        tile_choices = [None] + [tuple(int(n) for n in t.split(",")) for t in args.tiles]
        for tiles, stages, splits in itertools.product(tile_choices, args.stages, args.splits):
            def kernel():
                return prefill_attention(q, k, v, qpos, qvalid, kpos, window, tiles=tiles, num_stages=stages,
                                         num_splits=splits or None)
            variant = f"kernel {tiles or 'default'} stages {stages} splits {splits or 'default'}"
            try:
                diff = (kernel().float() - expected.float()).abs().max().item()
                print(f"| {kind} D{dim} | {variant} | {median_ms(kernel):.3f} | {diff:.2e} |")
            except Exception as error:  # a tile choice that does not fit shared memory or registers
                print(f"| {kind} D{dim} | {variant} | failed: {type(error).__name__} | |")


if __name__ == "__main__":
    main()
