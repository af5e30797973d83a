"""The MoE kernels (gemma4.kernels.moe) on 8-bit per-channel quantized expert weights (fp8 e4m3, int8) equal the
same kernels and the torch expert paths on the dequantized weights.

Without a GPU they run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1 before Triton is imported)."""

import pytest
import torch

triton = pytest.importorskip("triton")

from gemma4.config import TextConfig  # noqa: E402
from gemma4.kernels import moe  # noqa: E402
from gemma4.kernels.tuning import config  # noqa: E402
from gemma4.model.quantized import QuantizedWeight, Scheme, quantize  # noqa: E402
from gemma4.model.text import Experts  # noqa: E402
from gemma4.options import override  # noqa: E402
from reference import FAMILIES  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCHEMES = {"fp8": Scheme("float", 8, "channel"), "int8": Scheme("int", 8, "channel")}


class Quantized:
    """Random experts quantized per channel: gate_up [E, 2W, H] and down [E, H, W] QuantizedWeights (the scales in the
    model dtype, as `quantize` makes them on load), and their dequantized twin, an `Experts` module.

    `exact_scales`: the scales rounded to powers of two, so that every dequantized weight q * s is exact in bf16 (and
    the kernels' partial sums are the twin's times the scale, exactly)."""

    def __init__(self, scheme, dtype=torch.float32, hidden=64, width=32, num_experts=8,
                 activation="gelu_pytorch_tanh", seed=0, exact_scales=False):
        data = dict(FAMILIES["26B-A4B"], hidden_size=hidden, moe_intermediate_size=width, num_experts=num_experts,
                    hidden_activation=activation)
        data.pop("model_type")
        self.twin = Experts(TextConfig.from_dict(data)).to(DEVICE, dtype)
        torch.manual_seed(seed)
        with torch.no_grad():  # fan-in scaled: outputs of order 1
            for name in ("gate_up_proj", "down_proj"):
                param = getattr(self.twin, name)
                weight = (torch.randn(param.shape, device=DEVICE) * param.shape[-1] ** -0.5).to(dtype)
                quantized = quantize(weight, SCHEMES[scheme])
                if exact_scales:
                    scale = torch.exp2(quantized.scale.float().log2().round()).to(quantized.scale.dtype)
                    quantized = QuantizedWeight(quantized.values, scale, quantized.scheme)
                setattr(self, name, quantized)
                param.copy_(quantized.dequantize(dtype))
        self.activation = activation

    def decode(self, x, weights, experts):
        return moe.moe_experts(x, weights, experts, self.gate_up_proj, self.down_proj, self.activation)

    def sorted(self, x, weights, experts, combine=True):
        return moe.sorted_experts(x, weights, experts, self.gate_up_proj, self.down_proj, self.activation, combine)

    def twin_decode(self, x, weights, experts):
        return moe.moe_experts(x, weights, experts, self.twin.gate_up_proj, self.twin.down_proj, self.activation)

    def twin_sorted(self, x, weights, experts, combine=True):
        return moe.sorted_experts(x, weights, experts, self.twin.gate_up_proj, self.twin.down_proj, self.activation,
                                  combine)


def build(scheme, tokens, k, dtype=torch.float32, **kwargs):
    experts_module = Quantized(scheme, dtype, **kwargs)
    num_experts, hidden = experts_module.twin.down_proj.shape[:2]
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=g).to(DEVICE, dtype)
    experts = torch.rand(tokens, num_experts, generator=g).argsort(dim=-1)[:, :k].to(DEVICE)  # k distinct experts
    weights = (torch.rand(tokens, k, generator=g) + 0.1).to(DEVICE)
    return experts_module, x, weights, experts


def assert_fp32_close(out, ref):
    """fp32: the kernels scale each row's dot product once, the twin rounds each q * s to fp32 and sums in another
    order: relative differences of a few fp32 ulps."""
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def assert_same_rounding(out, ref):
    """bf16, as test_kernels_moe's bf16 tests: the same rounding points, only the fp32 summation order differs, which
    can flip a rounded intermediate by one bf16 ulp and so the output by a few ulps of its magnitude (~1). Most
    elements agree exactly."""
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=2**-6)
    assert (out == ref).float().mean() > 0.9


