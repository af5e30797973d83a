"""The end of a decode step: the final logit softcap and the greedy token, one launch each (eagerly four and two)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activation import _tanh
from .counters import finished_counters
from .pdl import after_previous_kernel, launch_options
from .tuning import tile


@triton.jit
def _softcap_kernel(x_ptr, out_ptr, N, cap, BLOCK: tl.constexpr, PDL: tl.constexpr):
    after_previous_kernel(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _tanh(tl.div_rn(x, cap)) * cap, mask=mask)  # IEEE division, as torch's


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """tanh(x.float() / cap) * cap as a new fp32 tensor shaped like x (not in the LM head GEMV's epilogue, where it
    slowed that GEMV down)."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if out.numel() > 0:
        block = tile("logits", "SOFTCAP_BLOCK", x.device)  # a row of 262,144 logits: about one wave of programs
        _softcap_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), cap, BLOCK=block, num_warps=4,
                                                          **launch_options(out))
    return out


@triton.jit
def _argmax_kernel(x_ptr, best_ptr, best_at_ptr, counter_ptr, out_ptr, checked_ptr, V, stride_x, nan_id,
                   NUM_BLOCKS: tl.constexpr, BLOCKS_PAD: tl.constexpr, BLOCK: tl.constexpr, CHECKED: tl.constexpr,
                   PDL: tl.constexpr):
    """Program (row, block): the block's largest value and its first index; the row's last block to finish picks
    the first index of the row's largest value from the blocks' (blocks are in index order). NaN counts as the
    largest value, as in torch.argmax; a block holding one records NaN as its value, so that with CHECKED the last
    block also writes the row's id again at checked_ptr, nan_id in its place where the row holds a NaN."""
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    after_previous_kernel(PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=float("-inf")).to(tl.float32)
    has_nan = tl.max((x != x).to(tl.int32), 0)
    x = tl.where(x != x, float("inf"), x)
    top = tl.max(x, 0)
    # mask: a row of -inf ties with the padding
    first = tl.min(tl.where(mask & (x == top), offs, V), 0)
    tl.store(best_ptr + row * NUM_BLOCKS + block, tl.where(has_nan > 0, float("nan"), top))
    tl.store(best_at_ptr + row * NUM_BLOCKS + block, first)
    # The acquire of the last block's atomic pairs with every other block's release: their stores are visible.
    finished = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel")
    if finished == NUM_BLOCKS - 1:
        blocks = tl.arange(0, BLOCKS_PAD)
        blocks_mask = blocks < NUM_BLOCKS
        tops = tl.load(best_ptr + row * NUM_BLOCKS + blocks, mask=blocks_mask, other=float("-inf"))
        firsts = tl.load(best_at_ptr + row * NUM_BLOCKS + blocks, mask=blocks_mask, other=V)
        nan_row = tl.max((tops != tops).to(tl.int32), 0)
        tops = tl.where(tops != tops, float("inf"), tops)
        top = tl.max(tops, 0)
        chosen = tl.min(tl.where(blocks_mask & (tops == top), firsts, V), 0).to(tl.int64)
        tl.store(out_ptr + row, chosen)
        if CHECKED:
            tl.store(checked_ptr + row, tl.where(nan_row > 0, nan_id, chosen).to(tl.int64))
        tl.atomic_xchg(counter_ptr + row, 0, sem="relaxed")  # re-armed for the next launch


def argmax(x: torch.Tensor, nan_id: int | None = None, out: torch.Tensor | None = None):
    """x.argmax(-1) of x [B, V] (unit stride along V): [B] long, written into `out` when given (contiguous [B]
    long). With nan_id, (those ids, the same with nan_id where a row holds a NaN) from the one launch."""
    rows, V = x.shape
    assert x.stride(-1) == 1 and V < 2**31
    block = tile("logits", "ARGMAX_BLOCK", x.device)
    blocks = triton.cdiv(V, block)
    best = torch.empty(rows, blocks, dtype=torch.float32, device=x.device)
    best_at = torch.empty(rows, blocks, dtype=torch.int32, device=x.device)
    tokens, checked = _outputs(rows, nan_id, out, x.device)
    _argmax_kernel[(rows, blocks)](x, best, best_at, finished_counters("argmax", x.device, rows), tokens, checked, V,
                                   x.stride(0), nan_id or 0, NUM_BLOCKS=blocks,
                                   BLOCKS_PAD=triton.next_power_of_2(blocks), BLOCK=block, CHECKED=nan_id is not None,
                                   num_warps=8, **launch_options(x))
    return tokens if nan_id is None else (tokens, checked)


