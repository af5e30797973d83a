#!/usr/bin/env bash
# The quantized-weight figures of docs/benchmarks.md (issue 23's rows) on one GPU, random weights quantized on load:
# 26B-A4B fp8 at batch 1 and 64 concurrent requests (bf16 and fp8 KV cache), then 31B, E4B and E2B in int4 at batch 1.
# With --tune, first the sweeps that write the device's tables into src/gemma4/kernels/configs/ (the 8-bit MoE and
# quantized_matmul tiles, int4_mma's per-call tiles); they take several minutes.
#
#     bash benchmarks/quantized_figures.sh [--tune]
set -uo pipefail
cd "$(dirname "$0")/.."
bench() { python -m gemma4.cli bench --steps 32 --repeat 3 "$@"; }

if [[ "${1:-}" == "--tune" ]]; then
    python benchmarks/moe_decode.py --tokens 64 1 --quantization fp8 --sweep --write
    python benchmarks/quantized_matmul_tiles.py --preset 26B-A4B --quantization fp8 --rows 16 64 --write
    python benchmarks/int4_mma_tiles.py --preset E4B 31B E2B --write
fi
bench --preset 26B-A4B --batch 1 --concurrency 64 --quantization fp8 --prefill 16384
bench --preset 26B-A4B --batch --concurrency 64 --quantization fp8 --kv-cache-dtype fp8 --prefill
for preset in 31B E4B E2B; do
    bench --preset "$preset" --batch 1 --concurrency 0 --quantization int4 --prefill
done
