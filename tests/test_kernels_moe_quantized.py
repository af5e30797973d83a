"""The MoE kernels (gemma4.kernels.moe) on quantized expert weights, 8-bit per channel (fp8 e4m3, int8) and int4 in
groups (W4A16), equal the same kernels and the torch expert paths on the dequantized weights.

Without a GPU they run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1 before Triton is imported)."""

import copy
import itertools

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
SCHEMES = {"fp8": Scheme("float", 8, "channel"), "int8": Scheme("int", 8, "channel"),
           **{f"int4/{group}": Scheme("int", 4, "group", group_size=group) for group in (8, 32, 128)}}
EIGHT_BIT, INT4 = ["fp8", "int8"], ["int4/32", "int4/128"]  # int4/8: the ragged sides (48 x 24) that 8 divides


class Quantized:
    """Random experts quantized per channel: gate_up [E, 2W, H] and down [E, H, W] QuantizedWeights (the scales in the
    model dtype, as `quantize` makes them on load), and their dequantized twin, an `Experts` module.

    `exact_scales`: the scales rounded to powers of two, so that every dequantized weight q * s is exact in bf16 (and
    the kernels' partial sums are the twin's times the scale, exactly)."""

    def __init__(self, scheme, dtype=torch.float32, hidden=None, width=None, num_experts=8,
                 activation="gelu_pytorch_tanh", seed=0, exact_scales=False):
        group = SCHEMES[scheme].group_size or 1  # sides of 64 x 32, or of whole groups (int4/128: 128 x 128)
        hidden, width = hidden or max(64, group), width or max(32, group)
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
    """fp32: the kernels scale each row's dot product once (int4: each group's sum, at decode), the twin rounds each
    q * s to fp32 and sums in another order: relative differences of a few fp32 ulps."""
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
    """bf16 against the twin whose weights q * s are rounded to bf16 (2^-9 relative each: q of 8 or 4 bits times a
    bf16 scale has at most 16 significant bits) where the kernels' are exact: every sum moves by up to about an ulp,
    so most rounded intermediates and outputs differ by one; the k pairs' flips can add up to a few ulps of the
    magnitudes summed (~1 -> 2^-5); on average about an ulp (2^-8 relative), under two."""
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=2**-5)
    assert (out.float() - ref.float()).abs().mean() < 2**-7 * ref.float().abs().mean()


def small_tiles(monkeypatch, **tiles):
    """Tuned moe tiles replaced, and the formats' own of the same names (INT4_<name>, BYTE_<name>) with them."""
    table = config("moe", torch.device(DEVICE))
    for name, value in tiles.items():
        for key in (name, f"INT4_{name}", f"BYTE_{name}"):
            if key in table:
                monkeypatch.setitem(table, key, value)


class LaunchSpy:
    """A Triton kernel whose launches record their keyword arguments (the tiles), then run."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("path,tokens", [("decode", 3), ("sorted", 24)])
def test_each_format_reads_its_own_tiles(path, tokens, monkeypatch):
    """A format's own keys (BYTE_<name> for 8-bit weights) decide the tiles of the kernel that reads that weight; a
    dense weight beside it keeps the plain keys: fp8 gate_up_proj and a dense down_proj, then the other way round."""
    table = config("moe", torch.device(DEVICE))
    names = {"decode": ("GU_BLOCK_H", "DOWN_BLOCK_W", "BLOCK_H", "BLOCK_W"),
             "sorted": ("SORTED_GU_BLOCK_K", "SORTED_DOWN_BLOCK_K", "BLOCK_K", "BLOCK_K")}[path]
    gu_name, down_name, gu_arg, down_arg = names
    for name in (gu_name, down_name):
        monkeypatch.setitem(table, name, 32)
        monkeypatch.setitem(table, f"BYTE_{name}", 16)
    kernels = ("_gate_up_kernel", "_down_kernel") if path == "decode" else ("_sorted_gate_up_kernel",
                                                                             "_sorted_down_kernel")
    module, x, weights, experts = build("fp8", tokens, 4, width=64)
    run = moe.moe_experts if path == "decode" else moe.sorted_experts
    for quantized_gate_up in (True, False):
        spies = [LaunchSpy(getattr(moe, name)) for name in kernels]
        for name, spy in zip(kernels, spies):
            monkeypatch.setattr(moe, name, spy)
        gate_up = module.gate_up_proj if quantized_gate_up else module.twin.gate_up_proj
        down = module.twin.down_proj if quantized_gate_up else module.down_proj
        with torch.no_grad():
            out = run(x, weights, experts, gate_up, down)
        assert spies[0].launches[0][gu_arg] == (16 if quantized_gate_up else 32)
        assert spies[1].launches[0][down_arg] == (32 if quantized_gate_up else 16)
        assert_fp32_close(out, module.twin.forward_loop(x, weights, experts))


@pytest.mark.parametrize("scheme", EIGHT_BIT + INT4)
@pytest.mark.parametrize("tokens,k,activation", [(1, 4, "gelu_pytorch_tanh"), (3, 2, "silu")])
def test_decode_fp32_equals_dequantized(scheme, tokens, k, activation):
    """One token (the down kernel's single load of all k experts' rows) and a few (its loop over choices)."""
    module, x, weights, experts = build(scheme, tokens, k, activation=activation)
    with torch.no_grad():
        out = module.decode(x, weights, experts)
        assert_fp32_close(out, module.twin_decode(x, weights, experts))
        assert_fp32_close(out, module.twin.forward_loop(x, weights, experts))


@pytest.mark.parametrize("scheme", EIGHT_BIT + ["int4/8"])
@pytest.mark.parametrize("tokens,down_block_w", [(1, 1024), (1, 16), (3, 16)])
def test_decode_non_power_of_two_sides(scheme, tokens, down_block_w, monkeypatch):
    """H = 48, W = 24: masked rows and columns in both kernels and their scales, several steps of each loop with a
    ragged tail (int4: masked words and groups); one token with wide down blocks: the single load of k = 3 (padded to
    4) experts' rows and scales (int4: the loop over choices in one step)."""
    small_tiles(monkeypatch, GU_BLOCK_W=16, GU_BLOCK_H=32, DOWN_BLOCK_H=32, DOWN_BLOCK_W=down_block_w)
    module, x, weights, experts = build(scheme, tokens, 3, hidden=48, width=24)
    with torch.no_grad():
        out = module.decode(x, weights, experts)
        assert_fp32_close(out, module.twin_decode(x, weights, experts))
        assert_fp32_close(out, module.twin.forward_loop(x, weights, experts))


