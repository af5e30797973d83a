"""Tune the quantized GEMV tiles of one format at a preset's decode shapes: every plain GEMV of a step that gemv.py's
kernel runs, the LM head quantized as on load (the int4 shapes of int4_mma.py's kernel excluded:
benchmarks/int4_mma_tiles.py), timed in CUDA graphs (benchmarks/gemv.py) for each candidate tile set, and the set of
the least total time per step written as INT4_ (int4) or BYTE_ TILES and WIDE_TILES into the device's kernels/configs
JSON.

    python benchmarks/gemv_tune.py --preset E2B --quantization int4 [--write]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from gemma4.kernels import gemv as gemv_module
from gemma4.kernels import tuning
from gemv import cycled_weights, decode_shapes, graph_us, weight_bytes  # benchmarks/gemv.py

CANDIDATES = [None] + list(itertools.product((2, 4, 8), (1024, 2048, 4096), (4, 8), (3,)))  # None: current tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="E2B")
    parser.add_argument("--quantization", choices=["fp8", "int8", "int4"], default="int4")
    parser.add_argument("--write", action="store_true", help="write the best tiles into the device's config")
    args = parser.parse_args()
    prefix = "INT4_" if args.quantization == "int4" else "BYTE_"
    total = dict.fromkeys(CANDIDATES, 0.0)
    for (n, k), count in sorted(decode_shapes(args.preset).items()):
        weights, x = cycled_weights(n, k, args.quantization)
        if gemv_module._mma_tiles(weights[0], x) is not None:
            continue
        gb = n * k * weight_bytes(args.quantization) / 1e3
        timings = []
        for tiles in total:
            try:
                us = graph_us(lambda i: gemv_module.gemv(x, weights[i % len(weights)], tiles))
            except Exception:  # out of resources
                us = float("inf")
            total[tiles] += us * count
            timings.append((us, tiles))
        best = min(timings, key=lambda t: t[0])
        print(f"N={n:6d} K={k:5d} x{count:3d} {prefix} current {timings[0][0]:7.2f} us "
              f"({gb / timings[0][0]:5.0f} GB/s) best {best[0]:7.2f} ({gb / best[0]:5.0f}) {best[1]}")
    if not any(total.values()):
        return
    best = min(total, key=total.get)
    print(f"{args.preset} {args.quantization} {prefix}: us per step {total[None]:.0f} with the current tiles, "
          f"{total[best]:.0f} with {best or 'the current ones'}")
    if args.write and best is not None:
        keys = {prefix + "TILES": list(best), prefix + "WIDE_TILES": list(best)}
        path = tuning.update_config(torch.device("cuda"), "gemv", keys)
        print(f"wrote {sorted(keys)} = {list(best)} into {path}")


if __name__ == "__main__":
    main()
