"""Decode GEMVs alone (one activation row, bf16, CUDA): cuBLAS (F.linear) against the Triton GEMV kernel and its
tile choices, at every distinct projection shape of a preset's decode step, each timed inside a CUDA graph of 50
calls (no launch gaps, as in the captured decode step).

    python benchmarks/gemv.py --preset E2B [--sweep] [--deferred] [--quantization int4]

Prints us per call and GB/s for each shape (N outputs x K inputs, and how many of them one decode step runs).
--quantization fp8|int8|int4: the weights quantized as on load (the GB/s count their bytes, scales included; cuBLAS
runs the bf16 weight).
--deferred: for each product whose residual norms the model may defer (`model.text.DEFERRABLE`) and the GEMV that
reads them, the pair with the norms in a kernel of their own between the two against the plain producer and a
consumer that normalizes its own input (`norms=`), with the consumer's tiles swept.
"""

from __future__ import annotations

import argparse
import collections
import itertools

import torch
import torch.nn.functional as F

from gemma4.config import Config
from gemma4.kernels.gemv import gemv, gemv_gated
from gemma4.kernels.norm import residual_rms_norm
from gemma4.model.quantized import ON_LOAD, quantize
from gemma4 import Model


def decode_shapes(preset: str) -> collections.Counter:
    """(N, K) of every matmul weight one decode step reads, with its count (fused q/k/v and gate/up as on CUDA)."""
    with torch.device("meta"):
        model = Model(Config.preset(preset))
    model.fuse_projections_()
    shapes = collections.Counter()
    for layer in model.text.layers:
        attn, mlp = layer.self_attn, layer.mlp
        shapes[tuple((attn.qkv_weight if attn.qkv_weight is not None else attn.q_proj.weight).shape)] += 1
        shapes[tuple(attn.o_proj.weight.shape)] += 1
        shapes[tuple(mlp.gate_up_weight.shape)] += 1
        shapes[tuple(mlp.down_proj.weight.shape)] += 1
        if layer.has_per_layer_input:
            shapes[tuple(layer.per_layer_input_gate.weight.shape)] += 1
            shapes[tuple(layer.per_layer_projection.weight.shape)] += 1
        if layer.enable_moe_block:
            shapes[tuple(layer.router.proj.weight.shape)] += 1
    if model.text.ple_dim:
        shapes[tuple(model.text.per_layer_model_projection.weight.shape)] += 1
    shapes[tuple(model.text.embed_tokens.weight.shape)] += 1  # the tied LM head
    return shapes


CALLS = 50


def graph_us(fn, calls=CALLS, repeat=5) -> float:
    """fn(i) for i in range(calls), captured in one CUDA graph: best of `repeat` replays, us per call."""
    fn(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    best = float("inf")
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / calls)
    return best


