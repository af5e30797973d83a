"""The MoE decode kernels alone (26B-A4B shapes, bf16, CUDA): us per call of `moe_experts` at T tokens, each call
of a 50-call CUDA graph routing to other random experts (weights read from memory, not L2), for tile choices of
its two kernels.

    python benchmarks/moe_decode.py [--tokens 1] [--sweep]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from gemma4.config import Config
from gemma4.kernels import moe
from gemv import graph_us  # benchmarks/gemv.py: a 50-call CUDA graph, best replay


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    text = Config.preset("26B-A4B").text_config
    e, h, w, k = text.num_experts, text.hidden_size, text.moe_intermediate_size, text.top_k_experts
    gate_up = torch.randn(e, 2 * w, h, device="cuda", dtype=torch.bfloat16) * h**-0.5
    down = torch.randn(e, h, w, device="cuda", dtype=torch.bfloat16) * w**-0.5
    x = torch.randn(args.tokens, h, device="cuda", dtype=torch.bfloat16)
    calls = 50
    routes = [torch.rand(args.tokens, e, device="cuda").argsort(dim=-1)[:, :k] for _ in range(calls)]
    weights = torch.rand(args.tokens, k, device="cuda")
    bytes_per_call = len(torch.cat(routes[:1]).unique()) * (3 * w * h * 2)

    def time_us():
        return graph_us(lambda i: moe.moe_experts(x, weights, routes[i], gate_up, down), calls=calls)

    configs = [(moe.GU_BLOCK_W, moe.GU_BLOCK_H, moe.GU_WARPS, moe.DOWN_BLOCK_H, moe.DOWN_BLOCK_W, moe.DOWN_WARPS)]
    if args.sweep:
        # One kernel's tiles at a time, the other's at their defaults.
        gu_tiles, down_tiles = configs[0][:3], configs[0][3:]
        configs += [c + down_tiles for c in itertools.product((2, 4, 8), (256, 512, 1024), (4, 8)) if c != gu_tiles]
        configs += [gu_tiles + c for c in itertools.product((1, 2, 4, 8), (1024,), (4, 8)) if c != down_tiles]
    print(f"26B-A4B experts, T={args.tokens}, on {torch.cuda.get_device_name()}: us per call (GB/s, distinct experts)")
    for config in configs:
        (moe.GU_BLOCK_W, moe.GU_BLOCK_H, moe.GU_WARPS, moe.DOWN_BLOCK_H, moe.DOWN_BLOCK_W, moe.DOWN_WARPS) = config
        try:
            us = time_us()
        except Exception as exc:  # out of resources
            print(f"{config}: {type(exc).__name__}: {exc}")
            continue
        print(f"{config}: {us:7.2f} us ({bytes_per_call / us / 1e3:5.0f} GB/s)")


if __name__ == "__main__":
    main()
