"""Where each int4 GEMV of a preset's batch-1 decode step runs best: gemv.py's kernel, or int4_mma at which tiles.

The GEMVs are the model's own calls, recorded from one eager decode step of a random int4 model (weight shape,
gated activation in the epilogue, input the residual norms of an earlier product), each then timed alone on cycled
weights in CUDA graphs (benchmarks/gemv.py's helpers): gemv.py's kernel as the model calls it (normalizing its own
input where normed), and int4_mma per (BLOCK_N, warps, target programs, steps prefetched), where normed both after
the norms' kernel and normalizing its input in its programs ("+n", a fifth entry 1); the residual norms after a
product run in a kernel of their own either way, untimed. GB/s count the int4 values and
scales. `--write` puts each call's best into the device's kernels/configs JSON as INT4_MMA_BY_SHAPE
(`int4_mma.launch_tiles`; null: gemv.py's kernel), merged with the entries already there.

    python benchmarks/int4_mma_tiles.py --preset E2B E4B [--write]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gemv import cycled_weights, graph_us, weight_bytes  # noqa: E402

from gemma4.engine.generate import engine_for  # noqa: E402
from gemma4.engine.sampling import SamplingParams  # noqa: E402
from gemma4.kernels import gemv as gemv_kernels  # noqa: E402
from gemma4.kernels import int4_mma, tuning  # noqa: E402
from gemma4.kernels.activation import ACTIVATION_CODES  # noqa: E402
from gemma4.model.quantized import QuantizedWeight  # noqa: E402
from gemma4.random_init import random_config, random_model  # noqa: E402

# (BLOCK_N, warps, target programs[, steps prefetched])
VARIANTS = [(32, 1, 1000), (32, 1, 500), (32, 1, 2000), (32, 2, 1000), (32, 2, 2000), (64, 2, 1000), (64, 2, 500),
            (64, 4, 1000), (64, 4, 500), (16, 1, 1000), (16, 1, 2000), (32, 1, 1000, 2), (32, 1, 500, 2),
            (16, 1, 1000, 2), (16, 1, 500, 2), (64, 2, 500, 2), (64, 4, 500, 2)]


def tiles_name(tiles: tuple) -> str:
    """BLOCK_N x warps / programs, "+2" where two steps are prefetched, "+n" where the programs normalize their
    input."""
    return (f"{tiles[0]}x{tiles[1]}/{tiles[2]}" + ("+2" if (*tiles, 1)[3] == 2 else "")
            + ("+n" if int4_mma.fuses_norms(tiles) else ""))


def model_calls(preset: str) -> collections.Counter:
    """(N, K, gated, normed, with a multiplier) -> count, of the int4 GEMVs that int4_mma can take in one decode step
    of a random int4 `preset`."""
    model = random_model(random_config(preset, text_only=True), torch.bfloat16, device="cuda", quantization="int4")
    engine = engine_for(model, 1, 64)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    list(engine.run([engine.add_request(list(range(10, 42)), params)]))
    calls = collections.Counter()
    launch = gemv_kernels._launch_gemv

    def record(x, weight, gated=False, normed=False, multiplied=False):
        if isinstance(weight, QuantizedWeight) and weight.scheme.bits == 4 and int4_mma.takes(weight, x):
            calls[(*weight.shape, gated, normed, multiplied)] += 1

    def recorded_launch(x, weight, width, tiles, norms, act=None, multiplier=None):
        record(x, weight, act is not None, norms is not None, multiplier is not None)
        return launch(x, weight, width, tiles, norms, act, multiplier)

    gemv_kernels._launch_gemv = recorded_launch
    try:
        graphs = engine.runner.graphs
        graphs._step(next(s for s in graphs.sizes if s >= 1))
        torch.cuda.synchronize()
    finally:
        gemv_kernels._launch_gemv = launch
    del model, engine
    torch.cuda.empty_cache()
    return calls


def time_call(n: int, k: int, gated: bool, normed: bool, multiplied: bool) -> tuple:
    """(us in gemv.py's kernel, {tiles: us in int4_mma}, the tiles the model takes today or None, GB per us) of one
    call."""
    weights, x = cycled_weights(n, k, "int4")
    width = n if multiplied or not gated else n // 2
    act = ACTIVATION_CODES["gelu_pytorch_tanh"] if gated else None
    multiplier = torch.randn(1, 1, width, device="cuda", dtype=x.dtype) if multiplied else None
    norms = None
    if normed:  # the model's: residual + norm(x), then the next norm of it
        norm_weight = (torch.rand(k, device="cuda") + 0.5).to(x.dtype)
        norms = (torch.randn_like(x) * 4, norm_weight, 1e-6, None, norm_weight, 1e-6, torch.empty_like(x))
    takes = int4_mma.takes
    int4_mma.takes = lambda *a: False
    try:
        own = graph_us(lambda i: gemv_kernels._launch_gemv(x, weights[i % len(weights)], width, None, norms, act,
                                                           multiplier))
    finally:
        int4_mma.takes = takes

    def mma(i, tiles):
        if norms is not None and int4_mma.fuses_norms(tiles):
            return int4_mma.product(x, weights[i % len(weights)], act, multiplier, tiles, norms)
        row = x if norms is None else gemv_kernels._normed_input(x, norms)
        return int4_mma.product(row, weights[i % len(weights)], act, multiplier, tiles)

    variants = VARIANTS + ([(*tiles[:3], (*tiles, 1)[3], 1) for tiles in VARIANTS] if normed else [])
    timings = {tiles: graph_us(lambda i, t=tiles: mma(i, t)) for tiles in variants}
    current = gemv_kernels._mma_tiles(weights[0], x, gated, normed)
    if current is not None and current not in timings:
        timings[current] = graph_us(lambda i: mma(i, current))
    return own, timings, current, n * k * weight_bytes("int4") / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", nargs="+", default=["E4B"])
    parser.add_argument("--write", action="store_true", help="write each call's best into the device's config")
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"on {torch.cuda.get_device_name()}: us per call (GB/s), the model's choice today, gemv.py's kernel, and "
          f"the best int4_mma tiles (BLOCK_N x warps / target programs)")
    best_by_key = {}
    for preset in args.preset:
        totals = [0.0, 0.0]
        for (n, k, gated, normed, multiplied), count in sorted(model_calls(preset).items()):
            own, timings, current, gb = time_call(n, k, gated, normed, multiplied)
            key = int4_mma.shape_key((n, k), gated, normed)
            tiles, mma_us = min(timings.items(), key=lambda item: item[1])
            now = own if current is None else timings[current]
            best, best_us = (None, own) if own <= mma_us else (tiles, mma_us)
            totals[0] += now * count
            totals[1] += best_us * count
            best_by_key[key] = list(best) if best else None
            name = "gemv.py" if current is None else tiles_name(current)
            print(f"{preset} {key:28s} x{count:3d} | now {name:12s} {now:7.2f} ({gb / now:5.0f}) | gemv.py "
                  f"{own:7.2f} ({gb / own:5.0f}) | int4_mma {tiles_name(tiles):12s} {mma_us:7.2f} "
                  f"({gb / mma_us:5.0f})", flush=True)
        print(f"{preset}: these GEMVs take {totals[0]:.0f} us a step as chosen today, {totals[1]:.0f} each at its best")
    print(json.dumps(best_by_key))
    if args.write:
        path = tuning.update_config(device, "gemv", {"INT4_MMA_BY_SHAPE": best_by_key})
        print(f"wrote {len(best_by_key)} INT4_MMA_BY_SHAPE entries into {path}")

if __name__ == "__main__":
    main()
