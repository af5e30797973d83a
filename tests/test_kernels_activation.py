"""The fused gated activation of gemma4.kernels.activation against its eager twin, `activation(name)(gate) * up`.

Without a GPU the kernel runs on CPU tensors through Triton's interpreter (conftest sets TRITON_INTERPRET=1).

How close the results must be (`assert_matches`), and why:
- The kernel rounds where the eager ops round (act(gate) to the dtype, then the product) and follows the formulas of
  torch's kernels operation by operation; only its tanh / erf / exp are other implementations (each within one fp32
  ulp of the correctly rounded value). fp32: within `rtol` (~1e-6) of the reference; relu exactly.
- GELU cancels in its negative tail: act = (0.5 x)(1 + t) with t = tanh(...) or erf(...) near -1, on a grid of
  2^-24 there, so the eager fp32 act is itself a small multiple of 0.5 |x| 2^-24, and one grid step of t is a large
  relative change of act. The bounds add `tail` * 2^-24 * |gate * up|: 2 * `tail` steps of t. Needed on the CPU:
  torch's vectorized GELU kernel takes tanh as exactly -1 from |inner| = 8.66 on, where the correctly rounded tanh
  (this kernel's) is still -1 + 2^-24 (one step; `tail` 2 leaves room for CUDA's tanhf, documented within 2 ulps);
  its erf GELU uses a polynomial erf, up to ~10 steps off near -1 and ~2.5e-6 relative near x = -2, hence the wider
  bounds for "gelu" (on CUDA torch calls erff, the libdevice function tl.erf calls too).
- bf16: an element may differ where act(gate) rounded to the neighbouring bf16 value (its fp32 value, a few fp32 ulps
  from torch's, sat at a bf16 rounding boundary): |diff| <= |up| * (ulp(act) + the tail term) + ulp(out). Outside
  GELU's tail such differences are rare: at most `frac` of the elements, 0.1% (1% for the CPU's erf GELU; measured:
  0% and 0.3%). A rounding of act(gate) left out moves ~20% of the elements (test_checks_are_sharp).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gemma4.kernels.activation import _rows, gated_activation  # noqa: E402
from gemma4.model.common import _ACTIVATIONS, activation  # noqa: E402
from gemma4.options import override  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
ACTIVATIONS = ["gelu_pytorch_tanh", "gelu", "silu", "relu"]  # "swish" is silu: test_every_model_activation
# name: (fp32 rtol, tail steps of t, bf16 fraction of elements allowed to differ outside the tail)
TOLERANCES = {
    "gelu_pytorch_tanh": (1e-6, 2, 1e-3),
    "gelu": (4e-6, 8, 1e-2),
    "silu": (1e-6, 0, 1e-3),
    "swish": (1e-6, 0, 1e-3),
    "relu": (0.0, 0, 0.0),
}


@pytest.fixture(autouse=True)
def eager_reference():
    """The references are the eager ops, also on CUDA, should the model ever route them to this kernel."""
    with override(kernels=False):
        yield


def bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values at |v| (8 significant bits), for fp32 v; at 0, the smallest subnormal's."""
    _, exponent = torch.frexp(v)
    return torch.where(v == 0, 2.0**-133, torch.ldexp(torch.ones_like(v), exponent - 8))


def eager(gate, up, name):
    return activation(name)(gate) * up


def assert_matches(out, ref, gate, up, name):
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
    rtol, tail, frac = TOLERANCES[name]
    special = ~ref.isfinite() | ~out.isfinite()  # infinities and NaN: exactly where and as the eager ops give them
    torch.testing.assert_close(out[special], ref[special], rtol=0, atol=0, equal_nan=True)
    low = out.dtype != torch.float32
    act = activation(name)(gate)  # the eager intermediate, in the model dtype
    out, ref, gate, up, act = (t.float().masked_fill(special, 0.0) for t in (out, ref, gate, up, act))
    diff = (out - ref).abs()
    steps = tail * 2.0**-24 * gate.abs()  # 2 * tail grid steps of t near -1, each 0.5 |gate| 2^-24 on act
    if not low:
        bound = rtol * ref.abs() + steps * up.abs()
    else:
        bound = up.abs() * (bf16_ulp(act) + steps) + bf16_ulp(ref)
    bad = ~(diff <= bound.nan_to_num(nan=0.0))  # 0 * inf where an infinite gate gives a finite act (relu)
    assert not bad.any(), f"{int(bad.sum())} of {diff.numel()} beyond the bound, worst {diff[bad].max()}"
    if low:
        counted = (diff > 0) & (steps < bf16_ulp(act))
        assert counted.float().mean() <= frac, f"{int(counted.sum())} of {diff.numel()} elements differ"


def randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape) * scale).to(device=DEVICE, dtype=dtype)


def layouts(case: str, dtype):
    """(gate, up) as the model hands them over."""
    if case == "decode":  # one token's fused gate_up projection, W = 12288
        return randn(1, 2 * 12288, dtype=dtype, scale=3.0).chunk(2, dim=-1)
    if case == "rows":  # separate gate and up projections of 7 tokens, W = 256
        return randn(7, 256, dtype=dtype, scale=3.0), randn(7, 256, dtype=dtype, scale=3.0)
    if case == "fused_halves":  # [B, L, 2W] -> two [B, L, W] halves, row stride 2W
        return randn(2, 3, 2 * 704, dtype=dtype, scale=3.0).chunk(2, dim=-1)
    if case == "per_layer_slice":  # [B, L, W] gate times per_layer_inputs[:, :, i] of [B, L, layers, W]
        return randn(2, 3, 1000, dtype=dtype, scale=3.0), randn(2, 3, 5, 1000, dtype=dtype)[:, :, 3]
    raise ValueError(case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("case", ["decode", "rows", "fused_halves", "per_layer_slice"])
def test_matches_eager(case, name, dtype):
    torch.manual_seed(len(case))
    gate, up = layouts(case, dtype)
    out = gated_activation(gate, up, name)
    assert out.shape == gate.shape
    assert_matches(out, eager(gate, up, name), gate, up, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_large_magnitudes(name, dtype):
    """Gates up to +-20: GELU's whole negative tail (down to exact zeros) and its saturation, silu's too."""
    torch.manual_seed(3)
    gate = (torch.linspace(-20.0, 20.0, 4 * 1000) + torch.rand(4 * 1000) * 0.01).view(4, 1000)
    gate = gate.to(device=DEVICE, dtype=dtype)
    up = randn(4, 1000, dtype=dtype, scale=4.0)
    assert_matches(gated_activation(gate, up, name), eager(gate, up, name), gate, up, name)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # NumPy, running the kernel on infs
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_special_values(name, dtype):
    """Zeros, infinities and NaN come out as the eager ops give them (NaN where they give NaN)."""
    values = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e30, -1e30, 1e-30, -1e-30, 88.5, -88.5, 9.0]
    gate = torch.tensor(values, device=DEVICE, dtype=dtype)[None].expand(2, -1)
    up = torch.tensor([[1.0], [-3.0]], device=DEVICE, dtype=dtype).expand(2, len(values))
    assert_matches(gated_activation(gate, up, name), eager(gate, up, name), gate, up, name)


def test_every_model_activation():
    """All the names the model accepts (swish included) take the kernel, which refuses the others."""
    torch.manual_seed(4)
    gate, up = randn(3, 40, dtype=torch.bfloat16, scale=3.0), randn(3, 40, dtype=torch.bfloat16)
    for name in sorted(_ACTIVATIONS):
        assert_matches(gated_activation(gate, up, name), eager(gate, up, name), gate, up, name)
    with pytest.raises(ValueError, match="unsupported activation"):
        gated_activation(gate, up, "tanh")
    with pytest.raises(ValueError, match="differ"):
        gated_activation(gate, up[:, :20], "silu")
    with pytest.raises(ValueError, match="differ"):
        gated_activation(gate, up.float(), "silu")


def test_model_layouts_take_no_copies():
    """The fused halves and the per-layer slice are read in place: one row stride each, views of the inputs."""
    fused = torch.randn(2, 3, 2 * 704, device=DEVICE)
    per_layer = torch.randn(2, 3, 5, 1000, device=DEVICE)
    for x, row_stride in [(fused[..., :704], 2 * 704), (fused[..., 704:], 2 * 704), (per_layer[:, :, 3], 5 * 1000),
                          (fused[:1, :1, 704:], None)]:  # one row (a decode step): its stride does not matter
        rows = _rows(x)
        assert rows.data_ptr() == x.data_ptr() and rows.shape == (x.numel() // x.shape[-1], x.shape[-1])
        assert rows.stride(1) == 1 and row_stride in (None, rows.stride(0))
    # Leading dims that do not collapse into one stride, or a strided last dim: read from a contiguous copy.
    for x in [per_layer[:, :, 3].transpose(0, 1), fused[..., ::2]]:
        rows = _rows(x)
        assert rows.is_contiguous() and torch.equal(rows.view(x.shape), x)


@pytest.mark.parametrize("name", ["gelu_pytorch_tanh", "silu"])
def test_layouts_that_need_a_copy(name):
    """Leading dims that interleave, or a stride along W: the kernel reads contiguous copies, same results."""
    torch.manual_seed(5)
    dtype = torch.bfloat16
    base = randn(3, 2, 2 * 96, dtype=dtype, scale=3.0)
    gate = base[..., :96].transpose(0, 1)  # [2, 3, 96], rows of the two leading dims interleaved
    up = base[..., 96:].transpose(0, 1)
    assert_matches(gated_activation(gate, up, name), eager(gate, up, name), gate, up, name)
    gate, up = base[..., ::2], base[..., 1::2]  # stride 2 along W
    assert_matches(gated_activation(gate, up, name), eager(gate, up, name), gate, up, name)


def test_empty_inputs_give_empty_outputs():
    for shape in [(0, 256), (2, 0, 704), (3, 0)]:
        gate = torch.empty(shape, device=DEVICE, dtype=torch.bfloat16)
        out = gated_activation(gate, torch.empty_like(gate), "gelu_pytorch_tanh")
        assert out.shape == shape and out.dtype == torch.bfloat16


def test_checks_are_sharp():
    """The comparisons catch a rounding point left out, the erf GELU for the tanh one, and a skewed tanh."""
    torch.manual_seed(6)
    name, dtype = "gelu_pytorch_tanh", torch.bfloat16
    gate, up = layouts("fused_halves", dtype)
    ref = eager(gate, up, name)
    out = gated_activation(gate, up, name)
    assert_matches(out, ref, gate, up, name)
    # act(gate) not rounded to bf16 before the product: within one ulp, but on far too many elements.
    unrounded = (activation(name)(gate.float()) * up.float()).to(dtype)
    assert not torch.equal(unrounded, out)
    with pytest.raises(AssertionError, match="elements differ"):
        assert_matches(unrounded, ref, gate, up, name)
    # fp32: the erf GELU (within 1e-3 of the tanh one), and a tanh scaled by 1 - 2^-22 (4 fp32 ulps near +-1).
    gate, up = gate.float(), up.float()
    ref = eager(gate, up, name)
    with pytest.raises(AssertionError, match="beyond the bound"):
        assert_matches(gated_activation(gate, up, "gelu"), ref, gate, up, name)
    # The skewed tanh checks the comparison itself, against the CPU's eager GELU (CUDA's tanhf has other last bits).
    gate, up = gate.cpu(), up.cpu()
    inner = 0.7978845608028654 * (gate + 0.044715 * gate**3)
    skewed = (0.5 * gate) * (1.0 + torch.tanh(inner) * (1 - 2.0**-22)) * up
    with pytest.raises(AssertionError, match="beyond the bound"):
        assert_matches(skewed, eager(gate, up, name), gate, up, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture():
    """No host syncs: a decode step's launch is captured once and replayed on new inputs."""
    gate, up = layouts("decode", torch.bfloat16)
    gated_activation(gate, up, "gelu_pytorch_tanh")  # compiles the kernel before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gated_activation(gate, up, "gelu_pytorch_tanh")
    new_gate, new_up = layouts("decode", torch.bfloat16)
    gate.copy_(new_gate)
    up.copy_(new_up)
    graph.replay()
    assert torch.equal(out, gated_activation(gate, up, "gelu_pytorch_tanh"))
