"""The fused norm kernels of gemma4.kernels.norm against their eager PyTorch twins.

Without a GPU they run on CPU tensors through Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gemma4.kernels.norm import qk_norm_rope, residual_rms_norm, rms_norm  # noqa: E402
from gemma4.model.common import RMSNorm  # noqa: E402
from gemma4.model.text import apply_rope, rope_cos_sin, rope_inverse_frequencies  # noqa: E402
from gemma4.options import override  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
DTYPES = [torch.float32, torch.bfloat16]
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10_000.0},
    "proportional": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
}


@pytest.fixture(autouse=True)
def eager_reference():
    """The references are the eager ops, also on CUDA, where RMSNorm.forward would otherwise take these kernels."""
    with override(kernels=False):
        yield


def assert_matches(out: torch.Tensor, ref: torch.Tensor):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        return
    # The kernels round at the same points as the eager ops, so bf16 results are equal, except where their fp32 sum
    # of squares (another summation order, results a few fp32 ulps apart) puts a value on the other side of a bf16
    # rounding boundary: allow that on at most 1% of the elements, by one bf16 ulp of the largest magnitude.
    diff = (out.float() - ref.float()).abs()
    assert (diff > 0).float().mean() <= 0.01, f"{int((diff > 0).sum())} of {diff.numel()} elements differ"
    assert diff.max() <= 2.0**-7 * ref.float().abs().max()


def randn(*shape, dtype, scale=1.0, offset=0.0):
    return (torch.randn(*shape) * scale + offset).to(device=DEVICE, dtype=dtype)


def norm(dim: int, weight: torch.Tensor | None, eps: float = EPS) -> RMSNorm:
    module = RMSNorm(dim, eps, with_scale=weight is not None).to(DEVICE)
    if weight is not None:
        module.weight.data = weight  # in the model dtype, as loaded from a checkpoint
    return module


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [16, 32, 48, 256])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm(dtype, dim, with_weight):
    torch.manual_seed(dim)
    x = randn(2, 3, dim + 8, dtype=dtype, scale=3.0)[..., :dim]  # leading dims and a row stride other than dim
    weight = randn(dim, dtype=dtype, scale=0.5, offset=1.0) if with_weight else None
    out = rms_norm(x, weight, EPS)
    assert out.shape == x.shape
    assert_matches(out, norm(dim, weight)(x))


def test_eps_where_it_matters():
    """Inputs whose mean square is of the order of eps; the next norm has an eps of its own."""
    torch.manual_seed(2)
    x = randn(4, 48, dtype=torch.float32, scale=1e-3)
    assert_matches(rms_norm(x, None, EPS), norm(48, None)(x))
    assert_matches(qk_norm_rope(x.view(1, 2, 2, 48), None, EPS), eager_qk(x.view(1, 2, 2, 48), None, None, None))
    residual, weight = randn(4, 48, dtype=torch.float32, scale=1e-3), randn(48, dtype=torch.float32, scale=1e-3)
    new, next_normed = residual_rms_norm(residual, x, weight, EPS, next_weight=weight, next_eps=1e-4)
    ref_new, ref_next = eager_residual(residual, x, weight, None, weight, 1e-4)
    assert_matches(new, ref_new)
    assert_matches(next_normed, ref_next)


def eager_residual(residual, x, weight, scalar, next_weight, next_eps):
    """The DecoderLayer sequence the kernel fuses: x + post_norm(y), times layer_scalar, the next input_norm."""
    new = residual + norm(x.shape[-1], weight)(x)
    if scalar is not None:
        new = new * scalar
    return new, (norm(x.shape[-1], next_weight, next_eps)(new) if next_weight is not None else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [48, 256])
@pytest.mark.parametrize("with_scalar", [True, False])
@pytest.mark.parametrize("with_next", [True, False])
def test_residual_rms_norm(dtype, dim, with_scalar, with_next):
    torch.manual_seed(dim)
    residual = randn(2, 4, dim, dtype=dtype, scale=8.0)
    x = randn(2, 4, dim, dtype=dtype, scale=2.0)
    weight = randn(dim, dtype=dtype, scale=0.5, offset=1.0)
    scalar = torch.tensor([0.37], device=DEVICE, dtype=dtype) if with_scalar else None
    next_weight = randn(dim, dtype=dtype, scale=0.5, offset=1.0) if with_next else None
    new, next_normed = residual_rms_norm(residual, x, weight, EPS, scalar, next_weight, 1e-5)
    ref_new, ref_next = eager_residual(residual, x, weight, scalar, next_weight, 1e-5)
    assert_matches(new, ref_new)
    if with_next:
        assert_matches(next_normed, ref_next)
    else:
        assert next_normed is None


def test_residual_rms_norm_weightless():
    residual, x = randn(3, 32, dtype=torch.bfloat16, scale=4.0), randn(3, 32, dtype=torch.bfloat16)
    new, _ = residual_rms_norm(residual, x, None, EPS)
    assert_matches(new, eager_residual(residual, x, None, None, None, None)[0])


def test_residual_rms_norm_checks_what_it_claims():
    """The comparison is sharp enough to see a missing scalar or a rounding point left out."""
    torch.manual_seed(0)
    dtype, dim = torch.bfloat16, 256
    residual, x = randn(8, dim, dtype=dtype, scale=8.0), randn(8, dim, dtype=dtype, scale=2.0)
    weight = randn(dim, dtype=dtype, scale=0.5, offset=1.0)
    scalar = torch.tensor([0.37], device=DEVICE, dtype=dtype)
    new, _ = residual_rms_norm(residual, x, weight, EPS, scalar)
    assert not torch.equal(new, eager_residual(residual, x, weight, None, None, None)[0])
    # The norm's output rounded to bf16 before the add, as eager does: skipping that rounding changes results.
    unrounded = norm(dim, weight.float())(x.float())
    assert not torch.equal(new, ((residual.float() + unrounded).to(dtype) * scalar))
    assert torch.equal(new, eager_residual(residual, x, weight, scalar, None, None)[0])


def eager_qk(x, weight, cos, sin):
    """Attention.forward's path: q/k_norm, RoPE, then [B, L, H, D] -> [B, H, L, D]."""
    normed = norm(x.shape[-1], weight)(x)
    return (apply_rope(normed, cos, sin) if cos is not None else normed).transpose(1, 2)


