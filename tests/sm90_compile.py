"""Compile the Triton kernels (the decode ones with PDL on, the prefill attention) for a Hopper GPU (sm_90) on a
machine without one: Triton's front end and the ptxas it ships. The interpreter runs kernels as Python and cannot see
what only compilation rejects (a loop-carried value that changes type, an op the interpreter emulates but the
compiler does not take). Run by test_kernels_compile.py in a process without TRITON_INTERPRET; each wrapper below is
called on small CPU tensors and its launch is compiled instead of run (the outputs stay garbage)."""

from __future__ import annotations

import itertools
import sys
from types import SimpleNamespace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import JITFunction

from gemma4.kernels import (activation, attention, gemv, int4_mma, logits, moe, norm, prefill_attention, router,
                            step_inputs, tuning)

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64", torch.bool: "i1", torch.int8: "i8", torch.float8_e4m3fn: "fp8e4nv"}
compiled: list[str] = []


def _compile_launch(self: JITFunction, *args, grid, warmup, **kwargs):
    """Stands in for JITFunction.run: the launch's signature and constexprs from its arguments, then compile. As the
    JIT specializes a launch, a pointer 16-byte aligned and an integer argument divisible by 16 (outside
    do_not_specialize) say so, which is what lets the compiler vectorize loads: the code the GPU runs."""
    names = [p.name for p in self.params]
    bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(self.params):
        value, aligns = bound[p.name], not (p.do_not_specialize or p.do_not_specialize_on_alignment)
        if p.name == "INTERPRET":
            value = False  # the compiled path, whatever the CPU tensors say
        if p.is_constexpr or value is None:
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + TYPES[value.dtype]
            if value.data_ptr() % 16 == 0 and aligns:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and aligns:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = "fp32"
    source = GluonASTSource if self.is_gluon() else ASTSource
    triton.compile(source(self, signature, constexprs, attrs=attrs), target=TARGET, options=options)
    compiled.append(f"{self.fn.__name__} {sorted((k, v) for k, v in constexprs.items() if v is not None)}")


def compile_launches(*modules) -> None:
    """From here on, kernel launches compile for sm_90 instead of running (`_compile_launch`); those of `modules`
    with PDL on."""
    JITFunction.run = _compile_launch
    for module in modules:
        module.launch_options = lambda x: {"PDL": True, "launch_pdl": True}


