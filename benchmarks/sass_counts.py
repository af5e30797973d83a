"""Static instruction counts of kernels compiled for sm_90 on any machine, no GPU needed (Triton's front end, and the
ptxas and cuobjdump it ships; tests/sm90_compile.py's launch compiler): per launch, the SASS instructions in all, the
most frequent opcodes, shared memory and register spills. The "sm_90 compiles: N -> M instructions" figures of the
commit messages come from here; a count is not a timing. Launches take the tuning of `--config` (a configs/ file's
name; default.json's by default) where no tile is given.

    python benchmarks/sass_counts.py attention [--preset 26B-A4B] [--batch 64] [--context 1024]
    python benchmarks/sass_counts.py quantized_matmul [--rows 64] [--shape 2816 4096] [--tile 32 64 128 4 4]
    python benchmarks/sass_counts.py moe [--preset 26B-A4B] [--batch 64] [--config NVIDIA_H100_80GB_HBM3]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

import torch
import triton
from triton.tools.disasm import get_sass

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import sm90_compile  # noqa: E402

from gemma4.config import Config  # noqa: E402
from gemma4.kernels import attention, moe, quantized_matmul as qm, tuning  # noqa: E402
from gemma4.model.quantized import ON_LOAD, quantize  # noqa: E402

# A SASS line of cuobjdump's listing: control bits, then an optional predicate and the opcode.
SASS_LINE = re.compile(r"[0-9a-f-]+:[0-9a-f-]+:[0-9a-f-]+:[A-Y-]:[0-9a-f]+\t(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
H100_SMS = 132


def counted(label: str, launch) -> None:
    """Compile the kernels `launch()` starts and print each one's counts."""
    compiled = []
    compile_ = triton.compile

    def capture(*args, **kwargs):
        compiled.append(compile_(*args, **kwargs))
        return compiled[-1]

    triton.compile = capture
    try:
        launch()
    finally:
        triton.compile = compile_
    for kernel in compiled:
        opcodes = collections.Counter(match.group(1) for line in get_sass(kernel.asm["cubin"]).splitlines()
                                      if (match := SASS_LINE.match(line)))
        top = ", ".join(f"{op} {n}" for op, n in opcodes.most_common(8))
        print(f"| {label} | {kernel.name} | {sum(opcodes.values()):,} | {kernel.metadata.shared:,} | "
              f"{opcodes['STL']} | {top} |")


def attention_launches(args) -> None:
    """decode_attention at the preset's sliding and global layer shapes, over a bf16 cache and an fp8 one (paged
    pools, as the engine reads them)."""
    text = Config.preset(args.preset).text_config
    global_kv = getattr(text, "num_global_key_value_heads", None) or text.num_key_value_heads
    for name, kv_heads, dim, window in (("sliding", text.num_key_value_heads, text.head_dim, text.sliding_window),
                                        ("global", global_kv, text.global_head_dim, None)):
        for cache in ("bf16", "fp8"):
            query = torch.randn(args.batch, text.num_attention_heads, dim, dtype=torch.bfloat16)
            pool = torch.randn(kv_heads, args.batch * args.context, dim, dtype=torch.bfloat16)
            scales = {}
            if cache == "fp8":
                pool = pool.to(torch.float8_e4m3fn)
                scales = {"key_scale": torch.ones(kv_heads), "value_scale": torch.ones(kv_heads)}
            positions = torch.arange(args.context).expand(args.batch, args.context).contiguous()
            counted(f"{name} D={dim}, {cache} cache", lambda: attention.decode_attention(
                query, pool, pool, positions, torch.full((args.batch,), args.context - 1), window,
                slots=positions.clone(), num_keys=torch.full((args.batch,), args.context), **scales))


def quantized_matmul_launches(args) -> None:
    """quantized_matmul on one weight shape in each quantize-on-load format, at the given tile."""
    n, k = args.shape
    for fmt in ("fp8", "int4"):
        weight = quantize(torch.randn(n, k), ON_LOAD[fmt])
        counted(f"{fmt} {args.rows}x{n}x{k} at {','.join(map(str, args.tile))}", lambda: qm.quantized_matmul(
            torch.randn(args.rows, k, dtype=torch.bfloat16), weight, tuple(args.tile)))


def moe_launches(args) -> None:
    """The sorted experts' kernels (serving batches) at the preset's expert shapes, bf16 and fp8 experts, `--batch`
    tokens spread over 8 experts (the kernels compile the same for any number)."""
    text = Config.preset(args.preset).text_config
    hidden, width, k = text.hidden_size, text.moe_intermediate_size, text.top_k_experts
    experts = torch.arange(args.batch * k).remainder(8).view(args.batch, k)
    weights = torch.rand(args.batch, k)
    for fmt in ("bf16", "fp8"):
        gate_up, down = torch.randn(8, 2 * width, hidden).bfloat16(), torch.randn(8, hidden, width).bfloat16()
        if fmt == "fp8":
            gate_up, down = quantize(gate_up.float(), ON_LOAD[fmt]), quantize(down.float(), ON_LOAD[fmt])
        counted(f"{fmt} experts, {args.batch} tokens", lambda: moe.sorted_experts(
            torch.randn(args.batch, hidden, dtype=torch.bfloat16), weights, experts, gate_up, down))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kernel", choices=["attention", "quantized_matmul", "moe"])
    parser.add_argument("--preset", default="26B-A4B")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--shape", type=int, nargs=2, default=[2816, 4096], metavar=("N", "K"))
    parser.add_argument("--tile", type=int, nargs="+", default=[32, 64, 128, 4, 4])
    parser.add_argument("--config", default="default", help="the configs/ file whose tuning launches take")
    args = parser.parse_args()
    tuning.device_name = lambda device: args.config
    # Launches compile for sm_90 instead of running, with PDL on and an H100's SMs (tests/sm90_compile.py).
    sm90_compile.compile_launches(attention, moe, qm)
    for module in (attention, moe, qm):
        module._sm_count = lambda device: H100_SMS
    print("| launch | kernel | SASS instructions | shared memory bytes | spill stores | most frequent |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    launches = {"attention": attention_launches, "quantized_matmul": quantized_matmul_launches, "moe": moe_launches}
    launches[args.kernel](args)


if __name__ == "__main__":
    main()