def left_padded_rope(batch, length, dim, rope, dtype, pads):
    """cos/sin [B, L, 1, D] for a left-padded batch: row b starts at position 0 after pads[b] pad tokens."""
    pads = torch.tensor(pads)[:, None]
    positions = (torch.arange(length)[None, :] - pads).clamp(min=0).expand(batch, length)
    cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(dim, ROPES[rope]), dtype)
    return cos.to(DEVICE), sin.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [16, 48, 256])
@pytest.mark.parametrize("rope", ["default", "proportional", None])
@pytest.mark.parametrize("with_weight", [True, False])
def test_qk_norm_rope(dtype, dim, rope, with_weight):
    torch.manual_seed(dim)
    batch, length, heads = 2, 3, 2
    # A view of one slice of a fused projection's output: rows of D are contiguous, the other strides are not.
    projection = randn(batch, length, 3 * heads * dim, dtype=dtype, scale=3.0)
    x = projection[..., heads * dim:2 * heads * dim].view(batch, length, heads, dim)
    weight = randn(dim, dtype=dtype, scale=0.5, offset=1.0) if with_weight else None
    cos = sin = None
    if rope is not None:
        cos, sin = left_padded_rope(batch, length, dim, rope, dtype, pads=[2, 0])
    out = qk_norm_rope(x, weight, EPS, cos, sin)
    assert out.is_contiguous()
    assert_matches(out, eager_qk(x, weight, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope_decode_global_layer(dtype):
    """A decode step (L=1) of a 512-wide global head, cos/sin given as [B, L, D] and for one batch row only."""
    torch.manual_seed(1)
    batch, heads, dim = 3, 2, 512
    x = randn(batch, 1, heads, dim, dtype=dtype, scale=3.0)
    weight = randn(dim, dtype=dtype, scale=0.5, offset=1.0)
    cos, sin = rope_cos_sin(torch.tensor([[7]]), rope_inverse_frequencies(dim, ROPES["proportional"]), dtype)
    cos, sin = cos[:, :, 0].to(DEVICE), sin[:, :, 0].to(DEVICE)  # [1, 1, D]: broadcast over the batch
    out = qk_norm_rope(x, weight, EPS, cos, sin)
    assert_matches(out, eager_qk(x, weight, cos[:, :, None], sin[:, :, None]))
    assert not torch.equal(out, qk_norm_rope(x, weight, EPS))  # the rotation did something


def test_empty_inputs_give_empty_outputs():
    """No rows (e.g. a batch with nothing to normalize): empty results of the right shapes, no launch."""
    x = torch.empty(0, 3, 16, device=DEVICE)
    w = torch.ones(16, device=DEVICE)
    assert rms_norm(x, w, 1e-6).shape == (0, 3, 16)
    new, nxt = residual_rms_norm(x, x, w, 1e-6, next_weight=w)
    assert new.shape == nxt.shape == (0, 3, 16)
    assert qk_norm_rope(torch.empty(0, 1, 2, 16, device=DEVICE), w, 1e-6).shape == (0, 2, 1, 16)


from gemma4.kernels.moe import moe_residual_norm  # noqa: E402
from gemma4.model.fused import add_normed  # noqa: E402


def eager_moe_residual(residual, dense, sparse, dense_weight, sparse_weight, weight, scalar):
    """DecoderLayer's MoE tail: the two branch norms, their sum, then add_normed with the layer scalar."""
    dim = residual.shape[-1]
    combined = norm(dim, dense_weight)(dense) + norm(dim, sparse_weight)(sparse)
    return add_normed(residual, combined, norm(dim, weight), scalar=scalar)[0]


def moe_inputs(shape, dtype, seed):
    """residual, dense (a strided view), sparse, the three norm weights: branches of different scales, as the dense
    MLP's and the experts' outputs are."""
    torch.manual_seed(seed)
    dim = shape[-1]
    residual = randn(*shape, dtype=dtype, scale=8.0)
    dense = randn(*shape[:-1], dim + 16, dtype=dtype, scale=3.0)[..., 8:dim + 8]
    sparse = randn(*shape, dtype=dtype, scale=0.5)
    weights = [randn(dim, dtype=dtype, scale=0.5, offset=1.0) for _ in range(3)]
    return residual, dense, sparse, *weights


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 48), (1, 2816), (3, 2816)])
@pytest.mark.parametrize("with_scalar", [True, False])
def test_moe_residual_norm(dtype, shape, with_scalar):
    residual, dense, sparse, dense_weight, sparse_weight, weight = moe_inputs(shape, dtype, seed=shape[-2])
    scalar = torch.tensor([0.37], device=DEVICE, dtype=dtype) if with_scalar else None
    next_weight = randn(shape[-1], dtype=dtype, scale=0.5, offset=1.0)
    out, next_normed = moe_residual_norm(residual, dense, sparse, dense_weight, sparse_weight, weight, EPS, scalar,
                                         next_weight, 1e-5)
    expected = eager_moe_residual(residual, dense, sparse, dense_weight, sparse_weight, weight, scalar)
    assert_matches(out, expected)
    # The next layer's input norm of the (rounded, scaled) result.
    assert_matches(next_normed, norm(shape[-1], next_weight, 1e-5)(expected))
    assert moe_residual_norm(residual, dense, sparse, dense_weight, sparse_weight, weight, EPS, scalar)[1] is None


