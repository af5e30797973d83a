"""The MoE router (`Router.forward`) around its projection, as two kernels: the input scaling and the routing.

  router_input: round(round(round(rms_norm(x)) * scale) * root_size)          the projection's input, model dtype
  route:        softmax in fp32, top-k, renormalize, times per_expert_scale   fp32 weights, int64 experts

At batch 1 the routing runs in the projection's GEMV kernel instead (`project_and_route`).

Each replaces a chain of small eager ops (a decode step at batch 1 is launch-bound) and reproduces their rounding:
fp32 math, and a rounding to the model dtype wherever the eager code materializes a tensor of that dtype. Grids and
sizes come from tensor shapes only, and nothing is read back to the host: both are CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .counters import finished_counters
from .gemv import NORMED_MAX_K, _default_tiles, _dots, _first_tiles, _input_row, _tiles, _weight_args
from .norm import _norm_weight, _residual_norms_values, _router_scaled, _rows, _store, _unit_rms, rms_norm
from .pdl import after_previous_kernel, launch_options
from ..model.quantized import QuantizedWeight


@triton.jit
def _expert_scales(pes_ptr, offs, mask):
    """per_expert_scale as fp32 [BLOCK], loaded before the PDL wait (no kernel writes it): gathered after the top-k
    instead, its load was a memory latency on every MoE layer's critical path."""
    return tl.load(pes_ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _route_row(s, offs, mask, scales, weights_ptr, experts_ptr, row, TOP_K: tl.constexpr, BLOCK: tl.constexpr,
               K_BLOCK: tl.constexpr):
    """Routes one row of fp32 scores s [BLOCK] (padding lanes -inf): its TOP_K weights and experts stored at `row`,
    the weights times the chosen experts' `scales` (`_expert_scales`)."""
    # softmax(dtype=float32): exp(s - max) / sum, as CUDA's softmax epilogue divides (the CPU multiplies by the
    # reciprocal: an ulp apart at most). Padding lanes hold -inf: exp gives 0, they add nothing to the sum.
    e = tl.exp(s - tl.max(s, axis=0))
    probs = e / tl.sum(e, axis=0)
    # torch.topk on the probabilities, largest first, by repeated argmax. Equal probabilities go lowest index first
    # (torch leaves that order unspecified). Padding lanes (-1.0) and taken lanes get negative keys, below any
    # probability's, so TOP_K distinct experts of [0, E) come out. A NaN or +inf score makes every probability NaN:
    # NaN counts as the largest value (as in torch.topk), here as +inf, and the weights come out NaN (inf / inf) as
    # torch's do.
    cand = tl.where(mask, tl.where(probs != probs, float("inf"), probs), -1.0)
    # One reduction a round: each lane's key is its value's bits (non-negative floats order as their bits do, and
    # -1.0's are negative) above BLOCK - 1 - its index, so that the largest key is the largest value at the lowest
    # index; the value and the index come back out of the key.
    key = (cand.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK - 1 - offs).to(tl.int64)
    k_offs = tl.arange(0, K_BLOCK)
    top = tl.zeros([K_BLOCK], dtype=tl.float32)
    idx = tl.zeros([K_BLOCK], dtype=tl.int32)
    for j in range(TOP_K):  # a loop of static trip count: static_range would unroll up to 256 iterations
        best = tl.max(key, axis=0)
        i = BLOCK - 1 - (best & 0xFFFFFFFF).to(tl.int32)
        top = tl.where(k_offs == j, (best >> 32).to(tl.int32).to(tl.float32, bitcast=True), top)
        idx = tl.where(k_offs == j, i, idx)
        key = tl.where(offs == i, -(2**62), key)
    k_mask = k_offs < TOP_K
    top = top / tl.sum(top, axis=0)  # lanes past TOP_K are 0: the sum is over the k chosen
    # fp32 weights times the chosen experts' model-dtype scales (picked from registers: one lane of each row of the
    # [K_BLOCK, BLOCK] selection is the scale, the others 0): fp32 products, no rounding to the dtype.
    scale = tl.sum(tl.where(offs[None, :] == idx[:, None], scales[None, :], 0.0), axis=1)
    tl.store(weights_ptr + row * TOP_K + k_offs, top * scale, mask=k_mask)
    tl.store(experts_ptr + row * TOP_K + k_offs, idx.to(tl.int64), mask=k_mask)


@triton.jit
def _route_kernel(scores_ptr, pes_ptr, weights_ptr, experts_ptr, scores_stride, E,
                  TOP_K: tl.constexpr, BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < E
    scales = _expert_scales(pes_ptr, offs, mask)
    after_previous_kernel(PDL)
    s = tl.load(scores_ptr + row * scores_stride + offs, mask=mask, other=float("-inf")).to(tl.float32)
    _route_row(s, offs, mask, scales, weights_ptr, experts_ptr, row, TOP_K, BLOCK, K_BLOCK)


@triton.jit
def _attention_tail_input(y_ptr, res_ptr, nw_ptr, experts_w_ptr, router_scale_ptr, experts_out_ptr, eps, root_size,
                          K: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """norm.py's residual_moe_norms of the attention's product y, computed by every program from the whole row (the
    routing GEMV's deferred input): the router's input as fp32 [1, BLOCK_K]; program 0 also stores the experts'
    input. The norm weights are loaded before the PDL wait."""
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    w = _norm_weight(nw_ptr, cols, mask, True)
    experts_w = _norm_weight(experts_w_ptr, cols, mask, True)
    router_scale = _norm_weight(router_scale_ptr, cols, mask, True)
    after_previous_kernel(PDL)
    dtype = experts_out_ptr.dtype.element_ty
    y = tl.load(y_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(res_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    new, _ = _residual_norms_values(y, residual, w, 1.0, 1.0, K, eps, eps, dtype, True, False, False)
    if tl.program_id(0) == 0:
        _store(experts_out_ptr + cols, _unit_rms(new, K, eps) * experts_w, mask)
    return _router_scaled(new, router_scale, K, eps, root_size, dtype)[None, :]


@triton.jit
def _project_and_route_kernel(x_ptr, w_ptr, scale_ptr, scores_ptr, counter_ptr, pes_ptr, weights_ptr, experts_ptr,
                              res_ptr, nw_ptr, experts_w_ptr, router_scale_ptr, experts_out_ptr, eps, root_size,
                              E, stride_wn, stride_sn, stride_sk, K: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
                              SCALE_ROWS: tl.constexpr, TOP_K: tl.constexpr, BLOCK: tl.constexpr,
                              K_BLOCK: tl.constexpr, TAIL: tl.constexpr, PDL: tl.constexpr):
    """gemv.py's GEMV of one row into scores (model dtype), of x or, with TAIL, of the input that
    `_attention_tail_input` computes from the attention's product at x_ptr; the last program to finish routes the
    whole row: its acquire (acq_rel counter) pairs with every other program's release, so their score stores are
    visible to it, read past L1; it then re-arms the counter for the next launch."""
    offs = tl.arange(0, BLOCK)
    mask = offs < E
    scales = _expert_scales(pes_ptr, offs, mask)  # before the PDL wait
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w, _, w_scale, _ = _first_tiles(w_ptr, scale_ptr, rows, E, stride_wn, stride_sn, stride_sk, 0, K, BLOCK_K, False,
                                    WFMT, GROUP, SCALE_ROWS)
    if TAIL:
        x = _attention_tail_input(x_ptr, res_ptr, nw_ptr, experts_w_ptr, router_scale_ptr, experts_out_ptr, eps,
                                  root_size, K, BLOCK_K, PDL)
    else:
        x = _input_row(x_ptr, x_ptr, x_ptr, x_ptr, x_ptr, x_ptr, 1.0, 1.0, K, BLOCK_K, False, False, False, PDL)
    y, _ = _dots(w, w, w_scale, w_scale, x, x_ptr, w_ptr, scale_ptr, rows, E, stride_wn, stride_sn, stride_sk, 0, K,
                 BLOCK_K, False, WFMT, GROUP, SCALE_ROWS)
    tl.store(scores_ptr + rows, y.to(scores_ptr.dtype.element_ty), mask=rows < E)
    finished = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if finished == tl.num_programs(0) - 1:
        s = tl.load(scores_ptr + offs, mask=mask, other=float("-inf"), cache_modifier=".cg").to(tl.float32)
        _route_row(s, offs, mask, scales, weights_ptr, experts_ptr, 0, TOP_K, BLOCK, K_BLOCK)
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed")


def router_input(x: torch.Tensor, scale: torch.Tensor, root_size: float, eps: float) -> torch.Tensor:
    """RMSNorm(with_scale=False)(x) * scale * root_size, as Router.forward computes it in x's dtype: x [T, H] (any
    leading dims), scale [H] -> same shape and dtype as x. The kernel is norm.py's."""
    return rms_norm(x, scale, eps, root_size)


def _routed(scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (weights, experts) outputs of routing `scores` [..., E]."""
    E = scores.shape[-1]
    assert 1 <= top_k <= E <= 256, f"top_k={top_k} of {E} experts: need 1 <= top_k <= experts <= 256"
    return (torch.empty(*scores.shape[:-1], top_k, dtype=torch.float32, device=scores.device),
            torch.empty(*scores.shape[:-1], top_k, dtype=torch.int64, device=scores.device))


def route(scores: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rest of Router.forward on the projection's output scores [T, E] (E <= 256): probs = scores.softmax(-1,
    dtype=float32); weights, experts = probs.topk(top_k); weights /= weights.sum(-1);
    returns (weights * per_expert_scale[experts] as fp32 [T, k], experts as int64 [T, k]), experts in descending
    order of probability, equal probabilities lowest index first."""
    E = scores.shape[-1]
    weights, experts = _routed(scores, top_k)
    rows = _rows(scores)
    if weights.numel() > 0:
        _route_kernel[(rows.shape[0],)](rows, per_expert_scale, weights, experts, rows.stride(0), E, TOP_K=top_k,
                                        BLOCK=triton.next_power_of_2(E), K_BLOCK=triton.next_power_of_2(top_k),
                                        num_warps=1, **launch_options(weights))
    return weights, experts


def project_and_route(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, per_expert_scale: torch.Tensor,
                      top_k: int, attention_tail: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """route(gemv(x, weight), per_expert_scale, top_k) for one row x [1, H] in one launch: the GEMV's last program to
    finish routes (decode at batch 1: the route kernel's launch saved). weight [E, H] as gemv.py's `gemv` takes it.

    attention_tail = (residual, norm_weight, eps, experts_weight, router_scale, root_size, experts_out): x is the
    attention's product, not yet added, and the input routed is the router's of residual_moe_norms(residual, x,
    norm_weight, eps, _, experts_weight, router_scale, root_size), which every program computes itself (H <=
    NORMED_MAX_K); the experts' input of it is written into experts_out. This saves the norms' own launch on the path
    from the attention to the experts."""
    assert x.numel() == x.shape[-1] == weight.shape[1], (x.shape, weight.shape)
    values, scale, stride_sn, stride_sk, fmt = _weight_args(weight)
    n_out, k_in = weight.shape
    scores = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)
    weights, experts = _routed(scores, top_k)
    tail = attention_tail is not None
    if tail:
        residual, norm_weight, eps, experts_weight, router_scale, root_size, experts_out = attention_tail
        assert k_in <= NORMED_MAX_K and residual.numel() == experts_out.numel() == k_in and experts_out.is_contiguous()
        tail_args = (residual.contiguous(), norm_weight, experts_weight, router_scale, experts_out, eps, root_size)
    else:
        tail_args = (x, x, x, x, x, 1e-6, 1.0)  # unread
    tiles = _default_tiles(x.device, k_in, normed=tail, wfmt=fmt["WFMT"])
    block_n, block_k, warps, stages, _ = _tiles(x, k_in, tiles, normed=tail, group=fmt["GROUP"])
    _project_and_route_kernel[(triton.cdiv(n_out, block_n),)](
        x.contiguous(), values, scale, scores, finished_counters("project_and_route", x.device), per_expert_scale,
        weights, experts, *tail_args, n_out, values.stride(0), stride_sn, stride_sk, K=k_in, BLOCK_N=block_n,
        BLOCK_K=block_k, **fmt, TOP_K=top_k, BLOCK=triton.next_power_of_2(n_out),
        K_BLOCK=triton.next_power_of_2(top_k), TAIL=tail, num_warps=warps, num_stages=stages, **launch_options(x))
    return weights, experts