def _outputs(rows: int, nan_id: int | None, out: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids [rows] (`out` when given) and their checked copy [rows] (the ids again without nan_id) that a
    sampling kernel writes."""
    if out is not None:
        assert out.shape == (rows,) and out.dtype == torch.long and out.is_contiguous()
    tokens = out if out is not None else torch.empty(rows, dtype=torch.long, device=device)
    return tokens, tokens if nan_id is None else torch.empty(rows, dtype=torch.long, device=device)


# Sampling from each row's top candidates (the serving engine's rows without seeds): temperature, top-k, top-p,
# min-p and the draw in one launch per step, where the eager ops are ~15 launches. The draw is the inverse of the kept
# candidates' CDF at a uniform number.
@triton.jit
def _sample_candidates_kernel(values_ptr, ids_ptr, params_ptr, uniform_ptr, out_ptr, checked_ptr, B, C, nan_id,
                              TOP_P: tl.constexpr, CHECKED: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_C)
    in_row = j < C
    values = tl.load(values_ptr + b * C + j, mask=in_row, other=float("-inf"))  # raw logits, descending
    temperature = tl.load(params_ptr + b)
    top_k = tl.load(params_ptr + B + b).to(tl.int32)
    top_p, min_p = tl.load(params_ptr + 2 * B + b), tl.load(params_ptr + 3 * B + b)
    scaled = tl.div_rn(values, temperature)
    kth = tl.max(tl.where(j == top_k - 1, scaled, float("-inf")), 0)
    scaled = tl.where(scaled < kth, float("-inf"), scaled)  # ties with the k-th value stay, as in the eager rule
    p = tl.exp(scaled - tl.max(scaled, 0))
    p = tl.div_rn(p, tl.sum(p, 0))
    if TOP_P:  # as the eager path: only when some row of the batch asks for it
        p = tl.where(tl.cumsum(p, 0) - p >= top_p, 0.0, p)  # drop what lies past the top_p mass before it
    p = tl.where(p < min_p * tl.max(p, 0), 0.0, p)
    cdf = tl.cumsum(p, 0)
    # The first candidate whose CDF exceeds u * total; rounding can leave u * total at the very end: the last kept.
    chosen = tl.sum((cdf <= tl.load(uniform_ptr + b) * tl.sum(p, 0)).to(tl.int32), 0)
    chosen = tl.minimum(chosen, tl.max(tl.where(p > 0, j, 0), 0))
    token = tl.load(ids_ptr + b * C + chosen)  # a valid id even for a row of NaN (chosen is then 0)
    tl.store(out_ptr + b, token)
    if CHECKED:  # torch.topk ranks NaN above every number: a row holding one has it among its candidates
        tl.store(checked_ptr + b, tl.where(tl.max((values != values).to(tl.int32), 0) > 0, nan_id, token).to(tl.int64))


def sample_candidates(values: torch.Tensor, ids: torch.Tensor, params: torch.Tensor, uniform: torch.Tensor,
                      top_p: bool = True, nan_id: int | None = None, out: torch.Tensor | None = None):
    """values [B, C] fp32: each row's C largest logits, descending (NaN first, as torch.topk ranks it), and their
    token ids [B, C]; params [4, B] fp32: temperature (> 0), top_k (1..C), top_p, min_p per row; uniform [B] in
    [0, 1) -> the drawn token ids [B] (int64). top_p False skips the top-p rule for every row (the eager path applies
    it only when some row asks). `out`: where the ids go, as argmax's. With nan_id, (those ids, the same with nan_id
    where a row's values hold a NaN)."""
    batch, count = values.shape
    tokens, checked = _outputs(batch, nan_id, out, values.device)
    if batch:
        _sample_candidates_kernel[(batch,)](values.float().contiguous(), ids.contiguous(), params.contiguous(),
                                           uniform.contiguous(), tokens, checked, batch, count, nan_id or 0,
                                           TOP_P=top_p, CHECKED=nan_id is not None,
                                           BLOCK_C=triton.next_power_of_2(count), num_warps=4)
    return tokens if nan_id is None else (tokens, checked)
