"""The Triton MoE decode kernels (gemma4.kernels.moe) equal the torch expert paths of `Experts`.

Without a GPU they run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1 before Triton is imported)."""

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from gemma4.config import TextConfig  # noqa: E402
from gemma4.kernels import moe  # noqa: E402
from gemma4.kernels.moe import moe_experts  # noqa: E402
from gemma4.kernels.rounding import round_to  # noqa: E402
from gemma4.kernels.tuning import config  # noqa: E402
from gemma4.model.text import Experts  # noqa: E402
from gemma4.options import override  # noqa: E402
from reference import FAMILIES  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_experts(hidden=64, width=32, num_experts=8, activation="gelu_pytorch_tanh", dtype=torch.float32, seed=0):
    data = dict(FAMILIES["26B-A4B"], hidden_size=hidden, moe_intermediate_size=width, num_experts=num_experts,
                hidden_activation=activation)
    data.pop("model_type")
    module = Experts(TextConfig.from_dict(data))
    torch.manual_seed(seed)
    with torch.no_grad():  # fan-in scaled: outputs of order 1, so absolute tolerances mean something
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return module.to(DEVICE, dtype)


def routing(tokens, k, num_experts, seed=0):
    """Router-like routing: k distinct experts per token, fp32 weights."""
    g = torch.Generator().manual_seed(seed)
    experts = torch.rand(tokens, num_experts, generator=g).argsort(dim=-1)[:, :k]
    weights = torch.rand(tokens, k, generator=g) + 0.1
    return weights.to(DEVICE), experts.to(DEVICE)


def run(module, x, weights, experts, activation="gelu_pytorch_tanh"):
    return moe_experts(x, weights, experts, module.gate_up_proj, module.down_proj, activation)


def build(tokens, k, dtype=torch.float32, **kwargs):
    module = make_experts(dtype=dtype, **kwargs)
    torch.manual_seed(tokens)
    x = torch.randn(tokens, module.down_proj.shape[1], device=DEVICE).to(dtype)
    return module, x, *routing(tokens, k, module.down_proj.shape[0], seed=tokens)


@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "silu"])
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_fp32_equals_torch_paths(tokens, k, activation):
    module, x, weights, experts = build(tokens, k, activation=activation)
    with torch.no_grad():
        out = run(module, x, weights, experts, activation)
        assert out.dtype == x.dtype and out.shape == x.shape
        torch.testing.assert_close(out, module.forward_loop(x, weights, experts), rtol=0, atol=1e-5)
        torch.testing.assert_close(out, module.forward_gathered(x, weights, experts), rtol=0, atol=1e-5)


@pytest.mark.parametrize("down_block_w", [16, 1024])
@pytest.mark.parametrize("tokens", [1, 3])
def test_non_power_of_two_sides(tokens, down_block_w, monkeypatch):
    """Masked rows and columns in both kernels, and several steps of each loop over columns (with a ragged tail);
    with wide down blocks and one token, the down kernel's single load of all k (= 3, padded to 4) experts' rows."""
    for name, value in dict(GU_BLOCK_W=16, GU_BLOCK_H=32, DOWN_BLOCK_H=32, DOWN_BLOCK_W=down_block_w).items():
        monkeypatch.setitem(config("moe", torch.device(DEVICE)), name, value)
    module, x, weights, experts = build(tokens, 3, hidden=48, width=24)
    with torch.no_grad():
        torch.testing.assert_close(run(module, x, weights, experts), module.forward_loop(x, weights, experts),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 8])
def test_bf16_equals_gathered(tokens):
    module, x, weights, experts = build(tokens, 4, dtype=torch.bfloat16)
    with torch.no_grad():
        out = run(module, x, weights, experts)
        ref = module.forward_gathered(x, weights, experts)
    assert_same_rounding(out, ref)


def assert_same_rounding(out, ref):
    """bf16 outputs of paths with the same rounding points: only the fp32 summation order differs, which can flip a
    rounded intermediate (gate, up, h, y) by one bf16 ulp (2^-8 relative) and so the output by a few ulps of its
    magnitude (~1 here). Most elements agree exactly."""
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=2**-6)
    assert (out == ref).float().mean() > 0.9


def test_bf16_rounding_is_round_to_nearest_even():
    """The kernels round fp32 -> bf16 by hand (the interpreter's cast truncates): same bits as torch, ties included."""
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.3895e38, float("inf"), float("nan"), 0.0, -0.0])
    src = torch.cat([torch.randn(248) * 10.0 ** torch.randint(-30, 30, (248,)), ties]).to(DEVICE)
    dst = torch.empty_like(src)
    _round_bf16_kernel[(1,)](src, dst, src.numel())
    torch.testing.assert_close(dst, src.bfloat16().float(), rtol=0, atol=0, equal_nan=True)


@triton.jit
def _round_bf16_kernel(src, dst, N: tl.constexpr):
    tl.store(dst + tl.arange(0, N), round_to(tl.load(src + tl.arange(0, N)), tl.bfloat16))


