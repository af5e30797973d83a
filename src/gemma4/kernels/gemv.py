"""Matrix-vector products of decode steps at batch 1: out[n] = sum_k x[k] * weight[n, k], alone (`gemv`), with the
gated activation (`gemv_gated`) or with the residual norms that follow a projection (`gemv_residual_norms`). The
first two can also take their input as the residual norms of an earlier product, not yet applied (`norms`): each of
their programs normalizes the row itself, where `gemv_residual_norms` makes all but its last program wait.

cuBLAS picks tiles for matrix products; for one activation row it often splits K and adds a reduce kernel, or runs
tiles too few to fill the GPU, and its small products (under ~8 MB of weights) take 4-6 us where the bandwidth
floor is 1-3 us. Here each program streams BLOCK_N whole weight rows in BLOCK_K steps (16-byte loads along the
contiguous K axis) and keeps their dot products in fp32 registers: no second kernel, one rounding at the end,
as cuBLAS rounds its fp32 accumulator. Where cuBLAS is still faster (big 31B matrices) the model does not call these
(`model.text.takes_gemv`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activation import ACTIVATION_CODES, activation_fp32
from .norm import (_norm_weights, _residual_norms_row, _residual_norms_values, _warps, residual_norm_args,
                   residual_outputs)
from .pdl import after_previous_kernel, launch_options
from .rounding import round_to

# (BLOCK_N, BLOCK_K, warps, stages): the best of benchmarks/gemv.py's sweep on an H100 for most projections of
# E2B and 26B-A4B (weights read from memory, not L2).
TILES = (4, 2048, 8, 3)


@triton.jit
def _input_row(x_ptr, res_ptr, new_ptr, norm_weights, eps, next_eps, K: tl.constexpr, BLOCK_K: tl.constexpr,
               NORMED: tl.constexpr, HAS_SCALAR: tl.constexpr, HAS_NEXT: tl.constexpr):
    """The first BLOCK_K inputs as fp32 [1, BLOCK_K]. With NORMED, x_ptr holds an earlier product y and the input is
    residual_rms_norm(res, y, nw, eps, scalar, next_w, next_eps)'s second result (its first without HAS_NEXT; the
    weights are `norm_weights`, from _norm_weights), which this program computes from the whole row (K <= BLOCK_K);
    program 0 also stores the first, the residual stream, at new_ptr. Every program repeats the norms (a few KB
    from L2) so that no program waits for another's output."""
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if NORMED:
        dtype = new_ptr.dtype.element_ty
        residual = tl.load(res_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        w, scalar, next_w = norm_weights
        new, x = _residual_norms_values(x, residual, w, scalar, next_w, K, eps, next_eps, dtype, True, HAS_SCALAR,
                                        HAS_NEXT)
        x = round_to(x, dtype)
        if tl.program_id(0) == 0:
            tl.store(new_ptr + cols, new.to(dtype), mask=mask)
    return x[None, :]


@triton.jit
def _dot_rows(x_ptr, w_rows, row_ok, up_offset, res_ptr, nw_ptr, scalar_ptr, next_w_ptr, new_ptr, eps, next_eps,
              K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, HAS_UP: tl.constexpr,
              NORMED: tl.constexpr, HAS_SCALAR: tl.constexpr, HAS_NEXT: tl.constexpr, PDL: tl.constexpr):
    """fp32 dot products of the input row (see _input_row) with the weight rows at w_rows [BLOCK_N] (pointers to
    their first element) and, if HAS_UP, with the rows up_offset elements further (the up half of a fused gate/up
    weight): (gate, up), with up = gate without HAS_UP. The first BLOCK_K columns of the weights (and the norm
    weights) are loaded before waiting for the previous kernel (PDL): the input is its output, weights are no
    kernel's."""
    cols = tl.arange(0, BLOCK_K)
    mask = row_ok[:, None] & (cols < K)[None, :]
    w = tl.load(w_rows[:, None] + cols[None, :], mask=mask, other=0.0)
    if HAS_UP:
        u = tl.load(w_rows[:, None] + up_offset + cols[None, :], mask=mask, other=0.0)
    norm_weights = (1.0, 1.0, 1.0)
    if NORMED:
        norm_weights = _norm_weights(nw_ptr, scalar_ptr, next_w_ptr, cols, cols < K, True, HAS_SCALAR, HAS_NEXT)
    after_previous_kernel(PDL)
    x = _input_row(x_ptr, res_ptr, new_ptr, norm_weights, eps, next_eps, K, BLOCK_K, NORMED, HAS_SCALAR, HAS_NEXT)
    acc = w.to(tl.float32) * x  # per-lane partial sums [BLOCK_N, BLOCK_K]: one reduction at the end
    if HAS_UP:
        acc_up = u.to(tl.float32) * x
    for k0 in range(BLOCK_K, K, BLOCK_K):  # never with NORMED (K <= BLOCK_K)
        cols = k0 + tl.arange(0, BLOCK_K)
        if K % BLOCK_K == 0:
            step_mask = row_ok[:, None]
        else:
            step_mask = row_ok[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
        acc += tl.load(w_rows[:, None] + cols[None, :], mask=step_mask, other=0.0).to(tl.float32) * x
        if HAS_UP:
            u = tl.load(w_rows[:, None] + up_offset + cols[None, :], mask=step_mask, other=0.0)
            acc_up += u.to(tl.float32) * x
    gate = tl.sum(acc, axis=1)
    up = gate
    if HAS_UP:
        up = tl.sum(acc_up, axis=1)
    return gate, up


# K is a compile-time constant in both kernels (one compilation per weight shape): a static trip count, which the
# interpreter also needs. The arguments from res_ptr to HAS_NEXT are _input_row's (NORMED: the input is the residual
# norms of an earlier product).
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, N, stride_wn, res_ptr, nw_ptr, scalar_ptr, next_w_ptr, new_ptr, eps,
                 next_eps, K: tl.constexpr, NORMED: tl.constexpr, HAS_SCALAR: tl.constexpr, HAS_NEXT: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    out, _ = _dot_rows(x_ptr, w_ptr + rows.to(tl.int64) * stride_wn, row_ok, 0, res_ptr, nw_ptr, scalar_ptr,
                       next_w_ptr, new_ptr, eps, next_eps, K, BLOCK_K, BLOCK_N, False, NORMED, HAS_SCALAR, HAS_NEXT,
                       PDL)
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _gemv_gated_kernel(x_ptr, w_ptr, mult_ptr, out_ptr, W, stride_wn, res_ptr, nw_ptr, scalar_ptr, next_w_ptr,
                       new_ptr, eps, next_eps, K: tl.constexpr, ACT: tl.constexpr, HAS_UP: tl.constexpr,
                       NORMED: tl.constexpr, HAS_SCALAR: tl.constexpr, HAS_NEXT: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < W
    dtype = out_ptr.dtype.element_ty
    w_rows = w_ptr + rows.to(tl.int64) * stride_wn
    # Rounded as the eager ops: the product(s), act(gate), and act(gate) * up each a tensor of the model dtype.
    # With HAS_UP, up is row W + i of the same weight.
    gate, up = _dot_rows(x_ptr, w_rows, row_ok, W * stride_wn, res_ptr, nw_ptr, scalar_ptr, next_w_ptr, new_ptr, eps,
                         next_eps, K, BLOCK_K, BLOCK_N, HAS_UP, NORMED, HAS_SCALAR, HAS_NEXT, PDL)
    gate = round_to(gate, dtype)
    if HAS_UP:
        up = round_to(up, dtype)
    else:
        up = tl.load(mult_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    act = round_to(activation_fp32(gate, ACT), dtype)
    tl.store(out_ptr + rows, round_to(act * up, dtype).to(dtype), mask=row_ok)


@triton.jit
def _gemv_residual_norms_kernel(x_ptr, w_ptr, y_ptr, counter_ptr, res_ptr, nw_ptr, scalar_ptr, next_w_ptr, out_ptr,
                                next_out_ptr, next2_w_ptr, next2_out_ptr, router_scale_ptr, router_out_ptr, N,
                                stride_wn, eps, next_eps, root_size, K: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SCALAR: tl.constexpr,
                                HAS_NEXT: tl.constexpr, HAS_MOE: tl.constexpr, BLOCK: tl.constexpr,
                                PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y, _ = _dot_rows(x_ptr, w_ptr + rows.to(tl.int64) * stride_wn, row_ok, 0, x_ptr, x_ptr, x_ptr, x_ptr, y_ptr, eps,
                     eps, K, BLOCK_K, BLOCK_N, False, False, False, False, PDL)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)
    # The norms need the whole output row: the last program to finish computes them. Its acquire pairs with every
    # other program's release (acq_rel atomics), so their y stores are visible to it. It then re-arms the counter
    # for the next launch (CUDA-graph replays included).
    finished = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if finished == tl.num_programs(0) - 1:
        _residual_norms_row(res_ptr, y_ptr, nw_ptr, scalar_ptr, next_w_ptr, out_ptr, next_out_ptr, next2_w_ptr,
                            next2_out_ptr, router_scale_ptr, router_out_ptr, N, eps, next_eps, root_size, HAS_WEIGHT,
                            HAS_SCALAR, HAS_NEXT, HAS_MOE, BLOCK)
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed")


# Widest input row a GEMV normalizes itself (`norms`): it holds the row in one tile of registers.
NORMED_MAX_K = 4096
# Tiles of a GEMV that normalizes its input (its one BLOCK_K step as wide as the row), plain and gated: the best of
# `benchmarks/gemv.py --deferred` on an H200 for the readers of E2B's and E4B's residual norms (E4B's gate/up
# 20480x2560: 37.1 us against 44.4 with TILES).
NORMED_TILES = {False: (8, NORMED_MAX_K, 4, 3), True: (4, NORMED_MAX_K, 4, 3)}


# Rows of 2049-4096 inputs (E4B, 26B-A4B) in one BLOCK_K step, where TILES take two (the second mostly masked), and
# 4 warps, each thread with 128 weights in flight: the tiles that won most of these shapes in `benchmarks/gemv.py
# --tiles ...` on an H200 (E4B's LM head 361 -> 294 us, its 6144x2560 10.0 -> 9.2; with every shape at its best of
# 7 tiles, E4B's projections take 2822 -> 2513 us per step, 26B-A4B's 1467 -> 1354).
WIDE_TILES = (4, 4096, 4, 3)


def _tiles(x: torch.Tensor, k_in: int, tiles, normed: bool = False, gated: bool = False):
    default = NORMED_TILES[gated] if normed else WIDE_TILES if 2048 < k_in <= 4096 else TILES
    block_n, block_k, warps, stages = tiles or default
    if not x.is_cuda:  # the interpreter runs programs one by one; a row's arithmetic depends on BLOCK_K alone
        block_n = 64
    if normed:
        assert k_in <= NORMED_MAX_K, f"a GEMV normalizes rows of up to {NORMED_MAX_K} inputs, not {k_in}"
        block_k = triton.next_power_of_2(k_in)
    return block_n, min(block_k, triton.next_power_of_2(k_in)), warps, stages


def _input_args(x: torch.Tensor, norms: tuple | None) -> tuple[tuple, dict]:
    """(pointer/scalar arguments, constexprs) of _input_row for a GEMV's input: x itself, or with
    norms = (residual, norm_weight, eps, scalar, next_weight, next_eps, new) the residual norms of the product x."""
    if norms is None:
        return (x, x, x, x, x, 1e-6, 1e-6), dict(NORMED=False, HAS_SCALAR=False, HAS_NEXT=False)
    residual, norm_weight, eps, scalar, next_weight, next_eps, new = norms
    assert residual.numel() == new.numel() == x.numel() and new.is_contiguous()
    args = (residual.contiguous(), norm_weight, scalar if scalar is not None else x,
            next_weight if next_weight is not None else x, new, eps, eps if next_eps is None else next_eps)
    return args, dict(NORMED=True, HAS_SCALAR=scalar is not None, HAS_NEXT=next_weight is not None)


def gemv(x: torch.Tensor, weight: torch.Tensor, tiles: tuple[int, int, int, int] | None = None,
         norms: tuple | None = None) -> torch.Tensor:
    """F.linear(x, weight) for x [..., K] holding one row; weight [N, K] with unit stride along K.

    norms = (residual, norm_weight, eps, scalar, next_weight, next_eps, new): the input is not x but
    residual_rms_norm(residual, x, norm_weight, eps, scalar, next_weight, next_eps)'s normed row (new itself without
    next_weight), computed by every program from x; the new residual stream is written into `new`. K <= NORMED_MAX_K."""
    assert weight.stride(-1) == 1 and x.shape[-1] == weight.shape[1] and x.numel() == x.shape[-1]
    n_out, k_in = weight.shape
    block_n, block_k, warps, stages = _tiles(x, k_in, tiles, normed=norms is not None)
    x = x.contiguous()
    input_args, input_flags = _input_args(x, norms)
    out = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n_out, block_n),)](x, weight, out, n_out, weight.stride(0), *input_args, k_in,
                                                 **input_flags, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                                                 num_stages=stages, **launch_options(x))
    return out


def gemv_gated(x: torch.Tensor, weight: torch.Tensor, activation: str, multiplier: torch.Tensor | None = None,
               norms: tuple | None = None, tiles: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """`gated(gate, up, activation)` of one row x [..., K], in one kernel with the product:
    multiplier None: [gate; up] = F.linear(x, weight), weight [2W, K] (a fused gate/up projection);
    else gate = F.linear(x, weight), weight [W, K], and up = multiplier [..., W]. Returns [..., W].
    norms: the input is residual norms of the product x, as in `gemv`."""
    try:
        act = ACTIVATION_CODES[activation]
    except KeyError:
        raise ValueError(f"unsupported activation {activation!r}; expected one of {sorted(ACTIVATION_CODES)}") from None
    assert weight.stride(-1) == 1 and x.shape[-1] == weight.shape[1] and x.numel() == x.shape[-1]
    width = weight.shape[0] // 2 if multiplier is None else weight.shape[0]
    assert multiplier is None or multiplier.numel() == width
    block_n, block_k, warps, stages = _tiles(x, weight.shape[1], tiles, normed=norms is not None, gated=True)
    x = x.contiguous()
    input_args, input_flags = _input_args(x, norms)
    out = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device)
    _gemv_gated_kernel[(triton.cdiv(width, block_n),)](
        x, weight, multiplier.contiguous() if multiplier is not None else x, out, width, weight.stride(0),
        *input_args, weight.shape[1], ACT=act, HAS_UP=multiplier is None, **input_flags, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=warps, num_stages=stages, **launch_options(x))
    return out


_counters: dict[tuple[str, torch.device], torch.Tensor] = {}


def finished_counters(owner: str, device: torch.device, size: int = 1) -> torch.Tensor:
    """`size` finished-programs counters (int32) of one kernel (`owner`) whose last program to finish does the rest
    of the work: zero between launches (each launch's last program resets its own), so one set per device serves
    every launch of a stream. Made (and grown) by eager calls: inside a CUDA-graph capture their zeroing would only
    be recorded (capture_graph warms every step up eagerly first)."""
    key = (owner, device)
    if key not in _counters or _counters[key].numel() < size:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{owner} must run once outside CUDA-graph capture first (its counters)")
        _counters[key] = torch.zeros(size, dtype=torch.int32, device=device)
    return _counters[key][:size]


def gemv_residual_norms(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                        eps: float, scalar: torch.Tensor | None = None, next_weight: torch.Tensor | None = None,
                        next_eps: float | None = None, moe: tuple | None = None,
                        tiles: tuple[int, int, int, int] | None = None) -> tuple:
    """residual_rms_norm(residual, gemv(x, weight), norm_weight, eps, scalar, next_weight, next_eps), or with
    moe = (experts_weight, router_scale, root_size) residual_moe_norms's four outputs, in one kernel: the GEMV's last
    program to finish applies the norms to the whole product. One row (x [..., K], residual [..., N]).
    Returns (new, next norm or None, experts' norm or None, router input or None)."""
    assert weight.stride(-1) == 1 and x.shape[-1] == weight.shape[1] and x.numel() == x.shape[-1]
    n_out, k_in = weight.shape
    assert residual.numel() == n_out and residual.stride(-1) == 1
    block_n, block_k, warps, stages = _tiles(x, k_in, tiles)
    outputs = residual_outputs(residual, next_weight, moe)
    y = torch.empty(n_out, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(n_out)
    _gemv_residual_norms_kernel[(triton.cdiv(n_out, block_n),)](
        x.contiguous(), weight, y, finished_counters("gemv_residual_norms", x.device), residual,
        *residual_norm_args(y, outputs, norm_weight, scalar, next_weight, moe), n_out, weight.stride(0), eps,
        eps if next_eps is None else next_eps, float(moe[2]) if moe is not None else 1.0, k_in, BLOCK_N=block_n,
        BLOCK_K=block_k, HAS_WEIGHT=norm_weight is not None, HAS_SCALAR=scalar is not None,
        HAS_NEXT=next_weight is not None, HAS_MOE=moe is not None, BLOCK=block,
        num_warps=max(warps, _warps(block)), num_stages=stages, **launch_options(x))
    return outputs
