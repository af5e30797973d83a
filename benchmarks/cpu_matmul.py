"""The CPU's int4 / int8 kernels (model/quantized.py `cpu_linear`) against the plain twin (dequantize, then F.linear)
at a preset's projection shapes, over the rows of a step: where the crossover `CPU_KERNEL_MAX_ROWS` comes from.
int4 runs the native kernel (kernels/cpu.py, "int4") where it is built and PyTorch's ("int4-aten", on the matrix
repacked for it); int8 PyTorch's. Random weights, bf16 activations, all cores.

    python benchmarks/cpu_matmul.py [--preset E2B] [--rows 1 2 4 8 16 32 64 128]
"""

from __future__ import annotations

import argparse
import time

import torch

from gemma4.config import Config
from gemma4.model.quantized import CPU_KERNEL_MAX_ROWS, ON_LOAD, cpu_linear, native_int4, quantize, to_cpu_int4


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def shapes(preset: str) -> dict[str, tuple[int, int]]:
    """[N, K] of the decoder's projections (the widest MLP: double-wide layers where the preset has them)."""
    text = Config.preset(preset).text_config
    hidden, inter = text.hidden_size, text.intermediate_size * (2 if text.use_double_wide_mlp else 1)
    return {"q_proj": (text.num_attention_heads * text.head_dim, hidden), "gate_proj": (inter, hidden),
            "down_proj": (hidden, inter)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="E2B")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"{args.preset}, bf16 activations, {torch.get_num_threads()} threads; CPU_KERNEL_MAX_ROWS = "
          f"{CPU_KERNEL_MAX_ROWS}\n")
    print("| projection [N, K] | scheme | rows | kernel ms | twin ms | kernel / twin |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    generator = torch.Generator().manual_seed(0)
    for name, (n, k) in shapes(args.preset).items():
        dense = (torch.randn(n, k, generator=generator) * k**-0.5).to(torch.bfloat16)
        for scheme in ("int4", "int4-aten", "int8"):
            weight = quantize(dense, ON_LOAD[scheme.removesuffix("-aten")])
            if scheme == "int4-aten":
                weight = to_cpu_int4(weight)
            elif scheme == "int4" and not native_int4(weight.scheme):
                continue
            for rows in args.rows:
                x = torch.randn(rows, k, generator=generator).to(torch.bfloat16)
                kernel = best_ms(lambda: cpu_linear(x, weight), args.repeats)
                twin = best_ms(lambda: weight.linear(x), args.repeats)
                print(f"| {name} [{n}, {k}] | {scheme} | {rows} | {kernel:.3f} | {twin:.3f} | {kernel / twin:.2f} |")


if __name__ == "__main__":
    main()
