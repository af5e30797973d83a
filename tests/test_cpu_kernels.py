"""The CPU's C kernels (kernels/cpu.py, cpu.c) against their plain twins: the int4 product with int8 inputs against
"dequantize, then multiply" in fp64 within the error its input quantization may make, the norms and the few-query
attention against the eager ops they replace."""

import pytest
import torch

from gemma4.kernels import cpu
from gemma4.model.attention import attend
from gemma4.model.common import RMSNorm
from gemma4.model.fused import add_normed
from gemma4.model.quantized import (ON_LOAD, QuantizedWeight, Scheme, cpu_linear, from_chunks, native_int4, quantize,
                                    to_chunks)
from gemma4.options import override

pytestmark = pytest.mark.skipif(cpu.library() is None, reason="the C kernels are not built here (no C compiler?)")

U32 = 2.0**-24  # fp32's unit roundoff
UNIT = {torch.float32: U32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoffs


def _native(x, weight):
    return cpu.int4_matmul(x, weight.values, weight.scale, weight.scheme.group_size)


@pytest.mark.parametrize("k", [32, 96, 256, 544, 1536])  # blocks: one, odd, 8 pairs, 16 + 1, 48
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3])
def test_int4_product_within_input_quantization_error(k, dtype, rows):
    """Each block of 32 inputs is quantized in two int8 parts on the grid of e = absmax / (127 x 254), so each input
    moves by at most e / 2 (round to nearest; the remainder's fp32 rounding adds 2^-10 of that at most): the output
    moves by at most sum over blocks of e / 2 x sum |w| of the block. On top: the fp32 sums (blocks + a few terms, of at
    most sum |w x|) and the output's rounding to x's dtype. A misread nibble or scale is off by the order of sum |w x|
    itself; Q8_0's single int8 part would be off by up to 254 times the bound."""
    n = 80  # not a multiple of 64: the native kernel reads any number of rows
    for scale_dtype in (torch.bfloat16, torch.float32):
        generator = torch.Generator().manual_seed(k + rows)
        weight = quantize(torch.randn(n, k, generator=generator).to(scale_dtype), ON_LOAD["int4"])
        assert native_int4(weight.scheme) and weight.scale.dtype == scale_dtype
        x = (torch.randn(rows, k, generator=generator) * torch.rand(rows, k, generator=generator) * 4).to(dtype)
        if k > 32:
            x[0, :32] = 0  # a block of zeros (scale 0)
        got = _native(x, weight)
        assert got.dtype == dtype and got.shape == (rows, n)
        assert (cpu_linear(x, weight) is None) == (dtype == torch.float32)  # fp32 inputs take the exact twin
        dense = weight.dequantize(torch.float64)
        exact = x.double() @ dense.T
        magnitude = x.double().abs() @ dense.abs().T
        step = x.double().abs().unflatten(-1, (-1, 32)).amax(-1) / (127 * 254)  # [rows, blocks]
        weight_sums = dense.abs().unflatten(-1, (-1, 32)).sum(-1)  # [n, blocks]
        quantization = (step / 2 * (1 + 2**-10)) @ weight_sums.T
        inner = quantization + (k / 32 + 4) * U32 * magnitude
        bound = inner + UNIT[dtype] * (exact.abs() + inner)
        error = (got.double() - exact).abs()
        assert (error <= bound).all(), (error - bound).max()
        assert error.max() > 0 and inner.max() < 2**-10 * magnitude.max()  # neither vacuous nor exact by accident


def _product_bound(x, weight: QuantizedWeight, dtype, sums: int):
    """test_int4_product_within_input_quantization_error's bound, with `sums` fp32 additions per output."""
    dense = weight.dequantize(torch.float64)
    exact = x.double() @ dense.T
    magnitude = x.double().abs() @ dense.abs().T
    step = x.double().abs().unflatten(-1, (-1, 32)).amax(-1) / (127 * 254)
    inner = (step / 2 * (1 + 2**-10)) @ dense.abs().unflatten(-1, (-1, 32)).sum(-1).T + sums * U32 * magnitude
    return exact, inner + UNIT[dtype] * (exact.abs() + inner)


