"""Fused RMSNorm kernels: plain, residual add (+ layer scalar, + the next layer's input norm), and q/k/v norm + RoPE.

Each reproduces the rounding of its eager PyTorch twin (`RMSNorm.forward`, `apply_rope`, the residual adds of
`DecoderLayer.forward`): statistics and products in fp32, and a rounding to the model dtype wherever the eager code
materializes a tensor. bf16 results therefore equal the reference except where the different fp32 summation order of
mean(x^2) moves a value across a bf16 rounding boundary (rare, one ulp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import after_previous_kernel, launch_options, next_kernel_then_wait
from .rounding import round_to, store_fp8


@triton.jit
def _store(ptrs, x, mask):
    dtype = ptrs.dtype.element_ty
    tl.store(ptrs, round_to(x, dtype).to(dtype), mask=mask)  # the value is exact in dtype: the cast cannot round


@triton.jit
def _rstd(sum_sq, D, eps):
    # (mean(h^2) + eps)^-0.5 with a correctly rounded sqrt, as torch's pow(-0.5) on the CPU.
    return 1.0 / tl.sqrt_rn(sum_sq / D + eps)


@triton.jit
def _unit_rms(h, D, eps):
    # An fp32 row divided by its RMS (RMSNorm.forward before its weight).
    return h * _rstd(tl.sum(h * h, axis=0), D, eps)


@triton.jit
def _norm_weight(w_ptr, offs, mask, HAS_WEIGHT: tl.constexpr):
    """A norm's weight as fp32 values (1.0 without one). The norm kernels load their weights before their PDL wait:
    no kernel writes them, and a weight is rarely in L2 (a decode step reads GBs of them), so its load takes the
    memory's latency, which the previous kernel's tail then hides."""
    w = 1.0
    if HAS_WEIGHT:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return w


@triton.jit
def _router_scaled(h, scale, D, eps, root_size, dtype: tl.constexpr):
    """Router.forward's projection input from an fp32 row and the router's scale (fp32 values):
    round(round(round(rms_norm(h)) * scale) * root_size)."""
    normed = round_to(_unit_rms(h, D, eps), dtype)  # the weightless norm's tensor
    scaled = round_to(normed * scale, dtype)
    # A tensor times a python float: torch applies the scalar in fp32 (opmath), not rounded to the dtype first, and
    # rounds the product once. root_size arrives here as an fp32 argument, the same fp32 value.
    return round_to(scaled * root_size, dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, x_stride, D, eps, root_size, HAS_WEIGHT: tl.constexpr,
                     ROUTER: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """A row's RMSNorm, or with ROUTER the router's input (w_ptr: its scale)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    w = _norm_weight(w_ptr, offs, mask, HAS_WEIGHT or ROUTER)  # before the wait: see _norm_weight
    after_previous_kernel(PDL)
    h = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
    if ROUTER:
        _store(out_ptr + row * D + offs, _router_scaled(h, w, D, eps, root_size, out_ptr.dtype.element_ty), mask)
    else:
        _store(out_ptr + row * D + offs, _unit_rms(h, D, eps) * w, mask)


@triton.jit
def _norm_weights(w_ptr, scalar_ptr, next_w_ptr, offs, mask, HAS_WEIGHT: tl.constexpr, HAS_SCALAR: tl.constexpr,
                  HAS_NEXT: tl.constexpr):
    """The weights _residual_norms_values takes, as fp32 values (those a flag leaves out: 1.0)."""
    scalar = 1.0
    if HAS_SCALAR:
        scalar = tl.load(scalar_ptr).to(tl.float32)
    return _norm_weight(w_ptr, offs, mask, HAS_WEIGHT), scalar, _norm_weight(next_w_ptr, offs, mask, HAS_NEXT)


@triton.jit
def _added_norm(normed, residual, scalar, dtype: tl.constexpr, HAS_SCALAR: tl.constexpr):
    """The new residual stream from fp32 norm(h) (weighted) and residual: residual + norm, then * scalar, each
    rounded to `dtype` where the eager ops round."""
    new = round_to(residual + round_to(normed, dtype), dtype)
    if HAS_SCALAR:
        new = round_to(new * scalar, dtype)
    return new


