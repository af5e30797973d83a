"""The CPU's int4 / int8 kernels (model/quantized.py `cpu_linear`) against the plain twin (dequantize, then F.linear)
at a preset's projection shapes, over the rows of a step: where the crossover `CPU_KERNEL_MAX_ROWS` comes from.
int4 runs the native kernel (kernels/cpu.py, "int4") where it is built and PyTorch's ("int4-aten", on the matrix
repacked for it); int8 PyTorch's; "int4-chunks" the native kernel on a K wider than CPU_INT4_CHUNK_INPUTS stored
chunk by chunk, as the CPU holds such matrices (`to_chunks`). Random weights, bf16 activations, all cores; each call
reads another copy of the matrix, from 256 MB of copies, as a decode step reads its weights once (from DRAM).

    python benchmarks/cpu_matmul.py [--preset E2B] [--rows 1 2 4 8 16 32 64 128]
"""

from __future__ import annotations

import argparse
import time

import torch

from gemma4.config import Config
from gemma4.model.quantized import (CPU_INT4_CHUNK_INPUTS, CPU_KERNEL_MAX_ROWS, ON_LOAD, QuantizedWeight,
                                    cpu_int4_chunk, cpu_linear, native_int4, quantize, to_chunks, to_cpu_int4)

COPIES_BYTES = 256 * 2**20


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
          f"{CPU_KERNEL_MAX_ROWS}, CPU_INT4_CHUNK_INPUTS = {CPU_INT4_CHUNK_INPUTS}\n")
    print("| projection [N, K] | scheme | rows | kernel ms | twin ms | kernel / twin |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    generator = torch.Generator().manual_seed(0)
    for name, (n, k) in shapes(args.preset).items():
        dense = (torch.randn(n, k, generator=generator) * k**-0.5).to(torch.bfloat16)
        for scheme in ("int4", "int4-chunks", "int4-aten", "int8"):
            weight = quantize(dense, ON_LOAD[scheme.split("-")[0]])
            if scheme == "int4-aten":
                weight = to_cpu_int4(weight)
            elif scheme.startswith("int4") and not native_int4(weight.scheme):
                continue
            if scheme == "int4-chunks":
                if not cpu_int4_chunk(weight):
                    continue
                chunk = cpu_int4_chunk(weight)
                weight = QuantizedWeight(to_chunks(weight.values, chunk), weight.scale, weight.scheme, chunk=chunk)
            copies = [weight] + [copy(weight) for _ in range(COPIES_BYTES // nbytes(weight))]
            for rows in args.rows:
                x = torch.randn(rows, k, generator=generator).to(torch.bfloat16)
                kernel = best_ms(cycling(copies, lambda w: cpu_linear(x, w)), args.repeats)
                twin = best_ms(cycling(copies, lambda w: w.linear(x)), args.repeats)
                print(f"| {name} [{n}, {k}] | {scheme} | {rows} | {kernel:.3f} | {twin:.3f} | {kernel / twin:.2f} |")


def nbytes(weight: QuantizedWeight) -> int:
    return weight.values.numel() * weight.values.element_size() + weight.scale.numel() * weight.scale.element_size()


def copy(weight: QuantizedWeight) -> QuantizedWeight:
    scales_and_zeros = weight.cpu_scales_and_zeros
    if scales_and_zeros is not None:
        scales_and_zeros = scales_and_zeros.clone()
        return QuantizedWeight(weight.values.clone(), scales_and_zeros[..., 0].t(), weight.scheme, scales_and_zeros)
    return QuantizedWeight(weight.values.clone(), weight.scale.clone(), weight.scheme, chunk=weight.chunk)


def cycling(copies: list, fn):
    """fn of the next copy at each call."""
    state = {"next": 0}

    def call():
        state["next"] = (state["next"] + 1) % len(copies)
        return fn(copies[state["next"]])
    return call


if __name__ == "__main__":
    main()
