"""Serving-sized products with quantized weights (a decode step of several sequences: M activation rows, M > 1):
quantized_matmul's tiles per row count, beside the weight dequantized then cuBLAS (what the model runs past MAX_M)
and cuBLAS on the bf16 weight (the unquantized model's product), at every quantized projection of a preset's decode
step (fused q/k/v and gate/up, the per-layer inputs' projection, the tied LM head).

    python benchmarks/quantized_matmul_tiles.py --preset 26B-A4B --quantization fp8 [--rows 4 16 64] [--write]
        [--no-sweep]

Each product is timed alone on cycled weights in CUDA graphs (benchmarks/gemv.py's helpers), us per step: the sum
over the step's products, each shape times its count. Per row count the tile with the least sum wins. --write puts
the winners into the device's kernels/configs JSON as the format's TILES_BY_M (BYTE_ for fp8 and int8, INT4_ for
int4): an entry per row count swept, the last for any larger count; and its MAX_M: the most rows swept up to which
the kernel beats the dequantized weight at every count swept. --no-sweep times the tuned tiles only (A/B runs of a
kernel change). With fp8 weights a further column times the W8A8 product (GEMMA4_FP8_ACTIVATIONS=1,
model/quantized.py `scaled_linear`: torch._scaled_mm on the fp8 tensor cores), alone and with its activation rows'
quantization (kernels/quantized_matmul.py `fp8_rows`). --per-shape prints each product's times at the largest row count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).parent))
from gemv import cycled_weights, decode_shapes, graph_us, weight_bytes  # noqa: E402

from gemma4.config import Config  # noqa: E402
from gemma4.kernels import quantized_matmul as qm, tuning  # noqa: E402
from gemma4.kernels.gemv import format_prefix  # noqa: E402
from gemma4.model import fused  # noqa: E402
from gemma4.model.quantized import scaled_linear  # noqa: E402

# (BLOCK_N, BLOCK_K, warps, stages), each at BLOCK_M = the rows' power of 2 (16 to 128), at half of it and at 16.
# BLOCK_N 16: twice the programs of 32 (26B-A4B's o_proj at 32 rows a program fills 88 of an H100's 132 SMs).
SHAPES = [(16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3),
          (128, 128, 8, 3), (128, 64, 8, 4), (256, 64, 8, 3)]


def quantized_shapes(preset: str) -> dict[tuple[int, int], int]:
    """(N, K) -> count of the products a decode step runs with quantized weights: every matmul but the router's."""
    text = Config.preset(preset).text_config
    shapes = decode_shapes(preset)
    if text.enable_moe_block:
        del shapes[(text.num_experts, text.hidden_size)]
    return dict(shapes)


# (BLOCK_N, BLOCK_K, warps, stages, SPLIT_K): K in slices, for products whose output tiles alone leave SMs idle
# (26B-A4B's o_proj and down_proj: 88 programs of 32 x 64 at 64 rows on 132 SMs).
SPLIT_SHAPES = [(32, 128, 4, 4, 2), (64, 128, 4, 4, 2), (64, 128, 4, 4, 4), (32, 256, 4, 4, 4), (128, 128, 4, 3, 4)]


