"""The end of a decode step: the final logit softcap and the greedy token, one launch each (eagerly four and two:
~20 us of an E2B step on an H200, where these take ~3 us each)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activation import _tanh
from .gemv import finished_counters
from .pdl import after_previous_kernel, launch_options

SOFTCAP_BLOCK = 512  # values per program: one wave of programs on the GPU for a row of 262,144
ARGMAX_BLOCK = 4096


@triton.jit
def _softcap_kernel(x_ptr, out_ptr, N, cap, BLOCK: tl.constexpr, PDL: tl.constexpr):
    after_previous_kernel(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _tanh(tl.div_rn(x, cap)) * cap, mask=mask)  # IEEE division, as torch's


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """tanh(x.float() / cap) * cap as a new fp32 tensor shaped like x. Not in the LM head GEMV's epilogue: there it
    made that GEMV 1.5x slower (E2B on an H200: 283 us against 184)."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if out.numel() > 0:
        _softcap_kernel[(triton.cdiv(x.numel(), SOFTCAP_BLOCK),)](x, out, x.numel(), cap, BLOCK=SOFTCAP_BLOCK,
                                                                  num_warps=4, **launch_options(out))
    return out


@triton.jit
def _argmax_kernel(x_ptr, best_ptr, best_at_ptr, counter_ptr, out_ptr, V, stride_x, NUM_BLOCKS: tl.constexpr,
                   BLOCKS_PAD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program (row, block): the block's largest value and its first index; the row's last block to finish picks
    the first index of the row's largest value from the blocks' (blocks are in index order). NaN counts as the
    largest value, as in torch.argmax."""
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    after_previous_kernel(PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)
    top = tl.max(x, 0)
    # mask: a row of -inf ties with the padding
    first = tl.min(tl.where(mask & (x == top), offs, V), 0)
    tl.store(best_ptr + row * NUM_BLOCKS + block, top)
    tl.store(best_at_ptr + row * NUM_BLOCKS + block, first)
    # The acquire of the last block's atomic pairs with every other block's release: their stores are visible.
    finished = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel")
    if finished == NUM_BLOCKS - 1:
        blocks = tl.arange(0, BLOCKS_PAD)
        blocks_mask = blocks < NUM_BLOCKS
        tops = tl.load(best_ptr + row * NUM_BLOCKS + blocks, mask=blocks_mask, other=float("-inf"))
        firsts = tl.load(best_at_ptr + row * NUM_BLOCKS + blocks, mask=blocks_mask, other=V)
        top = tl.max(tops, 0)
        tl.store(out_ptr + row, tl.min(tl.where(blocks_mask & (tops == top), firsts, V), 0).to(tl.int64))
        tl.atomic_xchg(counter_ptr + row, 0, sem="relaxed")  # re-armed for the next launch


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of x [B, V] (unit stride along V): [B] long."""
    rows, V = x.shape
    assert x.stride(-1) == 1 and V < 2**31
    blocks = triton.cdiv(V, ARGMAX_BLOCK)
    best = torch.empty(rows, blocks, dtype=torch.float32, device=x.device)
    best_at = torch.empty(rows, blocks, dtype=torch.int32, device=x.device)
    out = torch.empty(rows, dtype=torch.long, device=x.device)
    _argmax_kernel[(rows, blocks)](x, best, best_at, finished_counters("argmax", x.device, rows), out, V, x.stride(0),
                                   NUM_BLOCKS=blocks, BLOCKS_PAD=triton.next_power_of_2(blocks), BLOCK=ARGMAX_BLOCK,
                                   num_warps=8, **launch_options(x))
    return out
