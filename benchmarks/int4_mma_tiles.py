"""int4_mma's tiles and size threshold at a preset's int4 GEMV shapes, cycled weights in CUDA graphs (benchmarks/
gemv.py's helpers), GB/s of int4 values and scales.

For each shape whose K int4_mma reads (a multiple of 256): gemv.py's own int4 kernel ("gemv.py"), then int4_mma per
(BLOCK_N, warps, target programs), best first, whatever the size threshold; "*" marks the shapes the model gives
int4_mma (kernels/gemv.py `_takes_mma`). The defaults come from `INT4_MMA_TILES`, `INT4_MMA_PROGRAMS` and
`INT4_MMA_MIN_ELEMENTS` in kernels/configs.

    python benchmarks/int4_mma_tiles.py --preset 31B
    python benchmarks/int4_mma_tiles.py --preset E2B E4B
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gemv import cycled_weights, decode_shapes, graph_us, weight_bytes  # noqa: E402

from gemma4.kernels import gemv as gemv_kernels  # noqa: E402
from gemma4.kernels import int4_mma, tuning  # noqa: E402

VARIANTS = [((32, 1), 1000), ((32, 2), 1000), ((32, 2), 500), ((32, 2), 2000), ((64, 4), 1000), ((64, 2), 1000),
            ((16, 1), 1000), ((16, 1), 2000), ((64, 4), 500)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", nargs="+", default=["31B"])
    args = parser.parse_args()
    base = tuning.config("gemv", torch.device("cuda"))
    tuned, takes = int4_mma._tuned, int4_mma.takes
    print(f"on {torch.cuda.get_device_name()}: GB/s of gemv.py's kernel, then of int4_mma per BLOCK_N x warps / target "
          f"programs; * the model's int4_mma shapes (INT4_MMA_MIN_ELEMENTS {base['INT4_MMA_MIN_ELEMENTS']:,})")
    for preset in args.preset:
        print(preset)
        for (n, k), count in sorted(decode_shapes(preset).items()):
            if k % int4_mma.BLOCK_K:
                continue
            weights, x = cycled_weights(n, k, "int4")
            taken = gemv_kernels._takes_mma(weights[0], x)
            gb = n * k * weight_bytes("int4") / 1e3  # bytes per us = GB/s * 1e-3
            int4_mma.takes = lambda *a: False
            own = gb / graph_us(lambda i: gemv_kernels.gemv(x, weights[i % len(weights)]))
            int4_mma.takes = takes
            row = []
            for tiles, programs in VARIANTS:
                int4_mma._tuned = lambda device, t=tiles, p=programs: dict(base, INT4_MMA_TILES=list(t),
                                                                           INT4_MMA_PROGRAMS=p)
                us = graph_us(lambda i: int4_mma.product(x, weights[i % len(weights)]))
                row.append((gb / us, f"{tiles[0]}x{tiles[1]}/{programs}"))
            int4_mma._tuned = tuned
            row.sort(reverse=True)
            print(f"{'*' if taken else ' '} N={n:6d} K={k:6d} x{count:3d} | gemv.py: {own:.0f} | "
                  + " ".join(f"{name}: {g:.0f}" for g, name in row), flush=True)


if __name__ == "__main__":
    main()
