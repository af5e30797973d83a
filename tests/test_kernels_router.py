"""The router kernels of gemma4.kernels.router against `Router.forward`'s eager ops.

Without a GPU they run on CPU tensors through Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gemma4.config import TextConfig  # noqa: E402
from gemma4.kernels.gemv import gemv  # noqa: E402
from gemma4.kernels.router import project_and_route, route, router_input  # noqa: E402
from gemma4.model.text import Router  # noqa: E402
from gemma4.options import override  # noqa: E402
from reference import FAMILIES  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
HIDDEN = 2816  # the 26B-A4B width: root_size = 2816 ** -0.5, rows of 2816 in a 4096-lane block
# The weights are fp32 whatever the scores' dtype; they differ from torch's only by the exp implementation and the
# summation orders of the softmax denominator and of the k chosen probabilities (CPU torch: reciprocal-multiply
# where the kernel divides): a few fp32 ulps of values <= max(per_expert_scale) < 2.
WEIGHT_TOL = dict(atol=1e-6, rtol=1e-6)


@pytest.fixture(autouse=True)
def eager_reference():
    """The references are the eager ops, also on CUDA, where RMSNorm.forward would otherwise take the norm kernel."""
    with override(kernels=False):
        yield


def make_router(hidden=HIDDEN, num_experts=128, top_k=8, dtype=torch.float32, seed=0) -> Router:
    data = dict(FAMILIES["26B-A4B"], hidden_size=hidden, num_experts=num_experts, top_k_experts=top_k)
    data.pop("model_type")
    router = Router(TextConfig.from_dict(data))
    torch.manual_seed(seed)
    with torch.no_grad():  # a scale around 1, projections of order 1, per-expert scales that differ
        router.scale.copy_(torch.randn(hidden) * 0.5 + 1.0)
        router.proj.weight.copy_(torch.randn(num_experts, hidden) * 2.0)
        router.per_expert_scale.copy_(torch.rand(num_experts) + 0.5)
    return router.to(DEVICE, dtype)


def eager_input(router: Router, x: torch.Tensor) -> torch.Tensor:
    """Router.forward up to its projection."""
    return router.norm(x) * router.scale * router.root_size


def eager_route(scores: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int):
    """Router.forward after its projection."""
    probs = scores.softmax(dim=-1, dtype=torch.float32)
    weights, experts = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * per_expert_scale[experts], experts


def distinct_scores(tokens, num_experts, dtype, seed=0):
    """[T, E] scores without ties in any row, exactly representable in bf16: distinct multiples of 1/32 in [-4, 4)
    in random order (a step of 1/32 keeps the probabilities distinct, a factor e^(1/32) apart)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack([torch.randperm(256, generator=g)[:num_experts] for _ in range(tokens)])
    return ((grid - 128) / 32).to(DEVICE, dtype)


def assert_no_ties(scores: torch.Tensor, top_k: int):
    """The experts are only well defined where the top k + 1 probabilities of each row differ."""
    top = scores.float().softmax(-1).topk(min(top_k + 1, scores.shape[-1]), dim=-1).values
    assert (top[:, :-1] > top[:, 1:]).all(), "ties among the top-k: pick another seed"


def assert_bf16_matches(out: torch.Tensor, ref: torch.Tensor):
    # As in test_kernels_norm: equal bits, except where the fp32 sum of squares (another summation order) puts a
    # value on the other side of a bf16 rounding boundary, at most 1% of the elements, by one ulp.
    diff = (out.float() - ref.float()).abs()
    assert (diff > 0).float().mean() <= 0.01, f"{int((diff > 0).sum())} of {diff.numel()} elements differ"
    assert diff.max() <= 2.0**-7 * ref.float().abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_router_input(dtype, tokens):
    router = make_router(dtype=dtype, seed=tokens)
    x = (torch.randn(tokens, HIDDEN + 64) * 4.0).to(DEVICE, dtype)[:, :HIDDEN]  # a row stride other than H
    out = router_input(x, router.scale, router.root_size, router.norm.eps)
    ref = eager_input(router, x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-8, rtol=2e-6)  # the norm statistic a few fp32 ulps apart
    else:
        assert_bf16_matches(out, ref)


