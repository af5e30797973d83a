"""The MoE expert paths alone (26B-A4B shapes, bf16, CUDA): us per call at T tokens, each call of a 50-call CUDA graph
routing to other random experts (weights read from memory, not L2): the decode kernels (`moe_experts`, T*k <= 64
pairs), the sorted-pairs kernels (`sorted_experts`), the grouped GEMMs (`Experts.forward_grouped`), and with
--sweep the tile choices of the decode kernels (T*k <= 64) or of the sorted ones, each kernel's varied while the
other keeps its own; with --write the best of each kernel at the first token count swept of its path go into the
device's kernels/configs JSON (8-bit experts: the BYTE_ keys, which the kernels read first for them).

    python benchmarks/moe_decode.py [--tokens 1 16 64 256] [--sweep [--write]] [--block-m 16 32 64]
        [--quantization fp8]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from gemma4.config import Config
from gemma4.kernels.tuning import config, for_format, update_config
from gemma4.model.fused import QuantizedLinear
from gemma4.model.quantized import ON_LOAD
from gemma4.model.text import Experts
from gemv import graph_us  # benchmarks/gemv.py: a 50-call CUDA graph, best replay

# A sweep's choices per kernel (names, values of each), one kernel's tiles varied while the other keeps its own
DECODE_GU = ("GU_BLOCK_W", "GU_BLOCK_H", "GU_WARPS"), [(2, 4, 8), (256, 512, 1024, 2048, 4096), (4, 8)]
DECODE_DOWN = ("DOWN_BLOCK_H", "DOWN_BLOCK_W", "DOWN_WARPS"), [(1, 2, 4, 8), (1024,), (4, 8)]
SORTED_GU = ("SORTED_GU_BLOCK_N", "SORTED_GU_BLOCK_K", "SORTED_GU_WARPS"), [(32, 64, 128), (64, 128, 256, 512), (4, 8)]
SORTED_DOWN = ("SORTED_DOWN_BLOCK_N", "SORTED_DOWN_BLOCK_K", "SORTED_DOWN_WARPS"), [(32, 64, 128), (64, 128, 256, 512),
                                                                                    (4, 8)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--block-m", type=int, nargs="*", default=[], help="also the sorted path at these BLOCK_M")
    parser.add_argument("--quantization", choices=["fp8", "int8"], default=None, help="8-bit experts, as on load")
    parser.add_argument("--write", action="store_true",
                        help="with --sweep: write the best tiles into the device's config (the format's own keys)")
    args = parser.parse_args()
    text = Config.preset("26B-A4B").text_config
    e, h, w, k = text.num_experts, text.hidden_size, text.moe_intermediate_size, text.top_k_experts
    with torch.device("meta"):
        module = Experts(text)
    module.gate_up_proj = torch.nn.Parameter(torch.randn(e, 2 * w, h, device="cuda", dtype=torch.bfloat16) * h**-0.5)
    module.down_proj = torch.nn.Parameter(torch.randn(e, h, w, device="cuda", dtype=torch.bfloat16) * w**-0.5)
    element_bytes = 2
    if args.quantization:
        scheme, element_bytes = ON_LOAD[args.quantization], 1
        gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
        del module.gate_up_proj, module.down_proj
        module.gate_up_proj, module.down_proj = (QuantizedLinear.of_weight(t, scheme) for t in (gate_up, down))
    calls = 50
    tiles = config("moe", torch.device("cuda"))  # the tuned tiles (tuning.py), overridden in place while sweeping
    prefix = "BYTE_" if args.quantization else ""  # the keys the kernels read first for these weights
    best_tiles, written = {}, set()
    print(f"26B-A4B experts on {torch.cuda.get_device_name()}: us per call (GB/s of the chosen experts' weights)")
    for tokens in args.tokens:
        x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16)
        routes = [torch.rand(tokens, e, device="cuda").argsort(dim=-1)[:, :k] for _ in range(calls)]
        weights = torch.rand(tokens, k, device="cuda")
        bytes_per_call = sum(len(r.unique()) for r in routes) / calls * (3 * w * h * element_bytes)

        def report(label, forward):
            try:
                with torch.no_grad():
                    us = graph_us(lambda i: forward(x, weights, routes[i]), calls=calls)
            except Exception as exc:  # out of resources
                print(f"  T={tokens:4d} {label}: {type(exc).__name__}: {exc}")
                return None
            print(f"  T={tokens:4d} {label}: {us:8.2f} us ({bytes_per_call / us / 1e3:5.0f} GB/s)")
            return us

        paths = (["kernel"] if tokens * k <= 64 else []) + ["sorted", "grouped"]
        for path in paths:
            report(path, getattr(module, f"forward_{path}"))
        for block_m in args.block_m:
            default, tiles["SORTED_BLOCK_M"] = tiles["SORTED_BLOCK_M"], block_m
            report(f"sorted BLOCK_M={block_m}", module.forward_sorted)
            tiles["SORTED_BLOCK_M"] = default
        if not args.sweep:
            continue
        if tokens * k <= 64:  # one token: its down kernel's rows a program are DOWN_ONE_TOKEN_BLOCK_H
            path, down_rows = "kernel", "DOWN_ONE_TOKEN_BLOCK_H" if tokens == 1 else "DOWN_BLOCK_H"
            kernels = [DECODE_GU, ((down_rows, *DECODE_DOWN[0][1:]), DECODE_DOWN[1])]
        else:
            path, kernels = "sorted", [SORTED_GU, SORTED_DOWN]
        for names, choices in kernels:
            keys = [prefix + name for name in names]  # the format's own keys, which the kernels read first
            saved = {key: tiles[key] for key in keys if key in tiles}
            current = tuple(for_format(tiles, prefix)[name] for name in names)
            timings = {}
            for values in [current] + [c for c in itertools.product(*choices) if c != current]:
                tiles.update(zip(keys, values))
                timings[values] = report(f"{path} {' '.join(f'{n}={v}' for n, v in zip(keys, values))}",
                                         getattr(module, f"forward_{path}"))
            for key in keys:
                tiles.pop(key)
            tiles.update(saved)
            best = min((values for values, us in timings.items() if us is not None), key=timings.get)
            print(f"  T={tokens:4d} best {dict(zip(keys, best))}: {timings[best]:.2f} us ({timings[current]:.2f} now)")
            if path not in written:  # the first token count swept of each path
                best_tiles.update(zip(keys, best))
        written.add(path)
    if args.write and best_tiles:
        path = update_config(torch.device("cuda"), "moe", best_tiles)
        print(f"wrote {best_tiles} into {path}")


if __name__ == "__main__":
    main()