def test_repeated_experts():
    """Every token on the same experts, and one token choosing an expert twice: each pair is independent."""
    module, x, weights, _ = build(5, 3)
    experts = torch.tensor([[2, 5, 7]] * 4 + [[5, 5, 1]], device=DEVICE)
    with torch.no_grad():
        out = run(module, x, weights, experts)
        torch.testing.assert_close(out, module.forward_gathered(x, weights, experts), rtol=0, atol=1e-5)
        torch.testing.assert_close(out, module.forward_loop(x, weights, experts), rtol=0, atol=1e-5)


def test_routing_matters():
    """The kernels follow the expert ids they are given: other ids, other output, equal to torch's for those."""
    module, x, weights, experts = build(3, 2)
    wrong = (experts + 1) % module.down_proj.shape[0]
    with torch.no_grad():
        right_out, wrong_out = run(module, x, weights, experts), run(module, x, weights, wrong)
        swapped_out = run(module, x, weights, experts.flip(1))  # same experts, weights on the other one
        assert (right_out - wrong_out).abs().max() > 1e-2
        assert (right_out - swapped_out).abs().max() > 1e-2
        torch.testing.assert_close(wrong_out, module.forward_loop(x, weights, wrong), rtol=0, atol=1e-5)


def test_unsupported_activation():
    module, x, weights, experts = build(1, 2)
    with pytest.raises(ValueError, match="unsupported activation"):
        moe_experts(x, weights, experts, module.gate_up_proj, module.down_proj, "relu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture():
    module, x, weights, experts = build(2, 4, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = run(module, x, weights, experts)  # also compiles the kernels before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run(module, x, weights, experts)
        experts.copy_(experts.flip(1))  # new routing, replayed without recapture
        graph.replay()
        torch.testing.assert_close(out, run(module, x, weights, experts), rtol=0, atol=0)
        assert not torch.equal(out, expected)


def eager_combine(y, order, weights):
    """forward_grouped's eager tail: weight each sorted row, back to token order, sum each token's k rows."""
    tokens, k = weights.shape
    weighted = (y * weights.reshape(-1)[order, None]).to(y.dtype)
    return torch.empty_like(weighted).index_copy_(0, order, weighted).view(tokens, k, -1).sum(dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,k,hidden", [(1, 8, 64), (5, 3, 100), (7, 8, 4100)])
def test_combine_pairs_equals_eager(tokens, k, hidden, dtype):
    """Ragged column tails (100, 4100 > one CPU block), one token, and k = 8 as in the 26B-A4B."""
    torch.manual_seed(tokens)
    y = torch.randn(tokens * k, hidden, device=DEVICE).to(dtype)
    weights, experts = routing(tokens, k, 16, seed=tokens)
    order = experts.reshape(-1).argsort(stable=True)
    out = moe.combine_pairs(y, order, weights)
    expected = eager_combine(y, order, weights)
    assert out.dtype == dtype and out.shape == (tokens, hidden)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    else:  # same rounding points; the fp32 sum over k may run in another order: one ulp at most
        torch.testing.assert_close(out.float(), expected.float(), rtol=2**-8, atol=0)
        assert (out == expected).float().mean() > 0.99
    # The permutation matters: the identity order would sum other rows.
    assert (out.float() - eager_combine(y, torch.arange(tokens * k, device=DEVICE), weights).float()).abs().max() > 0.1


def test_grouped_path_takes_combine_kernel(monkeypatch):
    """Experts.forward_grouped with the kernels on (CPU: forced) equals its eager form."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    from gemma4 import kernels
    module, x, weights, experts = build(6, 4)
    calls = []
    real = moe.combine_pairs
    monkeypatch.setattr(moe, "combine_pairs", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        with override(kernels=False):  # the eager tail, also on CUDA
            expected = module.forward_grouped(x, weights, experts)
        with override(kernels=True), kernels.force():
            out = module.forward_grouped(x, weights, experts)
    assert calls == [1]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


# The sorted-pairs kernels (serving-sized batches): the pairs sorted by expert, each expert's tile read once for all
# of its pairs.

@pytest.mark.parametrize("tokens,k,num_experts", [(1, 2, 8), (12, 4, 8), (40, 3, 8), (100, 8, 128), (3, 2, 64)])
def test_sort_pairs_is_a_stable_sort_by_expert(tokens, k, num_experts):
    """Unused experts (count 0), a pair count that is not a power of 2, experts chosen by more pairs than others."""
    _, experts = routing(tokens, k, num_experts, seed=tokens)
    order, slots, counts, starts = moe.sort_pairs(experts, num_experts)
    chosen = experts.reshape(-1)
    assert torch.equal(order.long(), chosen.argsort(stable=True))
    assert torch.equal(slots.long()[order.long()], torch.arange(tokens * k, device=DEVICE))
    expected_counts = torch.bincount(chosen, minlength=num_experts)
    assert torch.equal(counts.long(), expected_counts)
    assert torch.equal(starts.long(), expected_counts.cumsum(0) - expected_counts)


def run_sorted(module, x, weights, experts, activation="gelu_pytorch_tanh"):
    return moe.sorted_experts(x, weights, experts, module.gate_up_proj, module.down_proj, activation)


@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "silu"])
@pytest.mark.parametrize("tokens,k", [(1, 2), (12, 4), (40, 3)])
def test_sorted_fp32_equals_torch_paths(tokens, k, activation):
    """40 x 3 pairs over 8 experts: ~15 each, some experts past one 16-row block (a second pass over their tiles)."""
    module, x, weights, experts = build(tokens, k, activation=activation)
    counts = torch.bincount(experts.reshape(-1), minlength=8)
    with torch.no_grad():
        out = run_sorted(module, x, weights, experts, activation)
        assert out.dtype == x.dtype and out.shape == x.shape
        torch.testing.assert_close(out, module.forward_loop(x, weights, experts), rtol=0, atol=1e-5)
    if tokens == 40:
        assert counts.max() > 16


def test_sorted_ragged_tiles(monkeypatch):
    """Sides that are not multiples of the tiles, several steps over each reduction, an expert nobody chose."""
    for name, value in dict(SORTED_GU_BLOCK_N=16, SORTED_GU_BLOCK_K=16, SORTED_DOWN_BLOCK_N=16,
                            SORTED_DOWN_BLOCK_K=16).items():
        monkeypatch.setitem(config("moe", torch.device(DEVICE)), name, value)
    module, x, weights, experts = build(9, 3, hidden=48, width=24)
    experts[experts == 5] = 6
    with torch.no_grad():
        torch.testing.assert_close(run_sorted(module, x, weights, experts), module.forward_loop(x, weights, experts),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("tokens", [8, 24])
def test_sorted_bf16_equals_grouped_rounding(tokens):
    """Same rounding points as the grouped GEMMs' eager path (each weighted pair rounded before the sum): outputs
    agree to a few ulps, most exactly."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    module, x, weights, experts = build(tokens, 4, dtype=torch.bfloat16)
    with torch.no_grad(), override(kernels=False):  # the eager tail of forward_grouped
        out = run_sorted(module, x, weights, experts)
        ref = module.forward_grouped(x, weights, experts)
    assert_same_rounding(out, ref)


def test_sorted_routing_matters():
    module, x, weights, experts = build(10, 2)
    wrong = (experts + 1) % module.down_proj.shape[0]
    experts[0] = torch.tensor([3, 3])  # a token choosing one expert twice: two independent pairs
    with torch.no_grad():
        right_out, wrong_out = run_sorted(module, x, weights, experts), run_sorted(module, x, weights, wrong)
        assert (right_out - wrong_out).abs().max() > 1e-2
        torch.testing.assert_close(right_out, module.forward_loop(x, weights, experts), rtol=0, atol=1e-5)
        torch.testing.assert_close(wrong_out, module.forward_loop(x, weights, wrong), rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", ["sorted", "grouped"])
def test_uncombined_pairs_combine_to_the_summed_output(monkeypatch, path):
    """Experts.forward(combine=False) on the kernel paths returns the unsummed ExpertPairs (for the fused MoE tail);
    their combine() is the bits of the summed output."""
    if path == "grouped" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    from gemma4 import kernels
    module, x, weights, experts = build(12, 4)
    monkeypatch.setattr(module, "path", path)
    with torch.no_grad(), override(kernels=True), kernels.force():
        pairs = module(x, weights, experts, combine=False)
        summed = module(x, weights, experts)
    assert isinstance(pairs, moe.ExpertPairs) and pairs.y.shape == (12 * 4, x.shape[1])
    assert torch.equal(pairs.combine(), summed)


def test_experts_auto_path_by_batch(monkeypatch):
    """With the kernels on: up to KERNEL_MAX_PAIRS the decode kernels, then the sorted kernels, past
    SORTED_MAX_PAIRS the grouped GEMMs (or the loop on CPU)."""
    from gemma4 import kernels
    module, x, weights, experts = build(20, 4)
    taken = []
    for name in ("forward_kernel", "forward_sorted", "forward_grouped", "forward_loop"):
        monkeypatch.setattr(module, name, lambda *a, name=name: taken.append(name))
    monkeypatch.setattr(module, "KERNEL_MAX_PAIRS", 64)
    monkeypatch.setattr(module, "SORTED_MAX_PAIRS", 72)
    with kernels.force():
        for tokens in (16, 17, 18, 19):  # 64, 68, 72, 76 pairs
            module(x[:tokens], weights[:tokens], experts[:tokens])
    large = "forward_grouped" if x.is_cuda else "forward_loop"
    assert taken == ["forward_kernel", "forward_sorted", "forward_sorted", large]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_sorted_cuda_graph_capture():
    module, x, weights, experts = build(32, 8, dtype=torch.bfloat16, num_experts=16)
    with torch.no_grad():
        expected = run_sorted(module, x, weights, experts)  # also compiles the kernels before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run_sorted(module, x, weights, experts)
        experts.copy_((experts + 3) % 16)  # new routing, replayed without recapture
        graph.replay()
        torch.testing.assert_close(out, run_sorted(module, x, weights, experts), rtol=0, atol=0)
        assert not torch.equal(out, expected)