def test_router_input_checks_what_it_claims():
    """bf16 bits equal to eager here; a rounding point left out, or root_size rounded to bf16 before the product
    (not how torch multiplies by a python float), would be seen."""
    router = make_router(dtype=torch.bfloat16, seed=5)
    x = (torch.randn(8, HIDDEN) * 4.0).to(DEVICE, torch.bfloat16)
    out = router_input(x, router.scale, router.root_size, router.norm.eps)
    assert torch.equal(out, eager_input(router, x))
    normed = router.norm(x)
    unrounded = (normed.float() * router.scale.float() * router.root_size).bfloat16()
    assert not torch.equal(out, unrounded)
    assert not torch.equal(out, normed * router.scale * torch.tensor(router.root_size, dtype=torch.bfloat16))
    assert not torch.equal(out, router.norm(x) * router.scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 64])
@pytest.mark.parametrize("num_experts, top_k", [(128, 8), (10, 3)])
def test_route(dtype, tokens, num_experts, top_k):
    scores = distinct_scores(tokens, num_experts, dtype, seed=tokens)
    if dtype == torch.float32:  # values off the 1/32 grid too
        scores = scores + torch.rand(tokens, num_experts, device=DEVICE) / 64
    assert_no_ties(scores, top_k)
    per_expert_scale = (torch.rand(num_experts) + 0.5).to(DEVICE, dtype)
    weights, experts = route(scores, per_expert_scale, top_k)
    ref_weights, ref_experts = eager_route(scores, per_expert_scale, top_k)
    assert weights.dtype == ref_weights.dtype == torch.float32 and experts.dtype == ref_experts.dtype == torch.int64
    assert weights.shape == experts.shape == (tokens, top_k)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(weights, ref_weights, **WEIGHT_TOL)


@pytest.mark.parametrize("num_experts, top_k", [(10, 10), (256, 8), (256, 256), (5, 1), (1, 1)])
def test_route_sizes(num_experts, top_k):
    """Any count of experts up to 256, any k up to all of them."""
    scores = distinct_scores(2, num_experts, torch.float32, seed=num_experts)
    per_expert_scale = (torch.rand(num_experts) + 0.5).to(DEVICE)
    weights, experts = route(scores, per_expert_scale, top_k)
    ref_weights, ref_experts = eager_route(scores, per_expert_scale, top_k)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(weights, ref_weights, **WEIGHT_TOL)


def test_route_checks_what_it_claims():
    """The order (by probability, not by index nor ascending), the renormalization and the per-expert scale all show
    in the comparison."""
    scores = distinct_scores(16, 128, torch.bfloat16, seed=7)
    per_expert_scale = (torch.rand(128) + 0.5).to(DEVICE, torch.bfloat16)
    weights, experts = route(scores, per_expert_scale, 8)
    ref_weights, ref_experts = eager_route(scores, per_expert_scale, 8)
    assert torch.equal(experts, ref_experts)
    assert not torch.equal(experts, experts.sort(dim=-1).values)
    assert not torch.equal(experts, experts.flip(-1))
    probs = scores.float().softmax(-1).gather(-1, experts)
    assert (probs[:, :-1] > probs[:, 1:]).all()
    wrong = [probs * per_expert_scale[experts],                          # not renormalized
             probs / probs.sum(-1, keepdim=True),                         # no per-expert scale
             ref_weights * per_expert_scale[experts].float().bfloat16()]  # scaled twice
    for w in wrong:
        assert not torch.allclose(weights, w, **WEIGHT_TOL)
    torch.testing.assert_close(weights, ref_weights, **WEIGHT_TOL)


def test_route_ties_lowest_index_first():
    """Equal probabilities (undefined order in torch.topk): lowest expert index first, documented behavior."""
    scores = torch.zeros(2, 10, device=DEVICE, dtype=torch.bfloat16)
    scores[1, 7] = scores[1, 2] = 1.0
    per_expert_scale = torch.ones(10, device=DEVICE, dtype=torch.bfloat16)
    weights, experts = route(scores, per_expert_scale, 4)
    assert experts.tolist() == [[0, 1, 2, 3], [2, 7, 0, 1]]
    torch.testing.assert_close(weights[0], torch.full((4,), 0.25, device=DEVICE))