def cycled_weights(n: int, k: int, quantization: str | None = None) -> tuple[list, torch.Tensor]:
    """Enough copies of an [n, k] bf16 weight (or of its `quantization`) that a graph's calls cycle through ~256 MB,
    so each call reads its weight from memory, as in a decode step (whose weights are far larger than the 50 MB L2),
    not from the L2 cache; and one activation row [1, 1, k]."""
    copies = max(1, min(CALLS, -(-256_000_000 // int(n * k * weight_bytes(quantization)))))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5 for _ in range(copies)]
    if quantization:
        weights = [quantize(w, ON_LOAD[quantization]) for w in weights]
    return weights, torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)


def weight_bytes(quantization: str | None) -> float:
    """Bytes a weight element costs, its share of the bf16 scales included."""
    if not quantization:
        return 2.0
    scheme = ON_LOAD[quantization]
    return scheme.bits / 8 + (2 / scheme.group_size if scheme.group_size else 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="E2B")
    parser.add_argument("--sweep", action="store_true", help="also try other tiles (BLOCK_N, BLOCK_K, warps, stages)")
    parser.add_argument("--tiles", nargs="*", default=[], metavar="N,K,WARPS,STAGES",
                        help="also try these tiles (a BLOCK_K over the row's width means one step)")
    parser.add_argument("--deferred", action="store_true", help="time deferred residual norms instead")
    parser.add_argument("--quantization", choices=sorted(ON_LOAD), default=None, help="quantized weights (default)")
    args = parser.parse_args()
    if args.deferred:
        return deferred(args.preset)
    candidates = [None]  # the kernel's default tiles for each shape (as the model runs it)
    if args.sweep:
        candidates += list(itertools.product((2, 4, 8, 16), (256, 512, 1024), (4, 8), (3,)))
        candidates += [(4, 1024, 8, 4), (4, 2048, 8, 3)]
    candidates += [tuple(int(v) for v in t.split(",")) for t in args.tiles]
    print(f"{args.preset} on {torch.cuda.get_device_name()}: us per call (GB/s)")
    total = collections.Counter()
    for (n, k), count in sorted(decode_shapes(args.preset).items()):
        weights, x = cycled_weights(n, k, args.quantization)
        copies = len(weights)
        gb = n * k * weight_bytes(args.quantization) / 1e3  # bytes per us = GB/s * 1e-3
        dense = [w.dequantize(x.dtype) for w in weights[:1]] if args.quantization else weights
        ref = F.linear(x, dense[0])
        cublas = graph_us(lambda i: F.linear(x, dense[i % len(dense)]))
        results = []
        for tiles in candidates:
            try:
                err = (gemv(x, weights[0], tiles).float() - ref.float()).abs().max().item()
                results.append((graph_us(lambda i: gemv(x, weights[i % copies], tiles)), tiles, err))
            except Exception as exc:  # out of resources
                print(f"  {tiles}: {type(exc).__name__}")
        best = min(results, key=lambda result: result[0])
        default = results[0]
        total["cublas"] += cublas * count
        total["triton default"] += default[0] * count
        total["triton best"] += best[0] * count
        print(f"N={n:6d} K={k:5d} x{count:3d} | cuBLAS {cublas:7.2f} ({gb / cublas:5.0f}) | default {default[0]:7.2f} "
              f"({gb / default[0]:5.0f}) err {default[2]:.1e} | best {best[0]:7.2f} ({gb / best[0]:5.0f}) "
              f"{best[1] or 'default'}")
    print("per decode step, us: " + ", ".join(f"{name} {us:.0f}" for name, us in total.items()))


def deferred_sites(preset: str) -> collections.Counter:
    """(site, producer [N, K], consumer [N, K], consumer kind, scalar?, next norm?) of every deferrable residual norm
    of a decode step (as DecoderLayer.forward defers them), with its count."""
    with torch.device("meta"):
        model = Model(Config.preset(preset))
    model.fuse_projections_()
    layers = model.text.layers
    sites = collections.Counter()
    for i, layer in enumerate(layers):
        if layer.enable_moe_block:
            continue
        mlp = layer.mlp
        later = layers[i + 1].self_attn if i + 1 < len(layers) else None
        reader = tuple((later.qkv_weight if later.qkv_weight is not None else later.q_proj.weight).shape) if later \
            else None
        sites["o_proj", tuple(layer.self_attn.o_proj.weight.shape), tuple(mlp.gate_up_weight.shape), "gate/up", False,
              True] += 1
        if layer.has_per_layer_input:
            sites["down_proj", tuple(mlp.down_proj.weight.shape), tuple(layer.per_layer_input_gate.weight.shape),
                  "gated", False, False] += 1
            if reader:
                sites["per_layer_projection", tuple(layer.per_layer_projection.weight.shape), reader, "gemv", True,
                      True] += 1
        elif reader:
            sites["down_proj", tuple(mlp.down_proj.weight.shape), reader, "gemv", True, True] += 1
    return sites


def deferred(preset: str) -> None:
    # None: the tuned NORMED_TILES (kernels/tuning.py); (BLOCK_N, BLOCK_K: the row's width, warps, stages, GROUPS of
    # rows a program)
    consumer_tiles = [None] + [(n, 4096, warps, 3, groups) for n, warps, groups in
                               itertools.product((1, 2, 4, 8), (4, 8), (1, 2, 4, 8))]
    print(f"{preset} on {torch.cuda.get_device_name()}: us per (producer, consumer) pair: the norms in a kernel of "
          "their own, or deferred to the consumer (its tiles: default, best)")
    total = collections.Counter()
    for (site, (pn, pk), (cn, ck), kind, has_scalar, has_next), count in sorted(deferred_sites(preset).items()):
        producers, x = cycled_weights(pn, pk)
        consumers, _ = cycled_weights(cn, ck)
        bf16 = dict(device="cuda", dtype=torch.bfloat16)
        residual, new = torch.randn(1, 1, pn, **bf16), torch.empty(1, 1, pn, **bf16)
        norm_weight, next_weight = torch.ones(pn, **bf16), (torch.ones(pn, **bf16) if has_next else None)
        scalar = torch.ones(1, **bf16) if has_scalar else None
        multiplier = torch.randn(1, 1, cn, **bf16) if kind == "gated" else None

        def consume(row, i, norms=None, tiles=None):
            weight = consumers[i % len(consumers)]
            if kind == "gemv":
                return gemv(row, weight, tiles, norms=norms)
            return gemv_gated(row, weight, "gelu_pytorch_tanh", multiplier, norms=norms, tiles=tiles)

        def norms_kernel(i):
            y = gemv(x, producers[i % len(producers)]).view_as(residual)
            new_row, next_row = residual_rms_norm(residual, y, norm_weight, 1e-6, scalar, next_weight, 1e-6)
            consume(next_row if has_next else new_row, i)

        def deferred_pair(tiles):
            norms = (residual, norm_weight, 1e-6, scalar, next_weight, 1e-6, new)
            return lambda i: consume(gemv(x, producers[i % len(producers)]), i, norms, tiles)

        before = graph_us(norms_kernel)
        after = [(graph_us(deferred_pair(t)), t or "default") for t in consumer_tiles]
        best = min(after, key=lambda result: result[0])
        total["norms' kernel"] += before * count
        total["deferred"] += after[0][0] * count
        total["deferred, best tiles"] += best[0] * count
        print(f"{site:20s} {pn}x{pk} -> {kind:7s} {cn}x{ck} x{count:3d} | norms' kernel {before:6.2f} | deferred "
              f"{after[0][0]:6.2f} | best {best[0]:6.2f} {best[1]} | next: "
              + ", ".join(f"{us:.2f} {t}" for us, t in sorted(after, key=lambda r: r[0])[1:4]))
    print("per decode step, us: " + ", ".join(f"{name} {us:.0f}" for name, us in total.items()))


if __name__ == "__main__":
    main()
