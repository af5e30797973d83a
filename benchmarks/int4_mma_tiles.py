"""int4_mma's tiles at a preset's int4 GEMV shapes: for each shape the model gives it (kernels/gemv.py
`_takes_mma`), GB/s of int4 values and scales per (BLOCK_N, warps, target programs), best first; cycled weights in
CUDA graphs (benchmarks/gemv.py's helpers). The default comes from `INT4_MMA_TILES` / `INT4_MMA_PROGRAMS` in
kernels/configs.

    python benchmarks/int4_mma_tiles.py --preset 31B
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
            ((16, 1), 2000), ((64, 4), 500)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="31B")
    args = parser.parse_args()
    base = tuning.config("gemv", torch.device("cuda"))
    tuned = int4_mma._tuned
    print(f"{args.preset} on {torch.cuda.get_device_name()}: GB/s per BLOCK_N x warps / target programs")
    for (n, k), count in sorted(decode_shapes(args.preset).items()):
        weights, x = cycled_weights(n, k, "int4")
        if not gemv_kernels._takes_mma(weights[0], x):
            continue
        gb = n * k * weight_bytes("int4") / 1e3  # bytes per us = GB/s * 1e-3
        row = []
        for tiles, programs in VARIANTS:
            int4_mma._tuned = lambda device, t=tiles, p=programs: dict(base, INT4_MMA_TILES=list(t),
                                                                       INT4_MMA_PROGRAMS=p)
            us = graph_us(lambda i: int4_mma.product(x, weights[i % len(weights)]))
            row.append((gb / us, f"{tiles[0]}x{tiles[1]}/{programs}"))
        int4_mma._tuned = tuned
        row.sort(reverse=True)
        print(f"N={n:6d} K={k:6d} x{count:3d} | " + " ".join(f"{name}: {g:.0f}" for g, name in row), flush=True)


if __name__ == "__main__":
    main()