def test_moe_residual_norm_checks_what_it_claims():
    """bf16 bits equal to eager here; each rounding point left out, or the scalar, would be seen."""
    dtype, dim = torch.bfloat16, 2816
    residual, dense, sparse, dense_weight, sparse_weight, weight = moe_inputs((4, dim), dtype, seed=0)
    scalar = torch.tensor([0.37], device=DEVICE, dtype=dtype)
    out = moe_residual_norm(residual, dense, sparse, dense_weight, sparse_weight, weight, EPS, scalar)[0]
    assert torch.equal(out, eager_moe_residual(residual, dense, sparse, dense_weight, sparse_weight, weight, scalar))
    assert not torch.equal(out, eager_moe_residual(residual, dense, sparse, dense_weight, sparse_weight, weight, None))
    fp32 = [t.float() for t in (dense, sparse, dense_weight, sparse_weight, weight)]
    d, s = norm(dim, fp32[2])(fp32[0]), norm(dim, fp32[3])(fp32[1])
    unrounded_branches = (d + s).to(dtype)  # the branch norms summed before rounding
    unrounded_sum = d.to(dtype).float() + s.to(dtype).float()  # the sum kept in fp32 for the outer norm
    for combined in (unrounded_branches, unrounded_sum):
        wrong = (residual.float() + norm(dim, fp32[4])(combined.float())).to(dtype) * scalar
        assert not torch.equal(out, wrong)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k", [((2, 3, 48), 2), ((5, 2816), 8)])
def test_moe_residual_norm_sums_expert_pairs(dtype, shape, k):
    """`sparse` as the experts' unsummed pairs gives the bits of combining them first (ExpertPairs.combine), and the
    pairs are really read through their slots and weights (a permuted slot or another weight changes the result)."""
    from gemma4.kernels.moe import ExpertPairs
    residual, dense, _, dense_weight, sparse_weight, weight = moe_inputs(shape, dtype, seed=k)
    tokens, dim = residual.numel() // shape[-1], shape[-1]
    g = torch.Generator().manual_seed(k)
    y = (torch.randn(tokens * k, dim, generator=g) * 0.5).to(DEVICE, dtype)
    slots = torch.randperm(tokens * k, generator=g).to(DEVICE)
    pair_weights = (torch.rand(tokens, k, generator=g) + 0.1).to(DEVICE)
    scalar = torch.tensor([0.37], device=DEVICE, dtype=dtype)
    next_weight = randn(dim, dtype=dtype, scale=0.5, offset=1.0)

    def tail(sparse):
        return moe_residual_norm(residual, dense, sparse, dense_weight, sparse_weight, weight, EPS, scalar,
                                 next_weight, 1e-5)

    pairs = ExpertPairs(y, slots, pair_weights)
    summed = pairs.combine().reshape(shape)
    for got, expected in zip(tail(pairs), tail(summed)):
        assert torch.equal(got, expected)
    assert_matches(tail(pairs)[0], eager_moe_residual(residual, dense, summed, dense_weight, sparse_weight, weight,
                                                      scalar))
    for wrong in (ExpertPairs(y, slots.roll(1), pair_weights), ExpertPairs(y, slots, pair_weights.flip(-1))):
        assert not torch.equal(tail(wrong)[0], tail(pairs)[0])


