"""Experiment: GEMV program shapes that keep more weight bytes in flight per SM than `kernels.gemv` (one tile of
BLOCK_N rows per program, loaded in one wave, then reduced). An H200 reads memory ~1.4x faster than an H100 with the
same SM count and latency, so it might need more bytes in flight to reach its bandwidth.

Result on an H200 (2026-11-29, docs/benchmarks.md "eighth step"): no. The kernel's own tiles were the fastest at
every E2B shape but a tie on the LM head (24576x1536: 19.55 us, 3.86 TB/s, against 20.11-22.29; LM head 184.74 us,
4.36 TB/s, against 184.50 for `loop`); on the small shapes the variants were 1.2-1.8x slower.

Variants, each at every E2B decode shape, timed like benchmarks/gemv.py (a CUDA graph of 50 calls over ~256 MB of
weight copies):
  default     kernels.gemv with its tiles
  loop        persistent programs (a few per SM), each looping over row blocks with Triton's software pipelining
              (`tl.range(num_stages=S)`)
  prefetch    persistent programs that load the next row block into registers before reducing the current one
  tma         persistent programs whose row blocks arrive by TMA (a [N, K/256, 256] descriptor, zero-filled past K)
              into a pipelined shared-memory ring

    python benchmarks/gemv_variants.py [--shapes N,K ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).parent))
from gemv import cycled_weights, decode_shapes, graph_us  # noqa: E402

from gemma4.kernels.gemv import gemv  # noqa: E402


@triton.jit
def _loop_kernel(x_ptr, w_ptr, out_ptr, N, stride, PROGRAMS, ITERS: tl.constexpr, K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    cols = tl.arange(0, BLOCK_K)
    k_ok = cols < K
    x = tl.load(x_ptr + cols, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    for i in tl.range(0, ITERS, num_stages=STAGES):
        block = tl.program_id(0) + i * PROGRAMS
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :],
                    mask=(rows < N)[:, None] & k_ok[None, :], other=0.0)
        tl.store(out_ptr + rows, tl.sum(w.to(tl.float32) * x, axis=1).to(out_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def _prefetch_kernel(x_ptr, w_ptr, out_ptr, N, stride, PROGRAMS, ITERS: tl.constexpr, K: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = tl.arange(0, BLOCK_K)
    k_ok = cols < K
    x = tl.load(x_ptr + cols, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=(rows < N)[:, None] & k_ok[None, :],
                other=0.0)
    for _ in range(0, ITERS):
        next_rows = rows + PROGRAMS * BLOCK_N
        w_next = tl.load(w_ptr + next_rows.to(tl.int64)[:, None] * stride + cols[None, :],
                         mask=(next_rows < N)[:, None] & k_ok[None, :], other=0.0)
        tl.store(out_ptr + rows, tl.sum(w.to(tl.float32) * x, axis=1).to(out_ptr.dtype.element_ty), mask=rows < N)
        w = w_next
        rows = next_rows


@triton.jit
def _tma_kernel(x_ptr, w_desc, out_ptr, N, PROGRAMS, ITERS: tl.constexpr, K: tl.constexpr,
                BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, CHUNK: tl.constexpr, STAGES: tl.constexpr):
    # w_desc views the weight as [N, K / CHUNK, CHUNK]; a block [BLOCK_N, CHUNKS, CHUNK] (CHUNKS a power of two)
    # reads zeros past K, which cost no bandwidth
    cols = tl.arange(0, CHUNKS)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
    x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :, :]
    for i in tl.range(0, ITERS, num_stages=STAGES):
        block = tl.program_id(0) + i * PROGRAMS
        w = w_desc.load([block * BLOCK_N, 0, 0])
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        out = tl.sum(tl.sum(w.to(tl.float32) * x, axis=2), axis=1)
        tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=rows < N)


def _grid(n: int, block_n: int, per_sm: int) -> tuple[int, int]:
    """(programs, row blocks per program) of a persistent launch over n rows: a few programs per SM."""
    blocks = triton.cdiv(n, block_n)
    programs = min(blocks, per_sm * torch.cuda.get_device_properties(0).multi_processor_count)
    return programs, triton.cdiv(blocks, programs)


def _persistent(kernel, x, w, block_n, warps, per_sm, **meta):
    """Launch a persistent pointer-load variant: program p takes row blocks p, p + programs, p + 2 * programs ..."""
    n, k = w.shape
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    programs, iters = _grid(n, block_n, per_sm)
    kernel[(programs,)](x, w, out, n, w.stride(0), programs, iters, k, BLOCK_N=block_n,
                        BLOCK_K=triton.next_power_of_2(k), num_warps=warps, **meta)
    return out


def loop(x, w, block_n, warps, stages, per_sm):
    return _persistent(_loop_kernel, x, w, block_n, warps, per_sm, STAGES=stages)


def prefetch(x, w, block_n, warps, per_sm):
    return _persistent(_prefetch_kernel, x, w, block_n, warps, per_sm)


CHUNK = 256


def tma_descriptor(w, block_n):
    n, k = w.shape
    chunks = triton.next_power_of_2(k // CHUNK)
    return TensorDescriptor(w, [n, k // CHUNK, CHUNK], [w.stride(0), CHUNK, 1], [block_n, chunks, CHUNK])


def tma(x, desc, n, k, block_n, warps, stages, per_sm):
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    programs, iters = _grid(n, block_n, per_sm)
    _tma_kernel[(programs,)](x, desc, out, n, programs, iters, k, BLOCK_N=block_n,
                             CHUNKS=triton.next_power_of_2(k // CHUNK), CHUNK=CHUNK, STAGES=stages, num_warps=warps)
    return out


# (BLOCK_N, warps, stages, programs per SM) / (BLOCK_N, warps, programs per SM): from ~1 to ~4 row blocks in flight
# per program, 1-4 programs per SM
LOOP_TILES = [(4, 4, 3, 2), (4, 8, 3, 2), (2, 4, 4, 4), (4, 4, 4, 2), (8, 8, 3, 1), (8, 8, 2, 2), (2, 4, 3, 4),
              (4, 8, 2, 4)]
PREFETCH_TILES = [(4, 4, 2), (4, 8, 2), (8, 8, 1), (8, 8, 2), (2, 4, 4), (4, 4, 4)]
TMA_TILES = [(4, 4, 3, 1), (4, 4, 4, 1), (2, 4, 4, 2), (8, 8, 3, 1), (2, 4, 3, 2), (4, 8, 3, 2), (1, 4, 4, 2),
             (8, 4, 2, 1)]


def variants(n: int, k: int) -> list:
    """(name, tiles, fn(x, w)) to try at [n, k]."""
    found = [("default", None, lambda x, w: gemv(x, w))]
    if k <= 4096:
        for t in LOOP_TILES:
            if t[0] * triton.next_power_of_2(k) * 2 * t[2] <= 160 * 1024:
                found.append(("loop", t, lambda x, w, t=t: loop(x, w, *t)))
        for t in PREFETCH_TILES:
            found.append(("prefetch", t, lambda x, w, t=t: prefetch(x, w, *t)))
    if k % CHUNK == 0 and k // CHUNK <= 64:
        for t in TMA_TILES:
            if t[0] * triton.next_power_of_2(k // CHUNK) * CHUNK * 2 * t[2] <= 160 * 1024:
                descs = {}

                def run(x, w, t=t, descs=descs):
                    if w.data_ptr() not in descs:
                        descs[w.data_ptr()] = tma_descriptor(w, t[0])
                    return tma(x, descs[w.data_ptr()], *w.shape, *t)
                found.append(("tma", t, run))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="E2B")
    parser.add_argument("--shapes", nargs="*", default=[], metavar="N,K")
    args = parser.parse_args()
    shapes = ({tuple(int(v) for v in s.split(",")): 1 for s in args.shapes} if args.shapes
              else dict(decode_shapes(args.preset)))
    print(f"{torch.cuda.get_device_name()}: us per call (GB/s); best of each variant")
    totals = {}
    for (n, k), count in sorted(shapes.items()):
        weights, x = cycled_weights(n, k)
        ref = gemv(x, weights[0]).float()
        best = {}
        for name, tiles, fn in variants(n, k):
            try:
                err = (fn(x, weights[0]).float() - ref).abs().max().item()
                if err > 1e-2 * ref.abs().max().item():
                    print(f"  {name} {tiles}: wrong (max error {err:.3g})")
                    continue
                us = graph_us(lambda i: fn(x, weights[i % len(weights)]))
            except Exception as exc:  # out of resources, unsupported
                print(f"  {name} {tiles}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            if name not in best or us < best[name][0]:
                best[name] = (us, tiles)
        gb = n * k * 2 / 1e3
        print(f"N={n:6d} K={k:5d} x{count:3d} | " + " | ".join(
            f"{name} {us:7.2f} ({gb / us:4.0f}) {tiles or ''}" for name, (us, tiles) in best.items()), flush=True)
        totals["default"] = totals.get("default", 0.0) + best["default"][0] * count
        totals["best"] = totals.get("best", 0.0) + min(us for us, _ in best.values()) * count
    print("per decode step, us: " + ", ".join(f"{name} {us:.0f}" for name, us in totals.items()))


if __name__ == "__main__":
    main()