@triton.jit
def _residual_norms_values(h, residual, w, scalar, next_w, D, eps, next_eps, dtype: tl.constexpr,
                           HAS_WEIGHT: tl.constexpr, HAS_SCALAR: tl.constexpr, HAS_NEXT: tl.constexpr):
    """(new, next) of residual_rms_norm from fp32 rows h (the product) and residual, and _norm_weights's values: new
    rounded to `dtype` where the eager ops round (the norm's output, the add, the scaling); next = rms_norm(new) *
    next_w, unrounded (new without HAS_NEXT)."""
    normed = _unit_rms(h, D, eps)
    if HAS_WEIGHT:
        normed = normed * w
    new = _added_norm(normed, residual, scalar, dtype, HAS_SCALAR)
    next_row = new
    if HAS_NEXT:
        next_row = _unit_rms(new, D, next_eps) * next_w
    return new, next_row


@triton.jit
def _residual_rms_norm_kernel(res_ptr, x_ptr, w_ptr, scalar_ptr, next_w_ptr, out_ptr, next_out_ptr,
                              next2_w_ptr, next2_out_ptr, router_scale_ptr, router_out_ptr,
                              res_stride, x_stride, D, eps, next_eps, root_size, HAS_WEIGHT: tl.constexpr,
                              HAS_SCALAR: tl.constexpr, HAS_NEXT: tl.constexpr, HAS_MOE: tl.constexpr,
                              BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One row of residual_rms_norm / residual_moe_norms a program."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    dtype = out_ptr.dtype.element_ty
    w, scalar, next_w = _norm_weights(w_ptr, scalar_ptr, next_w_ptr, offs, mask, HAS_WEIGHT, HAS_SCALAR, HAS_NEXT)
    experts_w = _norm_weight(next2_w_ptr, offs, mask, HAS_MOE)
    router_scale = _norm_weight(router_scale_ptr, offs, mask, HAS_MOE)
    after_previous_kernel(PDL)
    h = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(res_ptr + row * res_stride + offs, mask=mask, other=0.0).to(tl.float32)
    new, next_row = _residual_norms_values(h, residual, w, scalar, next_w, D, eps, next_eps, dtype, HAS_WEIGHT,
                                           HAS_SCALAR, HAS_NEXT)
    _store(out_ptr + row * D + offs, new, mask)
    if HAS_NEXT:
        _store(next_out_ptr + row * D + offs, next_row, mask)
    if HAS_MOE:  # the experts' input norm and the router's input, both from the same new row
        _store(next2_out_ptr + row * D + offs, _unit_rms(new, D, next_eps) * experts_w, mask)
        _store(router_out_ptr + row * D + offs, _router_scaled(new, router_scale, D, next_eps, root_size, dtype), mask)


@triton.jit
def _norm_rope_row(x_row, w1, w2, cos_row, sin_row, offs, mask, D, eps, dtype: tl.constexpr, HAS_ROPE: tl.constexpr,
                   HALF_BLOCK: tl.constexpr):
    """One head row as its two halves (the pairs (i, i + D/2) of rotate-half RoPE): RMSNorm (the weight's halves w1,
    w2: fp32 values, 1.0 for the weightless norm), then RoPE; values of `dtype`, kept in fp32."""
    half = D // 2
    x1 = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = _rstd(tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0), D, eps)
    n1, n2 = round_to(x1 * rstd * w1, dtype), round_to(x2 * rstd * w2, dtype)
    if HAS_ROPE:
        # apply_rope in the model dtype: x*cos + rotate_half(x)*sin, each product rounded, then the sum.
        c1 = tl.load(cos_row + offs, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_row + half + offs, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_row + offs, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_row + half + offs, mask=mask, other=0.0).to(tl.float32)
        n1, n2 = (round_to(n1 * c1, dtype) + round_to(-n2 * s1, dtype),
                  round_to(n2 * c2, dtype) + round_to(n1 * s2, dtype))
    return n1, n2