def candidates(rows: int) -> list[tuple[int, ...]]:
    block_m = min(128, max(16, triton.next_power_of_2(rows)))
    return [(m, *shape) for m in sorted({block_m, max(16, block_m // 2), 16}) for shape in SHAPES] + \
        [(m, *shape) for m in sorted({block_m, max(16, block_m // 2)}) for shape in SPLIT_SHAPES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="26B-A4B")
    parser.add_argument("--quantization", choices=["fp8", "int8", "int4"], default="fp8")
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 16, 32, 64, 128, 256])
    parser.add_argument("--write", action="store_true", help="write the bests into the device's config")
    parser.add_argument("--no-sweep", action="store_true", help="only the tuned tiles (and the cuBLAS columns)")
    parser.add_argument("--per-shape", action="store_true", help="each product's times at the largest row count")
    args = parser.parse_args()
    if args.no_sweep and args.write:
        parser.error("--write takes the sweep's winners: not with --no-sweep")
    device = torch.device("cuda")
    shapes = quantized_shapes(args.preset)
    print(f"{args.preset} {args.quantization} on {torch.cuda.get_device_name()}: us per decode step of M rows, "
          f"summed over {sum(shapes.values())} products ({len(shapes)} shapes)")
    w8a8 = args.quantization == "fp8"
    print("| M | bf16 cuBLAS | dequantized + cuBLAS | kernel today (tiles) | best tiles | best | GB/s at best |"
          + (" W8A8 (with the rows' quantization) |" if w8a8 else ""))
    print("| ---: | ---: | ---: | ---: | --- | ---: | ---: |" + (" ---: |" if w8a8 else ""))
    per_shape = []
    prefix, best_by_rows, beats_dequantized = "", {}, []
    for rows in sorted(args.rows):
        sums = {"bf16": 0.0, "dequantized": 0.0, "today": 0.0, "w8a8": 0.0, "w8a8+quant": 0.0}
        per_shape.clear()
        tile_sums: dict[tuple, float] = {}
        today = None
        gigabytes = 0.0
        for (n, k), count in shapes.items():
            weights, _ = cycled_weights(n, k, args.quantization)
            prefix = format_prefix(qm._quantized_format(weights[0])[0]["WFMT"])
            x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
            dense = [weights[0].dequantize(x.dtype)]
            times = {"bf16": graph_us(lambda i: F.linear(x, dense[0]))}
            del dense
            # what the model runs past MAX_M (model/fused.py `product`): the weight dequantized, then cuBLAS
            times["dequantized"] = graph_us(lambda i: F.linear(x, fused.dense(weights[i % len(weights)], x.dtype)))
            today = qm._tiles(rows, n, k, device, None, weights[0])
            times["today"] = graph_us(lambda i: qm.quantized_matmul(x, weights[i % len(weights)], today))
            if w8a8:
                rows_fp8 = qm.fp8_rows(x)
                times["w8a8"] = graph_us(lambda i: scaled_linear(x, weights[i % len(weights)], lambda _: rows_fp8))
                times["w8a8+quant"] = graph_us(lambda i: scaled_linear(x, weights[i % len(weights)], qm.fp8_rows))
            for name, us in times.items():
                sums[name] += count * us
            per_shape.append((n, k, count, times))
            for tiles in [] if args.no_sweep else candidates(rows):
                if tile_sums.get(tiles) == float("inf"):
                    continue
                try:
                    us = graph_us(lambda i, t=tiles: qm.quantized_matmul(x, weights[i % len(weights)], t))
                except Exception:  # out of shared memory or registers: not a candidate
                    us = float("inf")
                tile_sums[tiles] = tile_sums.get(tiles, 0.0) + count * us
            gigabytes += count * n * k * weight_bytes(args.quantization) / 1e3
            del weights
            torch.cuda.empty_cache()
        tiles, best = min(tile_sums.items(), key=lambda item: item[1]) if tile_sums else (today, sums["today"])
        best_by_rows[rows] = tiles
        beats_dequantized.append(best < sums["dequantized"])
        print(f"| {rows} | {sums['bf16']:.1f} | {sums['dequantized']:.1f} | {sums['today']:.1f} "
              f"({','.join(map(str, today))}) | {','.join(map(str, tiles))} | {best:.1f} | {gigabytes / best:,.0f} |"
              + (f" {sums['w8a8']:.1f} ({sums['w8a8+quant']:.1f}) |" if w8a8 else ""), flush=True)
    if args.per_shape:
        print(f"per product at M = {max(args.rows)}, us a call (GB/s of the quantized weight):")
        for n, k, count, times in per_shape:
            gb = n * k * weight_bytes(args.quantization) / 1e3
            print(f"  {n:>6} x {k:<6} x {count:>3} | " + " | ".join(f"{name} {us:8.2f} ({gb / us:6,.0f})"
                                                                    for name, us in times.items()))
    swept, max_m = sorted(best_by_rows), 1
    for rows, won in zip(swept, beats_dequantized):
        if not won:
            break
        max_m = rows
    if all(beats_dequantized):  # nothing is known past the last row count swept: a larger MAX_M stays
        max_m = max(max_m, tuning.for_format(tuning.config("quantized_matmul", device), prefix)["MAX_M"])
    by_m = [[rows, *best_by_rows[rows]] for rows in swept[:-1]] + [[None, *best_by_rows[swept[-1]]]]
    values = {f"{prefix}TILES_BY_M": by_m, f"{prefix}MAX_M": max_m}
    print(values)
    if args.write:
        path = tuning.update_config(device, "quantized_matmul", values)
        print(f"wrote {', '.join(values)} into {path}")


if __name__ == "__main__":
    main()
