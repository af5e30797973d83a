"""Matrix-vector products of decode steps at batch 1: out[n] = sum_k x[k] * weight[n, k], alone (`gemv`), with the
gated activation (`gemv_gated`) or with the residual norms that follow a projection (`gemv_residual_norms`).

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
from .norm import _residual_norms_row, _warps, residual_norm_args, residual_outputs
from .pdl import after_previous_kernel, launch_options
from .rounding import round_to

# (BLOCK_N, BLOCK_K, warps, stages): the best of benchmarks/gemv.py's sweep on an H100 for most projections of
# E2B and 26B-A4B (weights read from memory, not L2).
TILES = (4, 2048, 8, 3)


@triton.jit
def _dot_rows(x_ptr, w_rows, row_ok, up_offset, K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_UP: tl.constexpr, PDL: tl.constexpr):
    """fp32 dot products of x [K] with the weight rows at w_rows [BLOCK_N] (pointers to their first element) and,
    if HAS_UP, with the rows up_offset elements further (the up half of a fused gate/up weight): (gate, up), with
    up = gate without HAS_UP. The first BLOCK_K columns of the weights are loaded before waiting for the previous
    kernel (PDL): x is its output, the weights are no kernel's."""
    cols = tl.arange(0, BLOCK_K)
    mask = row_ok[:, None] & (cols < K)[None, :]
    w = tl.load(w_rows[:, None] + cols[None, :], mask=mask, other=0.0)
    if HAS_UP:
        u = tl.load(w_rows[:, None] + up_offset + cols[None, :], mask=mask, other=0.0)
    after_previous_kernel(PDL)
    x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
    acc = w.to(tl.float32) * x  # per-lane partial sums [BLOCK_N, BLOCK_K]: one reduction at the end
    if HAS_UP:
        acc_up = u.to(tl.float32) * x
    for k0 in range(BLOCK_K, K, BLOCK_K):
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
# interpreter also needs.
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, N, stride_wn, K: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    out, _ = _dot_rows(x_ptr, w_ptr + rows.to(tl.int64) * stride_wn, row_ok, 0, K, BLOCK_K, BLOCK_N, False, PDL)
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _gemv_gated_kernel(x_ptr, w_ptr, mult_ptr, out_ptr, W, stride_wn, K: tl.constexpr, ACT: tl.constexpr,
                       HAS_UP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < W
    dtype = out_ptr.dtype.element_ty
    w_rows = w_ptr + rows.to(tl.int64) * stride_wn
    # Rounded as the eager ops: the product(s), act(gate), and act(gate) * up each a tensor of the model dtype.
    # With HAS_UP, up is row W + i of the same weight.
    gate, up = _dot_rows(x_ptr, w_rows, row_ok, W * stride_wn, K, BLOCK_K, BLOCK_N, HAS_UP, PDL)
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
    y, _ = _dot_rows(x_ptr, w_ptr + rows.to(tl.int64) * stride_wn, row_ok, 0, K, BLOCK_K, BLOCK_N, False, PDL)
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


def _tiles(x: torch.Tensor, k_in: int, tiles):
    block_n, block_k, warps, stages = tiles or TILES
    if not x.is_cuda:  # the interpreter runs programs one by one; a row's arithmetic depends on BLOCK_K alone
        block_n = 64
    return block_n, min(block_k, triton.next_power_of_2(k_in)), warps, stages


def gemv(x: torch.Tensor, weight: torch.Tensor, tiles: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """F.linear(x, weight) for x [..., K] holding one row; weight [N, K] with unit stride along K."""
    assert weight.stride(-1) == 1 and x.shape[-1] == weight.shape[1] and x.numel() == x.shape[-1]
    n_out, k_in = weight.shape
    block_n, block_k, warps, stages = _tiles(x, k_in, tiles)
    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n_out, block_n),)](x, weight, out, n_out, weight.stride(0), k_in, BLOCK_N=block_n,
                                                 BLOCK_K=block_k, num_warps=warps, num_stages=stages,
                                                 **launch_options(x))
    return out


def gemv_gated(x: torch.Tensor, weight: torch.Tensor, activation: str,
               multiplier: torch.Tensor | None = None) -> torch.Tensor:
    """`gated(gate, up, activation)` of one row x [..., K], in one kernel with the product:
    multiplier None: [gate; up] = F.linear(x, weight), weight [2W, K] (a fused gate/up projection);
    else gate = F.linear(x, weight), weight [W, K], and up = multiplier [..., W]. Returns [..., W]."""
    try:
        act = ACTIVATION_CODES[activation]
    except KeyError:
        raise ValueError(f"unsupported activation {activation!r}; expected one of {sorted(ACTIVATION_CODES)}") from None
    assert weight.stride(-1) == 1 and x.shape[-1] == weight.shape[1] and x.numel() == x.shape[-1]
    width = weight.shape[0] // 2 if multiplier is None else weight.shape[0]
    assert multiplier is None or multiplier.numel() == width
    block_n, block_k, warps, stages = _tiles(x, weight.shape[1], None)
    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device)
    _gemv_gated_kernel[(triton.cdiv(width, block_n),)](
        x, weight, multiplier.contiguous() if multiplier is not None else x, out, width, weight.stride(0),
        weight.shape[1], ACT=act, HAS_UP=multiplier is None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        num_stages=stages, **launch_options(x))
    return out


_counters: dict[torch.device, torch.Tensor] = {}


def _counter(device: torch.device) -> torch.Tensor:
    """The finished-programs counter of _gemv_residual_norms_kernel: zero between launches (each launch's last
    program resets it), so one per device serves every launch of a stream. Made by an eager call: inside a CUDA-graph
    capture its zeroing would only be recorded (capture_graph warms every step up eagerly first)."""
    if device not in _counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("gemv_residual_norms must run once outside CUDA-graph capture first")
        _counters[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _counters[device]


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
        x.contiguous(), weight, y, _counter(x.device), residual,
        *residual_norm_args(y, outputs, norm_weight, scalar, next_weight, moe), n_out, weight.stride(0), eps,
        eps if next_eps is None else next_eps, float(moe[2]) if moe is not None else 1.0, k_in, BLOCK_N=block_n,
        BLOCK_K=block_k, HAS_WEIGHT=norm_weight is not None, HAS_SCALAR=scalar is not None,
        HAS_NEXT=next_weight is not None, HAS_MOE=moe is not None, BLOCK=block,
        num_warps=max(warps, _warps(block)), num_stages=stages, **launch_options(x))
    return outputs
