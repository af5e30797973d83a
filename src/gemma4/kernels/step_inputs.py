"""What a forward computes before its first decoder layer, in one launch each: the scaled token embedding, the
per-layer inputs (PLE) of E2B/E4B, the RoPE tables, and a decode step's paged-cache plan.

Eagerly these are ~35 small PyTorch kernels per decode step (gathers, casts, cos/sin, wheres, a scatter, a scan).
Each kernel rounds where its eager twin (`model.text`, `model.cache`) materializes a tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .norm import _norm_weight, _unit_rms, _warps
from .pdl import after_previous_kernel, launch_options
from .rounding import round_to


@triton.jit
def _scaled_embedding_kernel(ids_ptr, table_ptr, out_ptr, used_ids_ptr, D, scale, first_placeholder,
                             second_placeholder, third_placeholder, pad_id, BLOCK: tl.constexpr,
                             PADS_PLACEHOLDERS: tl.constexpr, PDL: tl.constexpr):
    after_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    token = tl.load(ids_ptr + row)
    if PADS_PLACEHOLDERS:
        placeholder = (token == first_placeholder) | (token == second_placeholder) | (token == third_placeholder)
        token = tl.where(placeholder, pad_id, token)
        if tl.program_id(1) == 0:
            tl.store(used_ids_ptr + row, token)
    x = tl.load(table_ptr + token * D + offs, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + row * D + offs, round_to(x * scale, dtype).to(dtype), mask=mask)


def scaled_embedding(ids: torch.Tensor, table: torch.Tensor, scale: float,
                     placeholders: tuple[int, int, int] | None = None, pad_id: int = 0):
    """ScaledEmbedding.forward: table[ids] * scale [..., D], with scale already a value of table's dtype.
    With `placeholders` (three ids) the lookup reads pad_id where ids holds one of them, and returns
    (embeddings, the ids it read), as multimodal checkpoints embed placeholders without their media."""
    D = table.shape[1]
    out = torch.empty(*ids.shape, D, dtype=table.dtype, device=table.device)
    used = torch.empty_like(ids) if placeholders is not None else ids
    if ids.numel() > 0:
        block = min(1024, triton.next_power_of_2(D))
        _scaled_embedding_kernel[(ids.numel(), triton.cdiv(D, block))](
            ids.contiguous(), table, out, used, D, scale, *(placeholders or (-1, -1, -1)), pad_id, BLOCK=block,
            PADS_PLACEHOLDERS=placeholders is not None, **launch_options(out))
    return out if placeholders is None else (out, used)


@triton.jit
def _per_layer_inputs_kernel(context_ptr, ids_ptr, table_ptr, norm_w_ptr, out_ptr, layers_x_dim, D, context_scale,
                             table_scale, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One (token, layer) slice of D: ((rms_norm(context * context_scale) + table[id] * table_scale) * 2^-0.5)."""
    token, layer = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    dtype = out_ptr.dtype.element_ty
    norm_w = _norm_weight(norm_w_ptr, offs, mask, True)  # before the wait: see _norm_weight
    after_previous_kernel(PDL)
    at = token * layers_x_dim + layer * D + offs
    context = round_to(tl.load(context_ptr + at, mask=mask, other=0.0).to(tl.float32) * context_scale, dtype)
    normed = round_to(_unit_rms(context, D, eps) * norm_w, dtype)
    row = tl.load(ids_ptr + token)
    own = tl.load(table_ptr + row * layers_x_dim + layer * D + offs, mask=mask, other=0.0).to(tl.float32)
    summed = round_to(normed + round_to(own * table_scale, dtype), dtype)
    tl.store(out_ptr + at, round_to(summed * 0.7071067811865476, dtype).to(dtype), mask=mask)


def per_layer_inputs(context: torch.Tensor, ple_ids: torch.Tensor, table: torch.Tensor, norm_weight: torch.Tensor,
                     eps: float, context_scale: float, table_scale: float) -> torch.Tensor:
    """TextModel.per_layer_inputs after the projection: context [B, L, layers * D] (per_layer_model_projection of
    the embeddings), ple_ids [B, L], table [vocab, layers * D]; table_scale already a value of the table's dtype.
    Returns [B, L, layers, D]."""
    batch, length = ple_ids.shape
    D = norm_weight.shape[0]
    layers = table.shape[1] // D
    out = torch.empty(batch, length, layers, D, dtype=table.dtype, device=table.device)
    block = triton.next_power_of_2(D)
    if out.numel() > 0:
        _per_layer_inputs_kernel[(batch * length, layers)](
            context.contiguous(), ple_ids.contiguous(), table, norm_weight, out, layers * D, D, context_scale,
            table_scale, eps, BLOCK=block, num_warps=_warps(block), **launch_options(out))
    return out