@pytest.mark.parametrize("scheme", EIGHT_BIT + INT4)
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


@pytest.mark.parametrize("scheme", EIGHT_BIT + ["int4/8"])
def test_sorted_ragged_tiles(scheme, monkeypatch):
    """H = 48, W = 24 over 16-wide tiles: ragged output columns (and their scales), several steps over each
    reduction with a ragged tail (int4: two groups a step, masked words and groups), an expert nobody chose."""
    small_tiles(monkeypatch, SORTED_GU_BLOCK_N=16, SORTED_GU_BLOCK_K=16, SORTED_DOWN_BLOCK_N=16,
                SORTED_DOWN_BLOCK_K=16)
    module, x, weights, experts = build(scheme, 9, 3, hidden=48, width=24)
    experts[experts == 5] = 6
    with torch.no_grad():
        out = module.sorted(x, weights, experts)
        assert_fp32_close(out, module.twin_sorted(x, weights, experts))
        assert_fp32_close(out, module.twin.forward_loop(x, weights, experts))


@pytest.mark.parametrize("scheme", EIGHT_BIT + INT4)
@pytest.mark.parametrize("path,tokens", [("decode", 4), ("sorted", 24)])
def test_bf16_equals_dequantized(scheme, path, tokens):
    """bf16 activations and bf16 scales (as checkpoints and on-load quantization give them). The twin rounds each
    weight q * s to bf16, the kernels scale the fp32 sums of the exact values (int4's sorted kernels round the weights
    as the twin): most outputs differ by an ulp, none by more than the bf16 tolerance; against the twin's kernels
    and its torch path (gathered, grouped)."""
    module, x, weights, experts = build(scheme, tokens, 4, dtype=torch.bfloat16)
    assert module.gate_up_proj.scale.dtype == module.down_proj.scale.dtype == torch.bfloat16
    with torch.no_grad():
        out = getattr(module, path)(x, weights, experts)
        assert_rounded_weights_close(out, getattr(module, f"twin_{path}")(x, weights, experts))
        if path == "decode":
            assert_rounded_weights_close(out, module.twin.forward_gathered(x, weights, experts))
        elif hasattr(torch, "_grouped_mm"):
            with override(kernels=False):  # the eager tail of forward_grouped
                assert_rounded_weights_close(out, module.twin.forward_grouped(x, weights, experts))


@pytest.mark.parametrize("scheme", EIGHT_BIT + INT4)
@pytest.mark.parametrize("path,tokens", [("decode", 1), ("decode", 4), ("sorted", 24)])
def test_bf16_exact_scales_same_bits(scheme, path, tokens):
    """Power-of-two scales: the dequantized bf16 weights are exact, and the kernels give the bits of the same kernels
    on them (each partial sum is theirs times the scale; int4's sorted kernels dot the same dequantized tiles), but
    for int4's decode kernels, which sum in the int4 GEMV's order (each word's nibbles, then the words); all round
    where the torch paths round, as test_kernels_moe's bf16 tests."""
    module, x, weights, experts = build(scheme, tokens, 4, dtype=torch.bfloat16, exact_scales=True)
    with torch.no_grad():
        out = getattr(module, path)(x, weights, experts)
        if not (scheme in INT4 and path == "decode"):
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