@pytest.mark.parametrize("k, chunk, group", [(1536, 512, 32), (1664, 512, 32), (1664, 512, 64), (1536, 768, 64)])
def test_int4_chunked_layout(k, chunk, group):
    """A wide K stored chunk by chunk (to_chunks; the last chunk may be narrower) reads back as the checkpoint's
    words, dequantizes alike, and its product (each chunk summed, then the chunks) stays within the input
    quantization bound of the row-major product, with the same result on one thread as on two."""
    scheme = Scheme("int", 4, "group", group_size=group)
    generator = torch.Generator().manual_seed(k + chunk)
    weight = quantize(torch.randn(192, k, generator=generator), scheme)  # 192 x k: enough weights for two threads
    chunked = QuantizedWeight(to_chunks(weight.values, chunk), weight.scale, scheme, chunk=chunk)
    assert not torch.equal(chunked.values, weight.values) and chunked.shape == weight.shape
    assert torch.equal(from_chunks(chunked.values, chunk), weight.values)
    assert torch.equal(chunked.in_checkpoint_layout().values, weight.values)
    assert torch.equal(chunked.dequantize(torch.float32), weight.dequantize(torch.float32))
    x = torch.randn(3, k, generator=generator).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = cpu.int4_matmul(x, chunked.values, chunked.scale, group, chunk)
        torch.set_num_threads(2)
        got = cpu_linear(x, chunked)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, got)
    exact, bound = _product_bound(x, weight, torch.bfloat16, k // 32 + 4 + k // chunk)
    assert ((got.double() - exact).abs() <= bound).all()
    assert cpu.int4_matmul(x, chunked.values, chunked.scale, group, chunk + 32) is None  # not whole quads: declined


def test_int4_groups_of_64_and_strided_rows():
    """Groups of 64 (one scale per two blocks), and a matrix that is a block of rows of a larger one (a fused
    projection's view) read in place."""
    scheme = Scheme("int", 4, "group", group_size=64)
    generator = torch.Generator().manual_seed(1)
    weight = quantize(torch.randn(96, 256, generator=generator), scheme)
    x = torch.randn(2, 256, generator=generator)
    got = _native(x, weight)
    plain = weight.linear(x)
    assert (got - plain).abs().max() < 2**-12 * plain.abs().max()
    rows = type(weight)(weight.values[32:64], weight.scale[32:64], scheme)
    assert torch.equal(_native(x, rows), got[:, 32:64])


def test_int4_kernel_declines_what_it_does_not_read():
    """Groups of 16 are not whole blocks: the twin runs."""
    weight = quantize(torch.randn(64, 64), Scheme("int", 4, "group", group_size=16))
    assert not native_int4(weight.scheme) and cpu_linear(torch.randn(1, 64).bfloat16(), weight) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_equal_the_eager_ops(dtype):
    """RMSNorm and the residual add with its norms: bf16 results equal the eager ops' (each rounding at the same
    step; only the sum of squares is added in another order), fp32 within a few units of fp32."""
    generator = torch.Generator().manual_seed(0)
    norm, next_norm = RMSNorm(1536).to(dtype), RMSNorm(1536).to(dtype)
    for module in (norm, next_norm):
        module.weight.data = torch.randn(1536, generator=generator).to(dtype)
    bare = RMSNorm(256, with_scale=False)
    x, residual = (torch.randn(3, 1536, generator=generator).to(dtype) * 5 for _ in range(2))
    heads = torch.randn(1, 1, 8, 256, generator=generator).to(dtype)
    scalar = torch.tensor([0.7]).to(dtype)

    def outputs():
        return [norm(x), bare(heads), *add_normed(residual, x, norm, scalar, next_norm), *add_normed(residual, x, norm)]

    with override(kernels=True):
        fast = outputs()
    with override(kernels=False):
        plain = outputs()
    assert fast[-1] is None and plain[-1] is None
    for ours, theirs in zip(fast[:-1], plain[:-1]):
        assert ours.dtype == theirs.dtype == dtype
        if dtype == torch.bfloat16:
            assert (ours != theirs).float().mean() < 0.01  # a sum of squares rounded across a bf16 boundary, rarely
            torch.testing.assert_close(ours, theirs, rtol=2**-8, atol=0)
        else:
            torch.testing.assert_close(ours, theirs, rtol=8 * U32, atol=8 * U32 * theirs.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_query_attention_equals_the_eager_ops(dtype):
    """Grouped queries over masked keys, in fp32 and rounded once: the eager branch's numerics, summed in another
    order. A row that may see no key gives NaN in both."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 8, 3, 256, generator=generator).to(dtype)
    key, value = (torch.randn(2, 2, 40, 256, generator=generator).to(dtype) for _ in range(2))
    mask = torch.rand(2, 1, 3, 40, generator=generator) > 0.3
    mask[1, 0, 2] = False
    with override(kernels=True):
        fast = attend(query.transpose(2, 3).transpose(2, 3), key, value, mask)
    with override(kernels=False):
        plain = attend(query, key, value, mask)
    assert fast.shape == plain.shape == (2, 3, 8 * 256) and fast.dtype == dtype
    assert fast[1, 2].isnan().all() and plain[1, 2].isnan().all()
    seen = ~plain.isnan()
    tolerance = 64 * U32 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(fast[seen], plain[seen], rtol=tolerance, atol=tolerance * plain[seen].abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_rope_equals_the_eager_ops(dtype):
    """Each head's RMSNorm then rotate-half RoPE, [B, L, H, D] -> [B, H, L, D]: bf16 equal to the eager ops (same
    roundings), fp32 within a few units; the value norm (no weight, no RoPE) alike."""
    from gemma4.model.text import norm_rope, rope_cos_sin, rope_inverse_frequencies

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 256, generator=generator).to(dtype) * 3
    norm = RMSNorm(256).to(dtype)
    norm.weight.data = torch.randn(256, generator=generator).to(dtype)
    rope = {"rope_theta": 10000.0, "rope_type": "proportional", "partial_rotary_factor": 0.25}
    cos, sin = rope_cos_sin(torch.tensor([[5, 6, 7], [100, 101, 600]]), rope_inverse_frequencies(256, rope), dtype)
    for args in ((norm, cos, sin), (RMSNorm(256, with_scale=False), None, None)):
        with override(kernels=True):
            fast = norm_rope(x, *args)
        with override(kernels=False):
            plain = norm_rope(x, *args)
        assert fast.shape == plain.shape == (2, 8, 3, 256) and fast.dtype == dtype
        if dtype == torch.bfloat16:
            assert (fast != plain).float().mean() < 0.01
            torch.testing.assert_close(fast, plain, rtol=2**-7, atol=0)
        else:
            torch.testing.assert_close(fast, plain, rtol=0, atol=16 * U32 * plain.abs().max().item())
