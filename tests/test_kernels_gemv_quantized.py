"""The decode GEMV kernels (gemma4.kernels.gemv) reading quantized weights against the plain twin: the weight
dequantized (QuantizedWeight.dequantize) and the same torch ops. The kernels sum q * x in fp32 and apply the scales
to the sums (per row, or per group of inputs), so they equal the product with the weight dequantized in fp32, up to
summation order; in bf16 the twin `linear` also rounds the dequantized weight to bf16 first, which moves its
products by about an ulp more (checked loosely). The big int4 GEMVs that int4_mma.py's kernel takes on a GPU are
tested in test_kernels_int4_mma.py."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from gemma4.kernels.gemv import gemv, gemv_gated, quantized_supported  # noqa: E402
from gemma4.kernels.norm import residual_rms_norm  # noqa: E402
from gemma4.model.common import activation  # noqa: E402
from gemma4.model.quantized import ON_LOAD, QuantizedWeight, Scheme, quantize  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
BLOCKS = Scheme("float", 8, "block", block=(128, 128))
FORMATS = [*ON_LOAD, "fp8 blocks"]  # the quantize-on-load schemes (fp8/int8 per channel, int4 in groups of 32)
# A row tile of 8 (64 on the CPU) and BLOCK_K 256: K = 800 takes three whole steps and a last one of 32 inputs (one
# int4 group; a ragged 128-column block). With three groups of rows a program, N = 70 leaves a ragged second group and
# a masked third on the CPU.
STEPS = (8, 256, 4, 3)


def quantized_weight(fmt: str, n: int, k: int, dtype: torch.dtype, seed: int = 0) -> QuantizedWeight:
    """A [n, k] weight of about unit-variance products in format `fmt`: an ON_LOAD key or another Scheme's name
    (quantize), or "fp8 blocks" (random fp8 values and 128x128 block scales, as checkpoints hold them)."""
    generator = torch.Generator().manual_seed(seed)
    if fmt == "fp8 blocks":
        values = (torch.randn(n, k, generator=generator) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        scale = (torch.rand(*BLOCKS.scale_shape(n, k), generator=generator) + 0.5) * k**-0.5 / 64
        return QuantizedWeight(values.to(DEVICE), scale.to(DEVICE, dtype), BLOCKS)
    scheme = ON_LOAD[fmt] if fmt in ON_LOAD else EXTRA_SCHEMES[fmt]
    weight = torch.randn(n, k, generator=generator) * k**-0.5
    return quantize(weight.to(DEVICE, dtype), scheme)


EXTRA_SCHEMES = {"int4 per channel": Scheme("int", 4, "channel"), "int8 groups": Scheme("int", 8, "group", 32),
                 "fp8 groups": Scheme("float", 8, "group", 16)}


def rand(*shape, dtype, scale=1.0, offset=0.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale + offset).to(DEVICE, dtype)


def product(x: torch.Tensor, weight: QuantizedWeight, stored: bool = False) -> torch.Tensor:
    """The twin's product with the weight dequantized in fp32, rounded once to x's dtype (what the kernels compute, up
    to summation order). stored: as a kernel stores a product without rounding it itself first (gemv): the CPU
    interpreter's cast to bf16 truncates (kernels/rounding.py)."""
    dequantized = weight.dequantize(torch.float32)
    out = F.linear(x.float(), dequantized.float())
    if stored and x.dtype == torch.bfloat16 and DEVICE == "cpu":
        return (out.view(torch.int32) & -(1 << 16)).view(torch.float32).to(x.dtype)
    return out.to(x.dtype)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, share: float = 0.9):
    """fp32: summation order only. bf16: at most an ulp apart, most equal."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-5)
        assert (got == want).float().mean() > share


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", [*FORMATS, *EXTRA_SCHEMES])
def test_gemv_equals_dequantized_product(fmt, dtype):
    """Ragged N, several BLOCK_K steps and a ragged last one (STEPS), and the default tiles on a short row."""
    for n, k, tiles in [(70, 800, STEPS), (200, 384, None)]:
        weight = quantized_weight(fmt, n, k, dtype, seed=k)
        assert quantized_supported(weight) is None
        x = rand(1, 1, k, dtype=dtype, seed=1)
        out, want = gemv(x, weight, tiles), product(x, weight, stored=True)
        assert out.shape == (1, 1, n)
        assert_close(out, want, dtype)
        # The twin itself (in bf16 it rounds the dequantized weight first): within a couple of ulps.
        torch.testing.assert_close(out.float(), weight.linear(x).float(), rtol=2**-6 if dtype != torch.float32
                                   else 1e-5, atol=2e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("with_multiplier", [False, True])
def test_gemv_gated_equals_eager(fmt, dtype, with_multiplier):
    """MLP (fused gate/up weight [2W, K]: the up rows' scales are rows W.. of the scale) and PLE (gate weight, up
    given) forms, one group of rows a program and three, against the eager ops' rounding."""
    width, k = 70, 800
    weight = quantized_weight(fmt, width if with_multiplier else 2 * width, k, dtype, seed=2)
    x = rand(1, 1, k, dtype=dtype, seed=3)
    multiplier = rand(1, 1, width, dtype=dtype, seed=4) if with_multiplier else None
    if with_multiplier:
        gate, up = product(x, weight), multiplier
    else:
        gate, up = product(x, weight).chunk(2, dim=-1)
    expected = activation("gelu_pytorch_tanh")(gate) * up
    for tiles in [STEPS, (*STEPS, 3)]:
        out = gemv_gated(x, weight, "gelu_pytorch_tanh", multiplier, tiles=tiles)
        assert out.shape == (1, 1, width)
        if dtype == torch.float32:
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        else:  # a product an ulp off (summation order) moves act(gate) * up by about an ulp
            torch.testing.assert_close(out.float(), expected.float(), rtol=2**-6, atol=1e-3)
            assert (out == expected).float().mean() > 0.9


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", ["gemv", "gated", "gated multiplier"])
def test_gemv_with_normed_input_equals_norms_then_product(fmt, dtype, variant):
    """norms=: every program normalizes the input row itself (one BLOCK_K step: K = 288 of a 512-wide tile, nine
    int4 groups, a ragged 128-column block) and program 0 writes the new residual stream."""
    n, k = 70, 288
    y, residual = rand(1, 1, k, dtype=dtype, seed=5), rand(1, 1, k, dtype=dtype, scale=4.0, seed=6)
    norm_weight, next_weight = (rand(k, dtype=dtype, scale=0.5, offset=1.0, seed=s) for s in (7, 8))
    scalar = torch.tensor([0.37], device=DEVICE, dtype=dtype)
    new = torch.full_like(residual, float("nan"))
    norms = (residual, norm_weight, 1e-6, scalar, next_weight, 1e-5, new)
    want_new, normed = residual_rms_norm(residual, y, norm_weight, 1e-6, scalar, next_weight, 1e-5)
    if variant == "gemv":
        weight = quantized_weight(fmt, n, k, dtype, seed=9)
        got, want = gemv(y, weight, norms=norms), product(normed, weight, stored=True)
    else:
        multiplier = rand(1, 1, n, dtype=dtype, seed=10) if "multiplier" in variant else None
        weight = quantized_weight(fmt, n if multiplier is not None else 2 * n, k, dtype, seed=11)
        got = gemv_gated(y, weight, "gelu_pytorch_tanh", multiplier, norms=norms)
        if multiplier is None:
            gate, up = product(normed, weight).chunk(2, dim=-1)
        else:
            gate, up = product(normed, weight), multiplier
        want = activation("gelu_pytorch_tanh")(gate) * up
    torch.testing.assert_close(new, want_new, rtol=1e-6, atol=1e-6)  # the norm kernel's row code on the same input
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=1e-3)
        assert (got == want).float().mean() > 0.9


def test_fused_rows_and_unsupported_weights():
    """A fused weight's row views (a row stride of the whole) read as the whole's rows; weights the kernels cannot
    read say why, and gemv refuses them."""
    k = 256
    fused = quantized_weight("int4", 96, k, torch.float32, seed=18)
    lower = QuantizedWeight(fused.values[40:], fused.scale[40:], fused.scheme)
    x = rand(k, dtype=torch.float32, seed=19)
    torch.testing.assert_close(gemv(x, lower), gemv(x, fused)[40:], rtol=0, atol=0)
    odd_groups = quantize(torch.randn(8, 96, device=DEVICE), Scheme("int", 4, "group", 48))
    assert "groups of 48" in quantized_supported(odd_groups)
    with pytest.raises(ValueError, match="do not read"):
        gemv(torch.randn(96, device=DEVICE), odd_groups)
    experts = quantize(torch.randn(2, 8, 64, device=DEVICE), ON_LOAD["fp8"])
    assert quantized_supported(experts) == "not one matrix" and quantized_supported(experts[1]) is None
