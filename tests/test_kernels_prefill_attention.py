"""prefill_attention (Triton flash attention, masks from positions) against attend() + attention_mask().

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1), with small
tiles, so these short sequences still span several query and key tiles and skip some."""

import pytest
import torch

pytest.importorskip("triton")

from gemma4.kernels.prefill_attention import prefill_attention  # noqa: E402
from gemma4.model.attention import attend, attention_mask  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(query, key, value, qpos, qvalid, kpos, window, qblocks=None, kblocks=None):
    mask = attention_mask(qpos, qvalid, kpos, window, qblocks, kblocks)
    return attend(query.float(), key.float(), value.float(), mask)


def ring_layout(batch, window, chunk, start):
    """Keys as a sliding layer's cache hands them over for a chunk: the ring (slot p % window holds p; empty slots
    -1) then the chunk itself. Rows are left-padded by different amounts."""
    pad = torch.tensor([0, 3])[:batch]
    qpos = (start + torch.arange(chunk))[None].repeat(batch, 1) - pad[:, None]
    qvalid = qpos >= 0
    qpos = qpos.clamp(min=0)
    ring = torch.full((batch, window), -1)
    for b in range(batch):
        for p in range(max(0, start - pad[b].item() - window), start - pad[b].item()):
            ring[b, p % window] = p
    kpos = torch.cat([ring, torch.where(qvalid, qpos, -1)], dim=1)
    return qpos, qvalid, kpos


@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["sliding_ring", "global_causal", "images", "gqa4_dim64"])
def test_prefill_attention_matches_reference(case, dtype, num_splits):
    """num_splits 3: each query tile's key span cut into three ranges (a short chunk over a long context), merged;
    some ranges are empty (the span has fewer than three key tiles)."""
    g = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, dim, window = 2, 4, 2, 32, None
    qblocks = kblocks = None
    if case == "sliding_ring":  # a chunk after 21 earlier tokens: the ring is out of order and partly empty
        window = 12
        qpos, qvalid, kpos = ring_layout(batch, window, 40, 21)
    else:  # a whole left-padded prompt, no cache
        length = 45
        qpos = torch.arange(length)[None].repeat(batch, 1) - torch.tensor([0, 5])[:, None]
        qvalid = qpos >= 0
        qpos = qpos.clamp(min=0)
        kpos = torch.where(qvalid, qpos, -1)
        if case == "images":  # two images, one longer than the window: tokens of one image see each other
            window = 8
            qblocks = torch.zeros(batch, length, dtype=torch.long)
            qblocks[:, 6:17], qblocks[:, 25:29] = 1, 2
            qblocks = torch.where(qvalid, qblocks, 0)
            kblocks = qblocks
        if case == "gqa4_dim64":  # 4 query heads per kv head; D = 64 spans two value slices on the CPU
            heads, kv_heads, dim = 8, 2, 64
    num_keys = kpos.shape[1]
    query = torch.randn(batch, heads, qpos.shape[1], dim, generator=g)
    key = torch.randn(batch, kv_heads, num_keys, dim, generator=g)
    value = torch.randn(batch, kv_heads, num_keys, dim, generator=g)
    value[kpos[:, None, :].expand_as(value[..., 0]) < 0] = float("nan")  # empty slots: must never be read
    key[kpos[:, None, :].expand_as(key[..., 0]) < 0] = float("nan")
    args = [t.to(DEVICE) for t in (qpos, qvalid, kpos)]
    blocks = [t.to(DEVICE) if t is not None else None for t in (qblocks, kblocks)]
    tensors = [t.to(DEVICE, dtype) for t in (query, key, value)]

    out = prefill_attention(*tensors, *args, window, *blocks, num_splits=num_splits)
    expected = reference(*(t.nan_to_num() for t in tensors), *args, window, *blocks)
    assert out.dtype == dtype and out.shape == (batch, qpos.shape[1], heads * dim)
    valid = args[1]
    assert torch.isfinite(out).all()
    assert (out[~valid] == 0).all()  # padding queries see nothing
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[valid].float(), expected[valid], atol=tol, rtol=tol)