def test_route_of_a_nan_or_inf_score():
    """A NaN or +inf score makes the whole softmax NaN, as in torch: NaN weights, and still k distinct experts (which
    ones torch leaves unspecified; here the lowest ids)."""
    scores = torch.randn(2, 10, device=DEVICE)
    scores[0, 3], scores[1, 5] = float("nan"), float("inf")
    weights, experts = route(scores, torch.ones(10, device=DEVICE), 4)
    assert weights.isnan().all()
    assert experts.tolist() == [[0, 1, 2, 3]] * 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_router_end_to_end(dtype):
    """route(proj(router_input(x))) is Router.forward, the way the model is to call them."""
    router = make_router(dtype=dtype, seed=7)  # a seed without ties among the bf16 scores' top 9 (many have some)
    x = (torch.randn(3, HIDDEN) * 4.0).to(DEVICE, dtype)
    ref_weights, ref_experts = router(x)
    scores = router.proj(router_input(x, router.scale, router.root_size, router.norm.eps))
    ref_scores = router.proj(eager_input(router, x))
    if dtype == torch.bfloat16:
        assert torch.equal(scores, ref_scores)
    else:
        torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)
    assert_no_ties(scores, router.top_k)
    weights, experts = route(scores, router.per_expert_scale, router.top_k)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(weights, ref_weights, **WEIGHT_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_experts, top_k", [(128, 8), (10, 3)])
def test_project_and_route(dtype, num_experts, top_k):
    """Batch 1, one launch: the scores of gemv.py's `gemv` (the same product code, the same bits) routed as `route`
    routes them, to the bit; twice in a row (the finished-programs counter re-armed); and the eager Router's experts
    (its weights too in fp32: in bf16 the kernels' scores may round to the neighbouring value, ~1% of a weight)."""
    router = make_router(num_experts=num_experts, top_k=top_k, dtype=dtype, seed=4)
    x = (torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(5)) * 4.0).to(DEVICE, dtype)
    scaled = router_input(x, router.scale, router.root_size, router.norm.eps)
    scores = gemv(scaled, router.proj.weight)
    assert_no_ties(scores, top_k)
    want = route(scores, router.per_expert_scale, top_k)
    for _ in range(2):
        weights, experts = project_and_route(scaled, router.proj.weight, router.per_expert_scale, top_k)
        assert torch.equal(experts, want[1]) and torch.equal(weights, want[0])
    ref_weights, ref_experts = router(x)
    assert torch.equal(experts, ref_experts)
    if dtype == torch.float32:
        torch.testing.assert_close(weights, ref_weights, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_project_and_route_of_the_attention_tail(dtype):
    """With attention_tail the routing GEMV's programs compute the router's input from the attention's product and
    the residual themselves, as residual_moe_norms computes it: the same weights and experts and the same experts'
    input, to the bit; the residual and the product are left as they were."""
    from gemma4.kernels.norm import residual_moe_norms
    router = make_router(dtype=dtype, seed=4)
    gen = torch.Generator().manual_seed(7)  # inputs without ties among the bf16 scores' top 9
    residual, y = ((torch.randn(1, HIDDEN, generator=gen) * 4.0).to(DEVICE, dtype) for _ in range(2))
    before = residual.clone(), y.clone()
    norm_weight, experts_weight = (torch.randn(HIDDEN, generator=gen).to(DEVICE, dtype) for _ in range(2))
    eps = 1e-6
    _, _, want_experts_in, scaled = residual_moe_norms(residual, y, norm_weight, eps, experts_weight, experts_weight,
                                                       router.scale, router.root_size)
    assert_no_ties(gemv(scaled, router.proj.weight), router.top_k)
    want = project_and_route(scaled, router.proj.weight, router.per_expert_scale, router.top_k)
    experts_in = torch.full_like(residual, float("nan"))
    tail = (residual, norm_weight, eps, experts_weight, router.scale, router.root_size, experts_in)
    weights, experts = project_and_route(y, router.proj.weight, router.per_expert_scale, router.top_k,
                                         attention_tail=tail)
    assert torch.equal(experts, want[1]) and torch.equal(weights, want[0])
    assert torch.equal(experts_in, want_experts_in)
    assert torch.equal(residual, before[0]) and torch.equal(y, before[1])


def test_empty_inputs_give_empty_outputs():
    """No tokens: empty results of the right shapes and dtypes, no launch."""
    x = torch.empty(0, 64, device=DEVICE, dtype=torch.bfloat16)
    assert router_input(x, torch.ones(64, device=DEVICE), 0.125, 1e-6).shape == (0, 64)
    weights, experts = route(torch.empty(0, 128, device=DEVICE), torch.ones(128, device=DEVICE), 8)
    assert weights.shape == experts.shape == (0, 8)
    assert weights.dtype == torch.float32 and experts.dtype == torch.int64