def test_moe_residual_norm_empty():
    x, w = torch.empty(0, 16, device=DEVICE), torch.ones(16, device=DEVICE)
    assert moe_residual_norm(x, x, x, w, w, w, EPS, torch.ones(1, device=DEVICE))[0].shape == (0, 16)


from gemma4.kernels.norm import qkv_norm_rope_store  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["buffers", "pools"])
@pytest.mark.parametrize("k_equals_v", [False, True])
def test_qkv_norm_rope_store(dtype, layout, k_equals_v):
    """The query, and the key and value written at their slots, equal qk_norm_rope's (v: weightless, no RoPE);
    every other cache slot keeps its contents. Two tokens per row, one of them sent to a trash slot."""
    torch.manual_seed(3)
    batch, length, q_heads, kv_heads, dim, slots_per_row = 2, 2, 4, 2, 48, 6
    widths = [q_heads * dim, kv_heads * dim] + ([] if k_equals_v else [kv_heads * dim])
    projection = randn(batch, length, sum(widths), dtype=dtype, scale=3.0)
    q, k, *v = projection.split(widths, dim=-1)  # views of one fused projection, as on the GPU
    v = v[0] if v else None
    q_weight, k_weight = (randn(dim, dtype=dtype, scale=0.5, offset=1.0) for _ in range(2))
    cos, sin = left_padded_rope(batch, length, dim, "default", dtype, pads=[1, 0])
    slots = torch.tensor([[5, 2], [0, 3]], device=DEVICE)  # row 0's first token is padding: the trash slot 5
    if layout == "buffers":
        key_cache = randn(batch, kv_heads, slots_per_row, dim, dtype=dtype)
    else:  # one pool for both rows: row b's slot s is pool row b * slots_per_row + s
        key_cache = randn(kv_heads, batch * slots_per_row, dim, dtype=dtype)
        slots = slots + torch.arange(batch, device=DEVICE)[:, None] * slots_per_row
    value_cache = torch.randn_like(key_cache)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()

    query = qkv_norm_rope_store(q, k, v, q_weight, k_weight, EPS, cos, sin, key_cache, value_cache, slots)

    assert_matches(query, eager_qk(q.view(batch, length, q_heads, dim), q_weight, cos, sin))
    new_k = eager_qk(k.view(batch, length, kv_heads, dim), k_weight, cos, sin)  # [B, Hkv, L, D]
    new_v = eager_qk((v if v is not None else k).view(batch, length, kv_heads, dim), None, None, None)
    for b in range(batch):
        for t in range(length):
            if layout == "buffers":
                expected_k[b, :, slots[b, t]], expected_v[b, :, slots[b, t]] = new_k[b, :, t], new_v[b, :, t]
            else:
                expected_k[:, slots[b, t]], expected_v[:, slots[b, t]] = new_k[b, :, t], new_v[b, :, t]
    assert_matches(key_cache, expected_k)
    assert_matches(value_cache, expected_v)


from gemma4.kernels.norm import residual_moe_norms  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_moe_norms(dtype):
    """A MoE layer's attention tail: the residual add, then the dense MLP's, the experts' and the router's inputs."""
    from test_kernels_router import make_router
    dim = 2816
    residual, attn, _, weight, mlp_weight, experts_weight = moe_inputs((3, dim), dtype, seed=5)
    router = make_router(hidden=dim, dtype=dtype)
    new, h, expert_input, router_input = residual_moe_norms(residual, attn, weight, EPS, mlp_weight, experts_weight,
                                                            router.scale, router.root_size)
    expected, expected_h = add_normed(residual, attn, norm(dim, weight), next_norm=norm(dim, mlp_weight))
    assert_matches(new, expected)
    assert_matches(h, expected_h)
    assert_matches(expert_input, norm(dim, experts_weight)(expected))
    assert_matches(router_input, router.scaled_input(expected))