@triton.jit
def _qk_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, H, L, x_sb, x_sl, x_sh, c_sb, c_sl, D, eps,
                         HAS_WEIGHT: tl.constexpr, HAS_ROPE: tl.constexpr, HALF_BLOCK: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # one program per (b, l, h) row, h fastest
    head, pos, batch = pid % H, (pid // H) % L, pid // (H * L)
    offs = tl.arange(0, HALF_BLOCK)
    mask = offs < D // 2
    w1, w2 = _norm_weight(w_ptr, offs, mask, HAS_WEIGHT), _norm_weight(w_ptr + D // 2, offs, mask, HAS_WEIGHT)
    # a KV-shared layer's decode attention after this kernel (the query's norm) loads its older keys meanwhile
    next_kernel_then_wait(PDL)
    c_row = batch * c_sb + pos * c_sl
    n1, n2 = _norm_rope_row(x_ptr + batch * x_sb + pos * x_sl + head * x_sh, w1, w2, cos_ptr + c_row, sin_ptr + c_row,
                            offs, mask, D, eps, out_ptr.dtype.element_ty, HAS_ROPE, HALF_BLOCK)
    out_row = out_ptr + ((batch * H + head) * L + pos) * D  # [B, H, L, D], contiguous
    _store(out_row + offs, n1, mask)
    _store(out_row + D // 2 + offs, n2, mask)


@triton.jit
def _qkv_norm_rope_store_kernel(q_ptr, k_ptr, v_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, query_ptr, key_cache_ptr,
                                value_cache_ptr, slots_ptr, Hq, Hkv, L, q_sb, q_sl, k_sb, k_sl, v_sb, v_sl, c_sb, c_sl,
                                cache_sb, cache_sh, cache_ss, key_scale_ptr, value_scale_ptr, D, eps,
                                HALF_BLOCK: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # one program per (b, l, head) row over Hq query, Hkv key, Hkv value heads
    heads = Hq + 2 * Hkv
    head, pos, batch = pid % heads, (pid // heads) % L, pid // (heads * L)
    offs = tl.arange(0, HALF_BLOCK)
    mask = offs < D // 2
    # this head's norm weight before the PDL wait, as _norm_weight says: q_norm's, k_norm's, 1.0 for the weightless
    # v_norm (padding lanes read 1.0 too: their values are 0 and never stored)
    w_ptr = q_w_ptr if head < Hq else k_w_ptr
    weighted = mask & (head < Hq + Hkv)
    w1 = tl.load(w_ptr + offs, mask=weighted, other=1.0).to(tl.float32)
    w2 = tl.load(w_ptr + D // 2 + offs, mask=weighted, other=1.0).to(tl.float32)
    # the decode attention after this kernel loads its older keys while the q/k/v product before it still runs
    next_kernel_then_wait(PDL)
    dtype = query_ptr.dtype.element_ty
    c_row = batch * c_sb + pos * c_sl
    if head < Hq:  # q_norm + RoPE -> query [B, Hq, L, D]
        n1, n2 = _norm_rope_row(q_ptr + batch * q_sb + pos * q_sl + head * D, w1, w2, cos_ptr + c_row,
                                sin_ptr + c_row, offs, mask, D, eps, dtype, True, HALF_BLOCK)
        query_row = query_ptr + ((batch * Hq + head) * L + pos) * D
        _store(query_row + offs, n1, mask)
        _store(query_row + D // 2 + offs, n2, mask)
    else:  # into the cache, at this token's slot
        slot = tl.load(slots_ptr + batch * L + pos).to(tl.int64)
        if head < Hq + Hkv:  # k_norm + RoPE
            kv_head = head - Hq
            n1, n2 = _norm_rope_row(k_ptr + batch * k_sb + pos * k_sl + kv_head * D, w1, w2, cos_ptr + c_row,
                                    sin_ptr + c_row, offs, mask, D, eps, dtype, True, HALF_BLOCK)
            cache_row = key_cache_ptr + batch * cache_sb + kv_head * cache_sh + slot * cache_ss
            scale_ptr = key_scale_ptr + kv_head
        else:  # the weightless v_norm, no RoPE
            kv_head = head - Hq - Hkv
            n1, n2 = _norm_rope_row(v_ptr + batch * v_sb + pos * v_sl + kv_head * D, w1, w2, cos_ptr, sin_ptr,
                                    offs, mask, D, eps, dtype, False, HALF_BLOCK)
            cache_row = value_cache_ptr + batch * cache_sb + kv_head * cache_sh + slot * cache_ss
            scale_ptr = value_scale_ptr + kv_head
        if FP8:  # n1, n2 hold model-dtype values (the eager path's K/V), quantized from there
            scale = tl.load(scale_ptr)
            store_fp8(cache_row + offs, n1, scale, mask)
            store_fp8(cache_row + D // 2 + offs, n2, scale, mask)
        else:
            _store(cache_row + offs, n1, mask)
            _store(cache_row + D // 2 + offs, n2, mask)


def _warps(block: int) -> int:
    return min(8, max(1, block // 256))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, D] with unit stride along D (a view where possible)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             root_size: float | None = None) -> torch.Tensor:
    """RMSNorm.forward over the last dim of x (weight None: the weightless norm); same dtype and shape as x.
    With root_size: the router's input instead (`router.router_input`; weight: the router's scale)."""
    rows, D = _rows(x), x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(D)
    if out.numel() > 0:
        _rms_norm_kernel[(rows.shape[0],)](
            rows, weight if weight is not None else rows, out, rows.stride(0), D, eps, float(root_size or 0.0),
            HAS_WEIGHT=weight is not None, ROUTER=root_size is not None, BLOCK=block, num_warps=_warps(block),
            **launch_options(out))
    return out


def deferred_norms_args(x: torch.Tensor, norms: tuple | None) -> tuple[tuple, dict]:
    """A GEMV kernel's arguments for an input that is `norms` = (residual, norm_weight, eps, scalar, next_weight,
    next_eps, new) of the product x (gemv.py's `norms`, normalized by the GEMV's own programs), or x itself (norms
    None): (residual, norm weight, scalar, next weight, new, eps, next eps) with x where one is absent, and the
    constexprs NORMED, HAS_SCALAR, HAS_NEXT."""
    if norms is None:
        return (x, x, x, x, x, 1e-6, 1e-6), dict(NORMED=False, HAS_SCALAR=False, HAS_NEXT=False)
    residual, norm_weight, eps, scalar, next_weight, next_eps, new = norms
    assert residual.numel() == new.numel() == x.numel() and new.is_contiguous()
    args = (residual.contiguous(), norm_weight, scalar if scalar is not None else x,
            next_weight if next_weight is not None else x, new, eps, eps if next_eps is None else next_eps)
    return args, dict(NORMED=True, HAS_SCALAR=scalar is not None, HAS_NEXT=next_weight is not None)


def residual_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                      scalar: torch.Tensor | None = None, next_weight: torch.Tensor | None = None,
                      next_eps: float | None = None,
                      out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """new = residual + rms_norm(x, weight), then new * scalar (a 1-element tensor, read on the device) if given, into
    `out` if given. Returns (new, rms_norm(new, next_weight, next_eps) if next_weight is given else None), rounded to
    the residual's dtype at the same points as the eager ops, in one launch."""
    return _residual_norms(residual, x, weight, eps, scalar, next_weight, next_eps, out=out)[:2]


def residual_moe_norms(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                       mlp_weight: torch.Tensor, experts_weight: torch.Tensor, router_scale: torch.Tensor,
                       root_size: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A MoE layer's attention tail in one launch: new = residual + rms_norm(x, weight), and the three inputs read from
    it: rms_norm(new, mlp_weight) (dense MLP), rms_norm(new, experts_weight) (experts) and the router's
    round(rms_norm(new) * router_scale * root_size). All norms take `eps`."""
    return _residual_norms(residual, x, weight, eps, None, mlp_weight, eps, (experts_weight, router_scale, root_size))


def _residual_norms(residual, x, weight, eps, scalar, next_weight, next_eps, moe=None, out=None):
    """The kernel's outputs: new (in `out` if given), the next norm, the experts' norm and the router input (None
    where not asked for), allocated like residual. Absent tensors are passed as x: their branches are compiled out."""
    res_rows, x_rows = _rows(residual), _rows(x)
    out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device) if out is None else out
    assert out.shape == residual.shape and out.is_contiguous()
    next_out = torch.empty_like(out) if next_weight is not None else None
    next2_weight, router_scale, root_size = moe if moe is not None else (None, None, 1.0)
    next2_out, router_out = (torch.empty_like(out), torch.empty_like(out)) if moe is not None else (None, None)
    pointers = tuple(t if t is not None else x_rows for t in (weight, scalar, next_weight, out, next_out,
                                                              next2_weight, next2_out, router_scale, router_out))
    block = triton.next_power_of_2(residual.shape[-1])
    if residual.numel() > 0:
        _residual_rms_norm_kernel[(res_rows.shape[0],)](
            res_rows, x_rows, *pointers, res_rows.stride(0), x_rows.stride(0), residual.shape[-1], eps,
            eps if next_eps is None else next_eps, float(root_size), HAS_WEIGHT=weight is not None,
            HAS_SCALAR=scalar is not None, HAS_NEXT=next_weight is not None, HAS_MOE=moe is not None, BLOCK=block,
            num_warps=_warps(block), **launch_options(res_rows))
    return out, next_out, next2_out, router_out


def _rope_tables(cos: torch.Tensor, sin: torch.Tensor, B: int, L: int, D: int):
    """cos/sin ([B or 1, L, 1, D] or [B or 1, L, D]) as [B, L, D] views with unit stride along D and one layout."""
    cos, sin = (t.reshape(t.shape[0], L, D).expand(B, L, D) for t in (cos, sin))
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    assert cos.stride() == sin.stride(), "cos and sin must share a layout"
    return cos, sin


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor | None = None,
                 sin: torch.Tensor | None = None) -> torch.Tensor:
    """apply_rope(rms_norm(x, weight), cos, sin).transpose(1, 2) as a new contiguous [B, H, L, D] tensor. x [B, L, H, D]
    is read in place where it has unit stride along D (a projection's view); cos/sin [B, L, 1, D] or [B, L, D] from
    rope_cos_sin (a batch of 1 broadcasts), None: no RoPE (the v_norm)."""
    B, L, H, D = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(B, H, L, D, dtype=x.dtype, device=x.device)
    rope = cos is not None
    cos, sin = _rope_tables(cos, sin, B, L, D) if rope else (x, x)
    half_block = triton.next_power_of_2(D // 2)
    if out.numel() > 0:
        _qk_norm_rope_kernel[(B * L * H,)](
            x, weight if weight is not None else x, cos, sin, out, H, L, *x.stride()[:3],
            *(cos.stride()[:2] if rope else (0, 0)), D, eps, HAS_WEIGHT=weight is not None, HAS_ROPE=rope,
            HALF_BLOCK=half_block, num_warps=_warps(half_block), **launch_options(out))
    return out


def qkv_norm_rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, q_weight: torch.Tensor,
                        k_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                        key_cache: torch.Tensor, value_cache: torch.Tensor, slots: torch.Tensor,
                        key_scale: torch.Tensor | None = None, value_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One launch for a layer's new query, key and value (decode steps, which write the cache in place): query =
    qk_norm_rope(q, q_weight, eps, cos, sin), returned as [B, Hq, L, D]; the key qk_norm_rope(k, k_weight, ...) and
    the value rms_norm(v) (weightless, no RoPE; v None: K=V, the value is the raw key projection) written into the
    caches at row b, token t's slot slots[b, t]. q [B, L, Hq*D], k and v [B, L, Hkv*D]: unit stride along the last
    dim (views of a fused projection do). Caches: [B, Hkv, S, D] buffers, or [Hkv, S, D] pools shared by every row
    (slots are then pool rows), of q's dtype or float8 e4m3 with fp32 per-head scales [Hkv] (`key_scale` /
    `value_scale`; None: the pools' own `kv_scales`, see model/paged_cache.py): stored = fp8(clamp(x / scale,
    +-448))."""
    (B, L), D = q.shape[:2], key_cache.shape[-1]
    Hq, Hkv = q.shape[2] // D, k.shape[2] // D
    v = k if v is None else v
    assert all(t.stride(-1) == 1 for t in (q, k, v)), "projections need unit stride along their last dim"
    cache_strides = key_cache.stride()[:3] if key_cache.dim() == 4 else (0, *key_cache.stride()[:2])  # pools: 0
    assert value_cache.stride() == key_cache.stride() and value_cache.dtype == key_cache.dtype
    fp8 = key_cache.dtype == torch.float8_e4m3fn
    assert fp8 or key_cache.dtype == q.dtype, "caches hold q's dtype or float8 e4m3"
    if fp8:
        key_scale = key_scale if key_scale is not None else key_cache.kv_scales
        value_scale = value_scale if value_scale is not None else value_cache.kv_scales
        assert key_scale.dtype == value_scale.dtype == torch.float32 and key_scale.numel() == value_scale.numel() == Hkv
    else:
        key_scale = value_scale = q  # unread: the FP8 branch is compiled out
    cos, sin = _rope_tables(cos, sin, B, L, D)
    slots = slots.contiguous()
    query = torch.empty(B, Hq, L, D, dtype=q.dtype, device=q.device)
    half_block = triton.next_power_of_2(D // 2)
    if query.numel() > 0:
        _qkv_norm_rope_store_kernel[(B * L * (Hq + 2 * Hkv),)](
            q, k, v, q_weight, k_weight, cos, sin, query, key_cache, value_cache, slots, Hq, Hkv, L, *q.stride()[:2],
            *k.stride()[:2], *v.stride()[:2], *cos.stride()[:2], *cache_strides, key_scale, value_scale, D, eps,
            HALF_BLOCK=half_block, FP8=fp8, num_warps=_warps(half_block), **launch_options(query))
    return query