def main() -> None:
    compile_launches(activation, attention, gemv, int4_mma, logits, moe, norm, router, step_inputs)
    real_tiles = gemv._tiles
    gemv._tiles = router._tiles = lambda x, *args, **kwargs: real_tiles(SimpleNamespace(is_cuda=True), *args,
                                                                        **kwargs)  # GPU tiles
    bf16 = torch.bfloat16

    def rand(*shape, dtype=bf16):
        return torch.randn(*shape).to(dtype)

    # GEMVs: K over one BLOCK_K step (a loop), ragged and exact.
    for k in (1000, 4096, 5000):
        x, w = rand(1, 1, k), rand(96, k)
        gemv.gemv(x, w)
        gemv.gemv_gated(x, w, "gelu_pytorch_tanh")
        gemv.gemv_gated(x, w, "gelu_pytorch_tanh", rand(96))
    # GEMVs that normalize their input (one tile as wide as the row): E2B's and E4B's widths; narrow outputs (one
    # group of rows a program) and wide ones (several).
    for k, n in itertools.product((1536, 2560), (96, 2 * tuning.tile("gemv", "GROUPS_MIN_WIDTH"))):
        y, w, res, nw = rand(1, 1, k), rand(n, k), rand(1, 1, k), rand(k)
        gemv.gemv(y, w, norms=(res, nw, 1e-6, rand(1), nw, 1e-6, torch.empty_like(res)))
        gemv.gemv_gated(y, w, "gelu_pytorch_tanh", norms=(res, nw, 1e-6, None, nw, 1e-6, torch.empty_like(res)))
        gemv.gemv_gated(y, w, "gelu_pytorch_tanh", rand(n), norms=(res, nw, 1e-6, None, None, None,
                                                                   torch.empty_like(res)))
    for k in (1000, 4096):  # wide outputs, rows of one step: several groups
        x, w = rand(1, 1, k), rand(2 * tuning.tile("gemv", "GROUPS_MIN_WIDTH"), k)
        gemv.gemv(x, w)
        gemv.gemv_gated(x, w, "gelu_pytorch_tanh")
    # int4 GEMVs in groups: one step and several.
    from gemma4.model.quantized import ON_LOAD, Scheme, quantize
    for k in (256, 800):
        x = rand(1, 1, k)
        gemv.gemv(x, quantize(rand(96, k), ON_LOAD["int4"]))
        gemv.gemv_gated(x, quantize(rand(192, k), ON_LOAD["int4"]), "gelu_pytorch_tanh")
    # int4 GEMVs on the tensor cores with register operands (Gluon): one split and several, groups of 32 and 128
    for n, k, group in ((32000, 256, 32), (4096, 2048, 32), (100, 1024, 128)):
        int4_mma.product(rand(1, 1, k), quantize(rand(n, k), Scheme("int", 4, "group", group_size=group)))
    # with the gated activation: fused gate/up rows (one split and several), and up given
    for n, k in ((64000, 256), (8192, 2048)):
        int4_mma.product(rand(1, 1, k), quantize(rand(n, k), ON_LOAD["int4"]), 0)
    int4_mma.product(rand(1, 1, 1024), quantize(rand(96, 1024), ON_LOAD["int4"]), 0, rand(1, 1, 96))
    # two steps in flight, plain and gated
    for act in (None, 0):
        int4_mma.product(rand(1, 1, 2048), quantize(rand(4096, 2048), ON_LOAD["int4"]), act, None, (32, 1, 1000, 2))
    # the input's residual norms in its programs: E2B's, E4B's and 31B's rows (one chunk of the norms' loops, and
    # several with a ragged last), with and without the layer scalar and the next norm, one split and several
    for k, tiles in ((1536, (16, 1, 1000)), (2560, (64, 4, 500, 2)), (5376, (32, 2, 1000))):
        y, res, nw = rand(1, 1, k), rand(1, 1, k), rand(k)
        for act, scalar, next_weight in ((0, None, nw), (None, rand(1), nw), (None, rand(1), None)):
            int4_mma.product(y, quantize(rand(4096, k), ON_LOAD["int4"]), act, None, tiles,
                             (res, nw, 1e-6, scalar, next_weight, 1e-6, torch.empty_like(res)))
    # every other (BLOCK_N, warps, steps prefetched) that a device's INT4_MMA_BY_SHAPE names, plain and gated
    named_tiles = sorted({(*t[:2], (*t[3:], 1)[0]) for table in tuning.every_device("gemv").values()
                          for t in table.get("INT4_MMA_BY_SHAPE", {}).values() if t})
    print(f"{len(named_tiles)} int4_mma tiles named by the configs")
    for block_n, warps, prefetch in named_tiles:
        for act in (None, 0):
            int4_mma.product(rand(1, 1, 2048), quantize(rand(4096, 2048), ON_LOAD["int4"]), act, None,
                             (block_n, warps, 1000, prefetch))
    logits.softcap(rand(2, 1000), 30.0)
    logits.argmax(rand(2, 10000, dtype=torch.float32))
    # A forward's inputs: embeddings, per-layer inputs, RoPE tables.
    ids = torch.zeros(2, 1, dtype=torch.int64)
    step_inputs.scaled_embedding(ids, rand(8, 1536), 39.25)
    step_inputs.scaled_embedding(ids, rand(8, 1536), 39.25, placeholders=(5, 6, 7), pad_id=0)
    step_inputs.per_layer_inputs(rand(2, 1, 4 * 256), ids, rand(8, 4 * 256), rand(256), 1e-6, 0.025, 16.0)
    step_inputs.rope_cos_sin(ids, torch.rand(128), bf16)
    # Norms, RoPE and the fused cache write.
    rows = rand(2, 3, 256)
    norm.rms_norm(rows, rand(256), 1e-6)
    norm.residual_rms_norm(rows, rand(2, 3, 256), rand(256), 1e-6, rand(1), rand(256), 1e-6)
    cos, sin = rand(2, 1, 64), rand(2, 1, 64)
    norm.qk_norm_rope(rand(2, 1, 4, 64), rand(64), 1e-6, cos, sin)
    cache = rand(2, 2, 16, 64)
    norm.qkv_norm_rope_store(rand(2, 1, 4 * 64), rand(2, 1, 2 * 64), rand(2, 1, 2 * 64), rand(64), rand(64), 1e-6,
                             cos, sin, cache, cache.clone(), torch.zeros(2, 1, dtype=torch.int64))
    # Decode attention, static with a window, and paged as a decode step reads its pools (the new key after the wait).
    q, kv = rand(2, 4, 64), rand(2, 2, 200, 64)
    positions = torch.arange(200).expand(2, 200).contiguous()
    attention.decode_attention(q, kv, kv, positions, torch.full((2,), 199), window=128)
    pool = rand(2, 400, 64)
    attention.decode_attention(q, pool, pool, positions, torch.full((2,), 199), slots=positions.clone(),
                               num_keys=torch.full((2,), 150), new_key_only=True)
    # A small grid's warps under the H100's table (SMALL_GRID_*: E2B's one kv head at batch 1), at a global layer's D.
    h100 = tuning.every_device("attention")["NVIDIA_H100_80GB_HBM3"]
    attention.config = lambda kernel, device=None: h100
    pool = rand(1, 400, 512)
    attention.decode_attention(rand(1, 8, 512), pool, pool, positions[:1], torch.full((1,), 199),
                               slots=positions[:1].clone(), num_keys=torch.full((1,), 150), new_key_only=True)
    attention.config = tuning.config
    # MoE, router, gated activation.
    x = rand(3, 256)
    experts = torch.zeros(3, 2, dtype=torch.int64)
    moe.moe_experts(x, rand(3, 2, dtype=torch.float32), experts, rand(4, 2 * 96, 256), rand(4, 256, 96))
    moe.combine_pairs(rand(6, 256), torch.arange(6), rand(3, 2, dtype=torch.float32))
    moe.sorted_experts(x, rand(3, 2, dtype=torch.float32), experts, rand(4, 2 * 96, 256), rand(4, 256, 96))
    # int4 experts in groups of 32 (several a step) and 128 (a step within one group on the sorted kernels' tiles).
    for group, width in ((32, 96), (128, 128)):
        int4 = Scheme("int", 4, "group", group_size=group)
        gate_up, down = quantize(rand(4, 2 * width, 256), int4), quantize(rand(4, 256, width), int4)
        moe.moe_experts(x, rand(3, 2, dtype=torch.float32), experts, gate_up, down)
        moe.sorted_experts(x, rand(3, 2, dtype=torch.float32), experts, gate_up, down)
    # fp8 experts per channel (the sorted kernels' fp8 -> bf16 in inline PTX)
    gate_up, down = quantize(rand(4, 2 * 96, 256), ON_LOAD["fp8"]), quantize(rand(4, 256, 96), ON_LOAD["fp8"])
    moe.moe_experts(x, rand(3, 2, dtype=torch.float32), experts, gate_up, down)
    moe.sorted_experts(x, rand(3, 2, dtype=torch.float32), experts, gate_up, down)
    moe.moe_residual_norm(rows, rand(2, 3, 256), rand(2, 3, 256), rand(256), rand(256), rand(256), 1e-6, rand(1),
                          rand(256), 1e-6)
    pairs = moe.ExpertPairs(rand(12, 256), torch.arange(12), rand(6, 2, dtype=torch.float32))
    moe.moe_residual_norm(rows, rand(2, 3, 256), pairs, rand(256), rand(256), rand(256), 1e-6, rand(1))
    values, ids = torch.randn(3, 64).sort(dim=-1, descending=True)
    logits.sample_candidates(values, ids, torch.rand(4, 3), torch.rand(3))
    router.router_input(x, rand(256), 0.0625, 1e-6)
    router.route(rand(3, 128), rand(128), 8)
    router.project_and_route(rand(1, 2816), rand(128, 2816), rand(128), 8)
    router.project_and_route(rand(1, 2816), rand(128, 2816), rand(128), 8,
                             attention_tail=(rand(1, 2816), rand(2816), 1e-6, rand(2816), rand(2816), 0.02, rand(2816)))
    activation.gated_activation(rand(3, 96), rand(3, 96), "gelu_pytorch_tanh")
    # Prefill attention at both head dims (the GPU's tiles), sliding with image blocks and global; whole key spans
    # and split ones (with their merge).
    qpos = torch.arange(40).expand(1, 40)
    for (head_dim, window), splits in itertools.product(((256, 16), (512, None)), (1, 2)):
        q, kv = rand(1, 4, 40, head_dim), rand(1, 2, 40, head_dim)
        blocks = torch.zeros(1, 40, dtype=torch.int64) if window else None
        prefill_attention.prefill_attention(q, kv, kv, qpos, qpos >= 0, qpos, window, blocks, blocks,
                                            tiles=prefill_attention._tiles(head_dim, 2, torch.device("cuda")),
                                            num_splits=splits)
    print("\n".join(compiled))
    print(f"{len(compiled)} launches compiled for sm_90")


if __name__ == "__main__":
    sys.exit(main())
