"""The kernels of a forward's inputs (gemma4.kernels.step_inputs) and of its end (kernels.logits) against their
eager twins.

Without a GPU they run on CPU tensors through Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from gemma4 import kernels  # noqa: E402
from gemma4.config import FULL, SLIDING, TextConfig  # noqa: E402
from gemma4.kernels.logits import argmax, softcap  # noqa: E402
from gemma4.kernels.step_inputs import per_layer_inputs, rope_cos_sin, scaled_embedding  # noqa: E402
from gemma4.model.text import TextModel, rope_inverse_frequencies  # noqa: E402
from gemma4.model.text import rope_cos_sin as eager_rope  # noqa: E402
from gemma4.options import override  # noqa: E402
from reference import FAMILIES, text_config_dict  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def eager_reference():
    """The references are the eager ops, also on CUDA, where the model would otherwise take these kernels."""
    with override(kernels=False):
        yield


def test_scaled_embedding_and_placeholder_padding():
    """bf16: the product of two bf16 values rounded once, as the eager multiply: bit-equal. Placeholder ids read the
    pad row and are returned as the pad id."""
    table = torch.randn(50, 96, device=DEVICE).to(torch.bfloat16)
    scale = float(torch.tensor(96**0.5, dtype=torch.bfloat16))
    ids = torch.tensor([[3, 7, 41, 0], [49, 44, 7, 45]], device=DEVICE)
    expected = torch.nn.functional.embedding(ids, table) * torch.tensor(96**0.5, dtype=torch.bfloat16)
    assert torch.equal(scaled_embedding(ids, table, scale), expected)
    padded = torch.where((ids == 41) | (ids == 44) | (ids == 45), 1, ids)
    embeds, used = scaled_embedding(ids, table, scale, placeholders=(41, 44, 45), pad_id=1)
    assert torch.equal(used, padded)
    assert torch.equal(embeds, torch.nn.functional.embedding(padded, table) * torch.tensor(scale, dtype=table.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_per_layer_inputs_equal_eager(dtype):
    config = TextConfig(**text_config_dict("E2B"))
    with torch.device(DEVICE):
        model = TextModel(config).to(dtype)
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 1.0)
    ple_ids = torch.randint(0, config.vocab_size_per_layer_input, (2, 5), device=DEVICE)
    embeds = torch.randn(2, 5, config.hidden_size, device=DEVICE).to(dtype)
    expected = model.per_layer_inputs(ple_ids, embeds)
    table, norm = model.embed_tokens_per_layer, model.per_layer_projection_norm
    got = per_layer_inputs(model.per_layer_model_projection(embeds), ple_ids, table.weight, norm.weight, norm.eps,
                           config.hidden_size**-0.5, table.rounded_scale())
    assert got.shape == expected.shape
    # The norm's mean of squares sums in another order (and fp32 keeps every product unrounded): one bf16 ulp at
    # most, and rarely; a few fp32 ulps.
    ulps = 2**-7 if dtype == torch.bfloat16 else 2**-20
    error = ((got - expected).abs() / expected.abs().clamp(min=1)).max()
    assert error <= ulps, error


@pytest.mark.parametrize("rope", [{"rope_theta": 10_000.0},
                                  {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}])
def test_rope_tables_equal_eager(rope):
    """Positions up to 131K radians: cos/sin must be range-reduced correctly. bf16 bit-equal; fp32 within an ulp
    (the interpreter's numpy cos against torch's)."""
    head_dim = 512 if "partial_rotary_factor" in rope else 256
    inv_freq = rope_inverse_frequencies(head_dim, rope).to(DEVICE)
    positions = torch.tensor([[0, 1, 7, 511], [1024, 4095, 65_537, 131_071]], device=DEVICE)
    for dtype in (torch.bfloat16, torch.float32):
        got, expected = rope_cos_sin(positions, inv_freq, dtype), eager_rope(positions, inv_freq, dtype)
        for a, b in zip(got, expected):
            assert a.shape == b.shape == (2, 4, 1, head_dim)
            if dtype == torch.bfloat16:
                assert torch.equal(a, b)
            else:
                assert (a - b).abs().max() <= 2.4e-7


def test_softcap_equals_eager():
    x = (torch.randn(3, 1000, device=DEVICE) * 40).to(torch.bfloat16)
    expected = torch.tanh(x.float() / 30.0) * 30.0
    got = softcap(x, 30.0)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert (got - expected).abs().max() <= 4e-6  # tanh within an ulp or two of fp32 at |values| < 30


def test_argmax_equals_torch():
    """First index of the largest value, across and within blocks (ties planted), NaN the largest, a row of -inf;
    twice, since the last block re-arms the row's counter."""
    x = torch.randn(5, 10_000, device=DEVICE)
    x[0, 9_000] = x[0, 123] = 10.0  # a tie across blocks: the first wins
    x[1, 5] = x[1, 6] = 10.0  # within one block
    x[2, 7_777] = float("nan")
    x[3] = float("-inf")
    x[4, 300] = float("inf")  # the largest, not a NaN
    for _ in range(2):
        got = argmax(x)
        assert got.tolist() == [123, 5, 7_777, 0, 300] == x.argmax(-1).tolist()
        ids, checked = argmax(x, nan_id=-1)  # the rows holding a NaN flagged by the same launch
        assert ids.tolist() == got.tolist() and checked.tolist() == [123, 5, -1, 0, 300]
        out = torch.full((5,), 7, dtype=torch.long, device=DEVICE)  # written in place: a decode graph's input row
        ids, checked = argmax(x, nan_id=-1, out=out)
        assert ids is out and out.tolist() == got.tolist() and checked.tolist() == [123, 5, -1, 0, 300]