def assert_rounded_weights_close(out, ref):
    """bf16 against the twin whose weights q * s are rounded to bf16 (2^-9 relative each) where the kernels' are
    exact: every sum moves by up to about an ulp, so most rounded intermediates and outputs differ by one; the k
    pairs' flips can add up to a few ulps of the magnitudes summed (~1 -> 2^-5); on average about an ulp (2^-8
    relative), under two."""
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=2**-5)
    assert (out.float() - ref.float()).abs().mean() < 2**-7 * ref.float().abs().mean()


def small_tiles(monkeypatch, **tiles):
    for name, value in tiles.items():
        monkeypatch.setitem(config("moe", torch.device(DEVICE)), name, value)


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("tokens,k,activation", [(1, 4, "gelu_pytorch_tanh"), (3, 2, "silu")])
def test_decode_fp32_equals_dequantized(scheme, tokens, k, activation):
    """One token (the down kernel's single load of all k experts' rows) and a few (its loop over choices)."""
    module, x, weights, experts = build(scheme, tokens, k, activation=activation)
    with torch.no_grad():
        out = module.decode(x, weights, experts)
        assert_fp32_close(out, module.twin_decode(x, weights, experts))
        assert_fp32_close(out, module.twin.forward_loop(x, weights, experts))


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("tokens,down_block_w", [(1, 1024), (1, 16), (3, 16)])
def test_decode_non_power_of_two_sides(scheme, tokens, down_block_w, monkeypatch):
    """H = 48, W = 24: masked rows and columns in both kernels and their scales, several steps of each loop with a
    ragged tail; one token with wide down blocks: the single load of k = 3 (padded to 4) experts' rows and scales."""
    small_tiles(monkeypatch, GU_BLOCK_W=16, GU_BLOCK_H=32, DOWN_BLOCK_H=32, DOWN_BLOCK_W=down_block_w)
    module, x, weights, experts = build(scheme, tokens, 3, hidden=48, width=24)
    with torch.no_grad():
        out = module.decode(x, weights, experts)
        assert_fp32_close(out, module.twin_decode(x, weights, experts))
        assert_fp32_close(out, module.twin.forward_loop(x, weights, experts))


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("combine", [True, False])
def test_sorted_fp32_equals_dequantized(scheme, combine):
    """40 x 3 pairs over 8 experts: some experts past one 16-row block (a second pass over their tiles)."""
    module, x, weights, experts = build(scheme, 40, 3)
    assert torch.bincount(experts.reshape(-1), minlength=8).max() > 16
    with torch.no_grad():
        out = module.sorted(x, weights, experts, combine)
        ref = module.twin_sorted(x, weights, experts, combine)
        if not combine:
            assert isinstance(out, moe.ExpertPairs)
            assert torch.equal(out.slots, ref.slots) and torch.equal(out.weights, ref.weights)
            assert_fp32_close(out.y, ref.y)
            out = out.combine()
        assert_fp32_close(out, module.twin.forward_loop(x, weights, experts))


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_sorted_ragged_tiles(scheme, monkeypatch):
    """H = 48, W = 24 over 16-wide tiles: ragged output columns (and their scales), several steps over each
    reduction with a ragged tail, an expert nobody chose."""
    small_tiles(monkeypatch, SORTED_GU_BLOCK_N=16, SORTED_GU_BLOCK_K=16, SORTED_DOWN_BLOCK_N=16,
                SORTED_DOWN_BLOCK_K=16)
    module, x, weights, experts = build(scheme, 9, 3, hidden=48, width=24)
    experts[experts == 5] = 6
    with torch.no_grad():
        out = module.sorted(x, weights, experts)
        assert_fp32_close(out, module.twin_sorted(x, weights, experts))
        assert_fp32_close(out, module.twin.forward_loop(x, weights, experts))


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("path,tokens", [("decode", 4), ("sorted", 24)])
def test_bf16_equals_dequantized(scheme, path, tokens):
    """bf16 activations and bf16 scales (as checkpoints and on-load quantization give them). The twin rounds each
    weight q * s to bf16, the kernels scale the fp32 sums of the exact values: most outputs differ by an ulp, none by
    more than the bf16 tolerance."""
    module, x, weights, experts = build(scheme, tokens, 4, dtype=torch.bfloat16)
    assert module.gate_up_proj.scale.dtype == module.down_proj.scale.dtype == torch.bfloat16
    with torch.no_grad():
        out = getattr(module, path)(x, weights, experts)
        assert_rounded_weights_close(out, getattr(module, f"twin_{path}")(x, weights, experts))


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("path,tokens", [("decode", 1), ("decode", 4), ("sorted", 24)])
def test_bf16_exact_scales_same_bits(scheme, path, tokens):
    """Power-of-two scales: the dequantized bf16 weights are exact, and the kernels give the bits of the same kernels
    on them (each partial sum is theirs times the scale); the torch paths' rounding, as test_kernels_moe's bf16 tests."""
    module, x, weights, experts = build(scheme, tokens, 4, dtype=torch.bfloat16, exact_scales=True)
    with torch.no_grad():
        out = getattr(module, path)(x, weights, experts)
        assert torch.equal(out, getattr(module, f"twin_{path}")(x, weights, experts))
        if path == "sorted" and hasattr(torch, "_grouped_mm"):
            with override(kernels=False):  # the eager tail of forward_grouped
                assert_same_rounding(out, module.twin.forward_grouped(x, weights, experts))
        elif path == "decode":
            assert_same_rounding(out, module.twin.forward_gathered(x, weights, experts))