@triton.jit
def _rope_kernel(positions_ptr, inv_freq_ptr, cos_ptr, sin_ptr, HALF, HALF_BLOCK: tl.constexpr,
                 INTERPRET: tl.constexpr, PDL: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, HALF_BLOCK)
    mask = offs < HALF
    inv_freq = tl.load(inv_freq_ptr + offs, mask=mask, other=0.0)
    after_previous_kernel(PDL)
    angle = tl.load(positions_ptr + token).to(tl.float32) * inv_freq  # as positions.float() * inv_freq
    dtype = cos_ptr.dtype.element_ty
    # libdevice's cosf/sinf, which torch's CUDA kernels call (tl.cos is the approximate instruction on the GPU,
    # whose error grows with the angle, and positions reach 131K radians); numpy's under the interpreter.
    if INTERPRET:
        cos, sin = tl.cos(angle), tl.sin(angle)
    else:
        cos, sin = libdevice.cos(angle), libdevice.sin(angle)
    cos, sin = round_to(cos, dtype).to(dtype), round_to(sin, dtype).to(dtype)
    base = token * 2 * HALF
    for half in tl.static_range(2):  # rotate-half layout: dims i and i + HALF share a frequency
        tl.store(cos_ptr + base + half * HALF + offs, cos, mask=mask)
        tl.store(sin_ptr + base + half * HALF + offs, sin, mask=mask)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """model.text.rope_cos_sin: cos/sin [B, L, 1, head_dim] of positions [B, L] (inv_freq fp32 [head_dim / 2])."""
    batch, length = positions.shape
    half = inv_freq.shape[0]
    cos = torch.empty(batch, length, 1, 2 * half, dtype=dtype, device=positions.device)
    sin = torch.empty_like(cos)
    if cos.numel() > 0:
        _rope_kernel[(batch * length,)](positions.contiguous(), inv_freq, cos, sin, half, INTERPRET=not cos.is_cuda,
                                        HALF_BLOCK=triton.next_power_of_2(half), **launch_options(cos))
    return cos, sin


@triton.jit
def _decode_plan_kernel(positions_ptr, valid_ptr, num_cached_ptr, rings_ptr, tables_ptr, ring_positions_ptr,
                        ring_gather_ptr, ring_keys_ptr, global_gather_ptr, global_keys_ptr, scalars_ptr, B, table_width,
                        window, ring_size, block_size, ring_trash, trash_block, BLOCK: tl.constexpr,
                        PDL: tl.constexpr):
    """Program (row, chunk): `BLOCK` candidates of the row's ring (a ring longer than the window: its slots from the
    window's first position on, as paged_cache.py's eager plan) and of its global blocks; chunk 0 also the row's
    write slots, position and key counts (`scalars`)."""
    b, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    after_previous_kernel(PDL)
    position, ring = tl.load(positions_ptr + b), tl.load(rings_ptr + b)
    query = tl.where(tl.load(valid_ptr + b) != 0, position, -1)  # -1 for a padding row: it sees nothing
    in_ring = offs < ring_size
    order = (tl.where(ring_size > window, tl.maximum(query - window + 1, 0), 0) + offs) % ring_size
    slot = ring * ring_size + order
    cached = tl.load(ring_positions_ptr + slot, mask=in_ring, other=-1)
    tl.store(ring_gather_ptr + b * ring_size + offs, slot, mask=in_ring)
    # The last position <= query in each slot; those from num_cached on are this step's (written before attending).
    latest = query - ((query - order) % ring_size + ring_size) % ring_size
    new = (latest >= tl.load(num_cached_ptr + b)) & (query >= 0)
    tl.store(ring_keys_ptr + b * ring_size + offs, tl.where(new, latest, cached), mask=in_ring)
    width = table_width * block_size
    in_blocks = offs < width
    block = tl.load(tables_ptr + b * table_width + offs // block_size, mask=in_blocks, other=0)
    tl.store(global_gather_ptr + b * width + offs, block * block_size + offs % block_size, mask=in_blocks)
    tl.store(global_keys_ptr + b * width + offs, tl.where(offs <= query, offs, -1), mask=in_blocks)
    if chunk == 0:
        valid = query >= 0
        own = tl.load(tables_ptr + b * table_width + tl.minimum(position // block_size, table_width - 1))
        tl.store(scalars_ptr + b, tl.where(valid, ring * ring_size + position % ring_size, ring_trash))
        tl.store(scalars_ptr + B + b, tl.where(valid, own * block_size + position % block_size,
                                               trash_block * block_size))
        tl.store(scalars_ptr + 2 * B + b, query)
        tl.store(scalars_ptr + 3 * B + b, query + 1)
        tl.store(scalars_ptr + 4 * B + b, tl.minimum(query + 1, window))


def decode_plan(positions: torch.Tensor, valid: torch.Tensor, num_cached: torch.Tensor, ring_slots: torch.Tensor,
                block_tables: torch.Tensor, ring_positions: torch.Tensor, window: int, ring_size: int, block_size: int,
                ring_trash: int, trash_block: int):
    """PagedCacheView.begin(in_place=True) in one launch (its eager ops are ~25 launches of a graphed decode step):
    (ring_gather [B, R], ring key positions [B, R], global_gather [B, nb * bs], global key positions [B, nb * bs],
    scalars [5, B]: ring write slot, global write slot, new position, global and sliding key counts)."""
    batch, table_width = block_tables.shape
    device = positions.device
    ring_gather = torch.empty(batch, ring_size, dtype=torch.long, device=device)
    ring_keys = torch.empty_like(ring_gather)
    global_gather = torch.empty(batch, table_width * block_size, dtype=torch.long, device=device)
    global_keys = torch.empty_like(global_gather)
    scalars = torch.empty(5, batch, dtype=torch.long, device=device)
    _decode_plan_kernel[(batch, triton.cdiv(max(ring_size, table_width * block_size), 1024))](
        positions.reshape(-1), valid.reshape(-1), num_cached.reshape(-1), ring_slots, block_tables.contiguous(),
        ring_positions, ring_gather, ring_keys, global_gather, global_keys, scalars, batch, table_width, window,
        ring_size, block_size, ring_trash, trash_block, BLOCK=1024, num_warps=4, **launch_options(positions))
    return ring_gather, ring_keys, global_gather, global_keys, scalars
