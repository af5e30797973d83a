"""decode_attention (Triton, split-K) against the reference attend() + attention_mask().

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1)."""

import pytest
import torch

pytest.importorskip("triton")

from gemma4.kernels.attention import decode_attention  # noqa: E402
from gemma4.model.attention import attend, attention_mask  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HUGE = 1e4  # finite, but would swamp the softmax if a kernel read it


def reference(query, key, value, key_positions, query_positions, window=None):
    """fp32 attend() over [B, Hkv, S, D] keys -> [B, H, D] (float32)."""
    batch, heads, dim = query.shape
    valid = torch.ones(batch, 1, dtype=torch.bool, device=query.device)
    mask = attention_mask(query_positions[:, None], valid, key_positions, window)
    out = attend(query.float()[:, :, None], key.float(), value.float(), mask)
    return out.reshape(batch, heads, dim)


def check(out, expected, dtype):
    assert out.dtype == dtype and out.shape == expected.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    else:  # bf16 inputs and output; the reference runs in fp32 on the same bf16 values
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def make(batch, heads, kv_heads, length, dim, dtype, generator):
    q = torch.randn(batch, heads, dim, generator=generator) * dim ** -0.5
    k = torch.randn(batch, kv_heads, length, dim, generator=generator)
    v = torch.randn(batch, kv_heads, length, dim, generator=generator)
    return (t.to(DEVICE, dtype) for t in (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,kv_heads,groups,dim", [(1, 1, 1, 16), (3, 2, 4, 64), (1, 2, 2, 64), (3, 1, 2, 16)])
def test_static_prefix_only_reads_num_keys(batch, kv_heads, groups, dim, dtype):
    """Global layer, static cache: slot s holds position s; only slots < num_keys[b] may be read."""
    g = torch.Generator().manual_seed(batch * 100 + dim + groups)
    length = 97
    q, k, v = make(batch, kv_heads * groups, kv_heads, length + 1, dim, dtype, g)  # + trash slot in the buffer
    num_keys = torch.tensor([60, 97, 1][:batch], device=DEVICE)
    query_positions = num_keys - 1
    beyond = torch.arange(length, device=DEVICE)[None] >= num_keys[:, None]  # [B, S]
    # Past the bound: huge K/V at position 0, which the mask would show: reading them would wreck the output.
    k[:, :, :length].masked_fill_(beyond[:, None, :, None], HUGE)
    v[:, :, :length].masked_fill_(beyond[:, None, :, None], HUGE)
    positions = torch.arange(length, device=DEVICE).expand(batch, length).masked_fill(beyond, 0)
    out = decode_attention(q, k, v, positions, query_positions, num_keys=num_keys)
    expected = reference(q, k[:, :, :length], v[:, :, :length], positions.masked_fill(beyond, -1), query_positions)
    check(out, expected, dtype)


@pytest.mark.parametrize("new_key_only", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ring_window_out_of_order_and_empty_slots(dtype, new_key_only):
    """Sliding layer: ring slots out of order, some empty (-1), window cuts the oldest keys."""
    g = torch.Generator().manual_seed(1)
    batch, kv_heads, groups, dim, window = 3, 2, 2, 64, 32
    length = window + 1  # ring + this step's key, as KVCache.update hands them over
    q, k, v = make(batch, kv_heads * groups, kv_heads, length, dim, dtype, g)
    query_positions = torch.tensor([40, 5, 33], device=DEVICE)
    positions = torch.stack([torch.randperm(length, generator=g) + int(p) - length + 1 for p in query_positions])
    positions = positions.to(DEVICE).clamp(min=-1)  # row 1 has fewer tokens than slots: several empty slots
    positions[2, torch.randperm(length, generator=g)[:5]] = -1
    out = decode_attention(q, k, v, positions, query_positions, window=window, new_key_only=new_key_only)
    check(out, reference(q, k, v, positions, query_positions, window), dtype)


@pytest.mark.parametrize("new_key_only", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_pool_with_window_and_bound(dtype, new_key_only):
    """Paged layout: candidates are rows of a shuffled pool [Hkv, N, D] addressed by flat slot ids."""
    g = torch.Generator().manual_seed(2)
    batch, kv_heads, groups, dim, length, pool_size = 3, 2, 4, 16, 90, 400
    q = (torch.randn(batch, kv_heads * groups, dim, generator=g) * dim ** -0.5).to(DEVICE, dtype)
    k_pool = torch.randn(kv_heads, pool_size, dim, generator=g).to(DEVICE, dtype)
    v_pool = torch.randn(kv_heads, pool_size, dim, generator=g).to(DEVICE, dtype)
    slots = torch.randperm(pool_size, generator=g)[: batch * length].reshape(batch, length).to(DEVICE, torch.int32)
    positions = torch.arange(length, device=DEVICE).expand(batch, length).clone()
    positions[1, 50:] = -1
    query_positions = torch.tensor([89, 49, 70], device=DEVICE)
    num_keys = torch.tensor([90, 50, 71], device=DEVICE, dtype=torch.int32)
    key = k_pool[:, slots.long()].permute(1, 0, 2, 3)  # gathered [B, Hkv, S, D] for the reference
    value = v_pool[:, slots.long()].permute(1, 0, 2, 3)
    for window in (None, 40):
        out = decode_attention(q, k_pool, v_pool, positions, query_positions, window=window, slots=slots,
                               num_keys=num_keys, new_key_only=new_key_only)
        check(out, reference(q, key, value, positions, query_positions, window), dtype)


@pytest.mark.parametrize("new_key_only", [False, True])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_split_counts_agree(num_splits, new_key_only):
    """Any split count gives the same result: several blocks per split (the running max moves, old state is
    rescaled), and splits left empty by a small num_keys."""
    g = torch.Generator().manual_seed(3)
    batch, kv_heads, groups, dim, length = 2, 1, 2, 16, 300
    q, k, v = make(batch, kv_heads * groups, kv_heads, length, dim, torch.float32, g)
    k = k * torch.linspace(0.5, 2.0, length, device=DEVICE)[:, None]  # later blocks score higher
    positions = torch.arange(length, device=DEVICE).expand(batch, length)
    query_positions = torch.tensor([299, 10], device=DEVICE)
    num_keys = query_positions + 1
    out = decode_attention(q, k, v, positions, query_positions, num_keys=num_keys, num_splits=num_splits,
                           new_key_only=new_key_only)
    check(out, reference(q, k, v, positions, query_positions), torch.float32)


@pytest.mark.parametrize("num_splits", [1, 2])  # 1: the split kernel writes the output itself
def test_row_without_visible_key_is_zero(num_splits):
    g = torch.Generator().manual_seed(4)
    batch, kv_heads, groups, dim, length = 3, 1, 4, 16, 40
    q, k, v = make(batch, kv_heads * groups, kv_heads, length, dim, torch.float32, g)
    positions = torch.arange(length, device=DEVICE).expand(batch, length).clone()
    positions[0] = -1  # row 0: every slot empty
    positions[2] += 10  # row 2: every key lies after the query
    query_positions = torch.tensor([39, 39, 5], device=DEVICE)
    out = decode_attention(q, k, v, positions, query_positions, num_splits=num_splits)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    check(out[1:2], reference(q[1:2], k[1:2], v[1:2], positions[1:2], query_positions[1:2]), torch.float32)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_new_key_only_reads_the_new_key_after_the_wait(num_splits):
    """new_key_only: a split's first block is loaded early without the key at the query's position, which is loaded
    on its own afterwards. The new key sits in a first block (slot 3, row 0; slot 16, the second split's first block,
    row 1), in a later block (row 2) and past the bound (row 3: none). A large new key decides the output, so leaving
    it out cannot pass; the result is the plain kernel's to the bit."""
    g = torch.Generator().manual_seed(6)
    batch, kv_heads, groups, dim, length = 4, 2, 2, 16, 40
    q, k, v = make(batch, kv_heads * groups, kv_heads, length, dim, torch.float32, g)
    query_positions = torch.tensor([50, 60, 70, 30], device=DEVICE)
    new_slots = [3, 16, 37]
    positions = torch.stack([torch.arange(length) + p - length for p in query_positions.tolist()]).to(DEVICE)
    for row, slot in enumerate(new_slots):  # the slot the store just wrote holds the query's own position
        positions[row, slot] = query_positions[row]
        k[row, :, slot] = q[row, ::groups] * 20  # each kv head's first query head scores it far above the rest
    out = decode_attention(q, k, v, positions, query_positions, num_splits=num_splits, block_n=16,
                           new_key_only=True)
    check(out, reference(q, k, v, positions, query_positions), torch.float32)
    plain = decode_attention(q, k, v, positions, query_positions, num_splits=num_splits, block_n=16)
    assert torch.equal(out, plain)


def test_head_dim_256_strided_views():
    """D = 256 (its own block size), a non-contiguous query and K/V that are views of a longer buffer."""
    g = torch.Generator().manual_seed(5)
    batch, kv_heads, groups, dim, length = 1, 2, 2, 256, 20
    q_big, k_big, v_big = make(batch, 2 * kv_heads * groups, kv_heads, length + 8, dim, torch.bfloat16, g)
    q, k, v = q_big[:, ::2], k_big[:, :, :length + 1], v_big[:, :, :length + 1]
    positions = torch.arange(length, device=DEVICE)[None]
    query_positions = torch.tensor([length - 1], device=DEVICE)
    out = decode_attention(q, k, v, positions, query_positions, window=12)
    check(out, reference(q, k[:, :, :length], v[:, :, :length], positions, query_positions, 12), torch.bfloat16)


def test_decode_attention_reads_strided_query_positions():
    """A column of a [B, L] positions tensor (stride L) is read per row, not as if contiguous."""
    g = torch.Generator().manual_seed(3)
    q, k, v = make(2, 2, 1, 12, 16, torch.float32, g)
    key_positions = torch.tensor([list(range(12)), [-1] * 5 + list(range(7))], device=DEVICE)
    positions = torch.tensor([[9, 11], [4, 6]], device=DEVICE)  # the last column is the query's
    out = decode_attention(q, k, v, key_positions, positions[:, -1], window=4)
    check(out, reference(q, k, v, key_positions, positions[:, -1].contiguous(), window=4), torch.float32)


def test_keys_per_block_follow_the_wanted_splits(monkeypatch):
    """At D <= 256, where rows are split, tiles of 16 KiB at most, then blocks shrink (to 16 keys) until the
    candidates give the splits wanted (two programs per SM); a batch that needs no splits and the global layers keep
    the widest tile: the choices measured fastest in benchmarks/decode_attention.py."""
    from gemma4.kernels import attention
    monkeypatch.setattr(attention, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert attention._block_n(256, 2, 1, 513, cuda) == 16  # E2B sliding, batch 1: 33 splits
    assert attention._block_n(256, 2, 8, 1025, cuda) == 32  # 26B-A4B sliding (8 kv heads): 33 splits
    assert attention._block_n(256, 2, 16, 1025, cuda) == 32  # 31B sliding (16 kv heads): 17 splits of 16 KiB tiles
    assert attention._block_n(256, 1, 16, 1025, cuda) == 64  # the same on an fp8 cache: 64 keys are 16 KiB
    assert attention._block_n(512, 2, 1, 1088, cuda) == 32  # global layers keep 32
    assert attention._block_n(256, 2, 64 * 16, 1025, cuda) == 64  # 31B at batch 64: no splits, the widest tile
    assert attention._block_n(256, 2, 64, 513, cuda) == 32  # E2B at batch 64: 5 splits, 16 KiB tiles
    assert attention._block_n(256, 4, 1, 513, cuda) == 16  # fp32: 32 at most, then down to 16


def test_small_grids_take_more_warps(monkeypatch):
    """The split kernel runs SMALL_GRID_WARPS warps where its grid has at most SMALL_GRID_PROGRAMS programs (E2B at
    batch 1: one kv head, 33 or fewer splits), num_warps otherwise."""
    from gemma4.kernels import attention, tuning
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid[0] * grid[1], kwargs["num_warps"]))

    table = {**tuning.config("attention"), "SMALL_GRID_PROGRAMS": 8, "SMALL_GRID_WARPS": 8, "num_warps": 4}
    monkeypatch.setattr(attention, "_split_kernel", Recorder())
    monkeypatch.setattr(attention, "combine_splits", lambda *args, **kwargs: None)
    monkeypatch.setattr(attention, "config", lambda kernel, device=None: table)
    q, k, v = make(1, 2, 1, 64, 16, torch.float32, torch.Generator().manual_seed(0))
    positions = torch.arange(64, device=DEVICE).expand(1, 64)
    for splits in (8, 4, 9):
        decode_attention(q, k, v, positions, positions[:, -1].contiguous(), num_splits=splits, block_n=16)
    q, k, v = make(2, 4, 2, 64, 16, torch.float32, torch.Generator().manual_seed(0))
    decode_attention(q, k, v, positions.expand(2, 64), positions[0, -1:].expand(2).contiguous(), num_splits=4,
                     block_n=16)
    assert launches == [(8, 8), (4, 8), (9, 4), (16, 4)]