def test_fp32_scales_and_one_weight_quantized():
    """fp32 scales with bf16 activations; gate_up_proj quantized and down_proj a plain tensor, and the other way."""
    module, x, weights, experts = build("fp8", 4, 2, dtype=torch.bfloat16, exact_scales=True)
    gate_up = module.gate_up_proj
    fp32_scales = QuantizedWeight(gate_up.values, gate_up.scale.float(), gate_up.scheme)
    with torch.no_grad():
        for run in (moe.moe_experts, moe.sorted_experts):
            ref = run(x, weights, experts, module.twin.gate_up_proj, module.twin.down_proj)
            assert torch.equal(run(x, weights, experts, fp32_scales, module.twin.down_proj), ref)
            assert torch.equal(run(x, weights, experts, module.twin.gate_up_proj, module.down_proj), ref)


@pytest.mark.parametrize("path", ["decode", "sorted"])
def test_scales_follow_the_experts(path):
    """Each expert's own scales: the same values with the scales of the next expert give another output."""
    module, x, weights, experts = build("int8", 3, 2)
    with torch.no_grad():
        right = getattr(module, path)(x, weights, experts)
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(module, name)
            setattr(module, name, QuantizedWeight(weight.values, weight.scale.roll(1, 0), weight.scheme))
            assert (getattr(module, path)(x, weights, experts) - right).abs().max() > 1e-2
            setattr(module, name, weight)


def test_rejected_weights():
    """The kernels read 8-bit per-channel weights only (int4 and block scales are dequantized by the model), with
    activations of a float dtype equal to any plain weight's."""
    module, x, weights, experts = build("fp8", 2, 2)
    gate_up = module.twin.gate_up_proj
    int4 = quantize(gate_up, Scheme("int", 4, "group", group_size=32))
    for bad in (int4, QuantizedWeight(module.gate_up_proj.values, module.gate_up_proj.scale[..., 0],
                                                module.gate_up_proj.scheme)):
        with pytest.raises(ValueError):
            moe.moe_experts(x, weights, experts, bad, module.down_proj)
    with pytest.raises(ValueError, match="dtype mismatch"):
        moe.sorted_experts(x.bfloat16(), weights, experts, module.gate_up_proj, module.twin.down_proj)