@pytest.mark.parametrize("scheme", ["int8", "int4/32"])
@pytest.mark.parametrize("path", ["decode", "sorted"])
def test_scales_follow_the_experts(scheme, path):
    """Each expert's own scales (int4: each group's): the same values with the scales of the next expert (of the next
    group of the row: W = 64, two groups a row in both weights) give another output."""
    module, x, weights, experts = build(scheme, 3, 2, width=64)
    dims = [0] + ([-1] if scheme in INT4 else [])
    with torch.no_grad():
        right = getattr(module, path)(x, weights, experts)
        for name, dim in itertools.product(("gate_up_proj", "down_proj"), dims):
            weight = getattr(module, name)
            setattr(module, name, QuantizedWeight(weight.values, weight.scale.roll(1, dim), weight.scheme))
            assert (getattr(module, path)(x, weights, experts) - right).abs().max() > 1e-2
            setattr(module, name, weight)


def test_rejected_weights():
    """The kernels read 8-bit per-channel weights and int4 in groups of a power of 2 of at least 8 (int4 per channel
    and block scales are dequantized by the model), with activations of a float dtype equal to any plain weight's."""
    module, x, weights, experts = build("fp8", 2, 2)
    gate_up = module.twin.gate_up_proj
    assert moe.experts_supported(quantize(gate_up, SCHEMES["int4/32"])) is None
    int4_channel, int4_by_4 = (quantize(gate_up, Scheme("int", 4, strategy, group_size=group))
                               for strategy, group in (("channel", None), ("group", 4)))
    for bad in (int4_channel, int4_by_4, QuantizedWeight(module.gate_up_proj.values, module.gate_up_proj.scale[..., 0],
                                                         module.gate_up_proj.scheme)):
        assert moe.experts_supported(bad) is not None
        with pytest.raises(ValueError):
            moe.moe_experts(x, weights, experts, bad, module.down_proj)
    with pytest.raises(ValueError, match="dtype mismatch"):
        moe.sorted_experts(x.bfloat16(), weights, experts, module.gate_up_proj, module.twin.down_proj)


@pytest.mark.parametrize("step", [16, 64])
@pytest.mark.parametrize("path,tokens", [("decode", 3), ("sorted", 24)])
def test_int4_steps_across_groups(path, tokens, step, monkeypatch):
    """Reduction steps of half a group of 32 (a scale over two steps) and of two groups (two scales a step; W = 32: one
    group, the step cut to it) in all four int4 kernels: the twin's output (fp32)."""
    small_tiles(monkeypatch, GU_BLOCK_H=step, DOWN_BLOCK_W=step, SORTED_GU_BLOCK_K=step, SORTED_DOWN_BLOCK_K=step)
    module, x, weights, experts = build("int4/32", tokens, 4)
    with torch.no_grad():
        out = getattr(module, path)(x, weights, experts)
        assert_fp32_close(out, module.twin.forward_loop(x, weights, experts))


@pytest.mark.parametrize("scheme", INT4)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_sorted_same_bits_as_dequantized(scheme, dtype):
    """The sorted kernels dequantize int4 tiles as the twin does (q * s rounded once to the dtype) and dot them as the
    same kernels dot the twin's weights: the same bits, whatever the scales."""
    module, x, weights, experts = build(scheme, 24, 4, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(module.sorted(x, weights, experts), module.twin_sorted(x, weights, experts))


@pytest.mark.parametrize("tokens,kernel", [(3, "moe_experts"), (20, "sorted_experts")])
def test_int4_experts_take_the_kernels(tokens, kernel, monkeypatch):
    """An Experts module holding int4 weights as quantization makes them (QuantizedLinear per weight) reads them with
    the kernels (`kernels_read_weights`): 3 x 4 pairs the decode kernels, 20 x 4 the sorted ones, each giving the
    twin's loop's output."""
    from gemma4 import kernels
    from gemma4.quantization import quantize_experts_module

    module, x, weights, experts = build("int4/32", tokens, 4)
    quantized = copy.deepcopy(module.twin)
    quantize_experts_module(quantized, SCHEMES["int4/32"], device=DEVICE)
    for name in ("gate_up_proj", "down_proj"):
        getattr(quantized, name).assign(getattr(module, name).values, getattr(module, name).scale)
    assert quantized.kernels_read_weights()
    calls = []
    real = getattr(moe, kernel)
    monkeypatch.setattr(moe, kernel, lambda *args: calls.append(kernel) or real(*args))
    with torch.no_grad():
        with kernels.force():
            out = quantized(x, weights, experts)
        assert calls == [kernel]
        assert_fp32_close(out, module.twin.forward_loop(x, weights, experts))