def test_prefill_attention_rule_is_sharp():
    """The comparison above can fail: a window one shorter, or causality off by one, moves outputs far beyond the
    fp32 tolerance on these inputs."""
    g = torch.Generator().manual_seed(1)
    qpos, qvalid, kpos = ring_layout(1, 12, 30, 17)
    query, key, value = (torch.randn(1, 2, n, 32, generator=g).to(DEVICE) for n in (30, 42, 42))
    args = [t.to(DEVICE) for t in (qpos, qvalid, kpos)]
    out = prefill_attention(query, key, value, *args, 12)
    assert (out - reference(query, key, value, *args, 11)).abs().max() > 1e-2
    shifted = [args[0] - 1, args[1], args[2]]
    assert (out - reference(query, key, value, *shifted, 12)).abs().max() > 1e-2


def test_a_short_chunk_over_a_long_context_splits_its_keys():
    """By default the key spans are split where query tiles are too few for the device (the interpreter counts 4
    SMs) and the keys are several times the queries: one query tile of 8 rows over 200 keys, one head: 4 splits (of
    4 key tiles at least), equal to one split up to fp32 rounding; a prompt of its own 8 keys is not split."""
    from gemma4.kernels import prefill_attention as module

    g = torch.Generator().manual_seed(2)
    qpos = torch.arange(192, 200)[None]
    kpos = torch.arange(200)[None]
    query, key, value = (torch.randn(1, 1, n, 32, generator=g).to(DEVICE) for n in (8, 200, 200))
    args = [t.to(DEVICE) for t in (qpos, qpos >= 0, kpos)]
    launched = []
    kernel = module._prefill_kernel

    class Recording:
        def __getitem__(self, grid):
            launched.append(grid)
            return kernel[grid]

    try:
        module._prefill_kernel = Recording()
        split = prefill_attention(query, key, value, *args, tiles=(16, 16, 32, 1))
        whole = prefill_attention(query, key, value, *args, tiles=(16, 16, 32, 1), num_splits=1)
        own = prefill_attention(query, key[:, :, -8:], value[:, :, -8:], *args[:2], args[2][:, -8:],
                                tiles=(16, 16, 32, 1))
    finally:
        module._prefill_kernel = kernel
    assert launched == [(1, 1, 4), (1, 1, 1), (1, 1, 1)]
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split, reference(query, key, value, *args, None), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(own, reference(query, key[:, :, -8:], value[:, :, -8:], *args[:2], args[2][:, -8:],
                                              None), atol=1e-5, rtol=1e-5)


def test_key_tile_ranges_cover_every_visible_key_and_skip_the_rest():
    """Each query tile's key span holds every key tile with a visible key (else outputs would silently lose keys;
    the comparisons above would catch it too), and a sliding chunk's late tiles skip the ring entirely."""
    from gemma4.kernels.prefill_attention import _key_tile_ranges

    qpos, qvalid, kpos = ring_layout(2, 12, 64, 30)
    qblocks = torch.zeros_like(qpos)
    qblocks[:, 20:31] = 1
    qblocks = torch.where(qvalid, qblocks, 0)
    kblocks = torch.cat([torch.zeros(2, 12, dtype=torch.long), qblocks], dim=1)
    for window, blocks in [(12, (None, None)), (12, (qblocks, kblocks)), (None, (None, None))]:
        q32 = torch.where(qvalid, qpos, -1).int()
        b32 = [b.int() if b is not None else None for b in blocks]
        ranges = _key_tile_ranges(q32, kpos.int(), window, *b32, 8, 4)
        visible = attention_mask(qpos, qvalid, kpos, window, *blocks)[:, 0] & qvalid[:, :, None]
        for b in range(2):
            for tile in range(ranges.shape[1]):
                keys = visible[b, tile * 8:(tile + 1) * 8].any(0).nonzero().flatten()
                start, end = ranges[b, tile].tolist()
                assert start % 4 == 0 and start <= end <= kpos.shape[1]
                if len(keys):
                    assert start <= keys.min() and keys.max() < end
                    assert start > keys.min() - 4 and end <= keys.max() + 4  # whole tiles, no more
                else:
                    assert start == end
        if window is not None and blocks[0] is None:
            assert ranges[:, -1, 0].min() >= 12  # the last query tile reads no ring slot