@pytest.mark.parametrize("ring_extra,behind", [(0, [0, 0, 0]), (3, [0, 2, 0])])
def test_decode_plan_equals_the_paged_views_eager_plan(ring_extra, behind):
    """A decode step's paged-cache plan (write slots, each row's ring and global candidates with their positions,
    key counts) from the one kernel equals the eager ops', padding rows and a ring's wrap included. `behind`: how
    far a row's position is past its sequence's num_cached (a verify step's later rows, with rings of 3 extra
    slots): the positions in between show at their ring slots too."""
    from gemma4.engine.block_manager import BlockManager
    from gemma4.model.paged_cache import PagedCacheView
    config = TextConfig(**text_config_dict("E2B"))
    pools = BlockManager(config, num_blocks=12, block_size=4, max_num_seqs=3, dtype=torch.float32, device=DEVICE,
                         ring_extra=ring_extra)
    window = pools.window
    pools.ring_positions[:-1] = torch.randint(-1, 50, (pools.ring_trash,), device=DEVICE)
    cached = window + 3 - behind[1]  # ring 0 (row 1's) as a sequence leaves it: the latest position below that
    pools.ring_positions[:pools.ring_size] = torch.tensor(
        [cached - 1 - (cached - 1 - slot) % pools.ring_size for slot in range(pools.ring_size)], device=DEVICE)
    tables = torch.tensor([[3, 0, 7, 12], [5, 1, 12, 12], [12, 12, 12, 12]], device=DEVICE)
    rings = torch.tensor([2, 0, 1], device=DEVICE)
    positions = torch.tensor([[14], [window + 3], [0]], device=DEVICE)
    valid = torch.tensor([[True], [True], [False]], device=DEVICE)
    plans = []
    for fused in (False, True):
        view = PagedCacheView(pools, tables, rings, positions[:, 0] - torch.tensor(behind, device=DEVICE))
        with override(kernels=fused), (kernels.force() if fused else contextlib.nullcontext()):
            view.begin(positions, valid, in_place=True)
        plans.append((view._plan, view.ring_gather, view.global_gather))
    (eager, eager_ring, eager_global), (fused, fused_ring, fused_global) = plans
    assert torch.equal(eager_ring, fused_ring) and torch.equal(eager_global, fused_global)
    assert eager.keys() == fused.keys()
    for key in eager:
        assert torch.equal(eager[key], fused[key]), key
    size = pools.ring_size
    assert fused[("num_keys", FULL)].tolist() == [15, window + 4, 0]
    assert fused[("num_keys", SLIDING)].tolist() == [min(15, window), window, 0]  # the window's keys only
    # Row 1 (query window + 3, ring 0 filled as a sequence's): a ring longer than the window lists its slots in
    # position order from the window's first position, 4: the window first, then older positions a sliding layer
    # never reads. A ring of the window's size lists them from slot 0 (the order the CPU kernel's sums follow).
    first = 4 if ring_extra else 0
    assert fused_ring[1].tolist() == [(first + j) % size for j in range(size)]
    assert sorted(fused[SLIDING][1, :window].tolist()) == list(range(4, window + 4))
    assert (fused[SLIDING][1, window:] < 4).all()
    first = max(14 - window + 1, 0) if ring_extra else 0
    assert fused_ring[0].tolist() == [2 * size + (first + j) % size for j in range(size)]
    assert fused_ring[2].tolist() == [size + j for j in range(size)]  # a padding row (query -1): from slot 0
