"""The quantized matmul kernel (gemma4.kernels.quantized_matmul: a few to a few hundred activation rows times a
QuantizedWeight, the weight dequantized tile by tile in registers) against the plain twin,
F.linear(x, weight.dequantize(x.dtype)): the same dequantized weights, bit for bit, so only the fp32 summation order
differs. Without a GPU the kernel runs in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1); the last test
compiles its launches for sm_90 in a process without it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from gemma4.kernels import tuning  # noqa: E402
from gemma4.kernels.quantized_matmul import max_rows, quantized_matmul, quantized_matmul_supported  # noqa: E402
from gemma4.model.quantized import ON_LOAD, QuantizedWeight, Scheme  # noqa: E402
from test_kernels_gemv_quantized import quantized_weight  # noqa: E402  (every format, as the GEMV tests make them)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXTRA_SCHEMES = {"int4 per channel": Scheme("int", 4, "channel"), "int8 groups": Scheme("int", 8, "group", 32)}
# The quantize-on-load schemes (fp8/int8 per channel, int4 in groups of 32), int4 per channel, 8-bit groups, and fp8
# 128x128 blocks as checkpoints hold them.
FORMATS = [*ON_LOAD, *EXTRA_SCHEMES, "fp8 blocks"]
# Small tiles: N = 70 takes two whole 32-row tiles and a ragged one; K = 160 two 64-input steps and a ragged half
# one (a whole int4 group; 8-bit blocks of 128 wider than a step: one scale a tile); M = 5 a ragged 32-row block,
# M = 64 two.
STEPS = (32, 32, 64, 4, 1)


def rand(*shape, dtype, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def assert_equals_twin(x: torch.Tensor, weight: QuantizedWeight, tiles=None, share: float = 0.9):
    """The kernel against F.linear on the weight dequantized to x's dtype. fp32: summation order only (1e-5
    relative). 16-bit: the same bf16/fp16 weights and one rounding of fp32 sums on both sides; a different order can
    flip the rounding by an ulp, so within an ulp and most elements equal."""
    out, want = quantized_matmul(x, weight, tiles), F.linear(x, weight.dequantize(x.dtype))
    assert out.shape == want.shape and out.dtype == want.dtype == x.dtype
    if x.dtype == torch.float32:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out.float(), want.float(), rtol=2**-7, atol=1e-5)
        assert (out == want).float().mean() > share


@pytest.mark.parametrize("m", [2, 5, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_equals_dequantized_product(fmt, dtype, m):
    """Ragged N, K and M over small tiles (STEPS)."""
    weight = quantized_weight(fmt, 70, 160, dtype)
    assert quantized_matmul_supported(weight) is None
    assert_equals_twin(rand(m, 160, dtype=dtype), weight, STEPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_default_tiles(fmt, dtype):
    """The tuned tiles (configs/default.json) on [2, 3, K] inputs: N = 200 over two rows of 128-row blocks, K = 288
    one whole 256-input step (two blocks' scales in it, eight int4 groups) and a ragged one."""
    weight = quantized_weight(fmt, 200, 288, dtype, seed=2)
    x = rand(2, 3, 288, dtype=dtype)
    assert_equals_twin(x, weight)
    assert quantized_matmul(x, weight).shape == (2, 3, 200)


def test_fp16_and_fp32_scales():
    """fp16 activations; fp32 scales under bf16 activations (the dequantized weight still rounded to bf16)."""
    weight = quantized_weight("int4", 70, 160, torch.float16)
    assert_equals_twin(rand(5, 160, dtype=torch.float16), weight, STEPS)
    weight = quantized_weight("fp8", 70, 160, torch.float32)
    assert weight.scale.dtype == torch.float32
    assert_equals_twin(rand(5, 160, dtype=torch.bfloat16), weight, STEPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_row_sliced_views(fmt, dtype):
    """A fused weight's row blocks (QuantizedWeight.cat, as the fused qkv / gate-up projections), each product read
    through views into the fused buffers (values and scales at an offset); and values and scales inside wider
    buffers (a row stride past K, a scale column stride past 1)."""
    rows = (128, 72) if fmt == "fp8 blocks" else (48, 24, 30)  # block scales: layers of whole 128-row blocks
    parts = [quantized_weight(fmt, n, 160, dtype, seed=i) for i, n in enumerate(rows)]
    fused = QuantizedWeight.cat(parts)
    x = rand(5, 160, dtype=dtype)
    value_start = scale_start = 0
    for part in parts:
        n, scale_n = part.values.shape[0], part.scale.shape[0]
        values, scale = fused.values[value_start:value_start + n], fused.scale[scale_start:scale_start + scale_n]
        view = QuantizedWeight(values, scale, part.scheme)
        assert view.values.storage_offset() == value_start * fused.values.stride(0)
        assert_equals_twin(x, view, STEPS)
        value_start, scale_start = value_start + n, scale_start + scale_n
    part = parts[-1]
    wide_values = torch.zeros(part.values.shape[0], part.values.shape[1] + 24, dtype=part.values.dtype, device=DEVICE)
    wide_scale = torch.zeros(part.scale.shape[0], 3 * part.scale.shape[1], dtype=part.scale.dtype, device=DEVICE)
    wide_values[:, 8:8 + part.values.shape[1]] = part.values
    wide_scale[:, ::3] = part.scale
    view = QuantizedWeight(wide_values[:, 8:8 + part.values.shape[1]], wide_scale[:, ::3], part.scheme)
    assert not view.values.is_contiguous() and not view.scale.is_contiguous()
    assert_equals_twin(x, view, STEPS)


def test_empty_and_strided_inputs():
    weight = quantized_weight("int8", 70, 160, torch.bfloat16)
    assert quantized_matmul(rand(0, 160, dtype=torch.bfloat16), weight).shape == (0, 70)
    x = rand(5, 320, dtype=torch.bfloat16)[:, ::2]  # no unit stride along K: copied
    assert torch.equal(quantized_matmul(x, weight, STEPS), quantized_matmul(x.contiguous(), weight, STEPS))
    assert max_rows() >= 64


def test_each_format_reads_its_own_tiles(monkeypatch):
    """BYTE_TILES_BY_M / BYTE_MAX_M decide for 8-bit weights (as INT4_ would for int4), the plain keys for the
    others: the tiles chosen, the rows up to which the model takes the kernel, and the product still the twin's."""
    from gemma4.kernels import quantized_matmul as qm

    table = tuning.config("quantized_matmul", torch.device(DEVICE))
    monkeypatch.setitem(table, "BYTE_TILES_BY_M", ((4, 16, 16, 32, 4, 1), (None, 32, 32, 64, 4, 1)))
    monkeypatch.setitem(table, "BYTE_MAX_M", 8)
    fp8, int4 = quantized_weight("fp8", 70, 160, torch.bfloat16), quantized_weight("int4", 70, 160, torch.bfloat16)
    assert qm._tiles(3, 70, 160, torch.device(DEVICE), None, fp8) == (16, 16, 32, 4, 1)
    assert qm._tiles(5, 70, 160, torch.device(DEVICE), None, fp8) == (16, 32, 64, 4, 1)  # BLOCK_M shrinks to 16
    want = next(entry[1:] for entry in table["TILES_BY_M"] if entry[0] is None or 5 <= entry[0])
    assert qm._tiles(5, 70, 160, torch.device(DEVICE), None, int4) == qm._tiles(5, 70, 160, DEVICE, want)
    assert max_rows(torch.device(DEVICE), fp8) == 8 and max_rows(torch.device(DEVICE), int4) == table["MAX_M"]
    assert_equals_twin(rand(5, 160, dtype=torch.bfloat16), fp8)


def test_unsupported_weights():
    """What the dispatch must leave to the twin: stacked experts, values without unit stride along K, groups that
    are not a power of 2."""
    weight = quantized_weight("int8", 48, 64, torch.bfloat16)
    experts = QuantizedWeight(weight.values.expand(2, 48, 64), weight.scale.expand(2, 48, 1), weight.scheme)
    transposed = QuantizedWeight(weight.values.t(), weight.scale[:1].expand(64, 1), weight.scheme)
    odd_groups = QuantizedWeight(weight.values, weight.scale.expand(48, 2), Scheme("int", 8, "group", 24))
    for bad in (experts, transposed, odd_groups):
        reason = quantized_matmul_supported(bad)
        assert isinstance(reason, str)
        with pytest.raises(ValueError, match="quantized_matmul does not read"):
            quantized_matmul(rand(2, bad.shape[-1], dtype=torch.bfloat16), bad)


def tuned_tiles() -> list[tuple[str, tuple]]:
    """(format, tile) for every tile of every device's TILES_BY_M, in the formats that read it: the BYTE_ table's in
    fp8, the INT4_ table's in int4, the plain table's in both."""
    formats = {"": ("int4", "fp8"), "BYTE_": ("fp8",), "INT4_": ("int4",)}
    return sorted({(fmt, tuple(entry[1:])) for table in tuning.every_device("quantized_matmul").values()
                   for prefix, fmts in formats.items() for entry in table.get(prefix + "TILES_BY_M", ())
                   for fmt in fmts})


# Runs in a process without TRITON_INTERPRET: tests/sm90_compile.py's launch compiler (JITFunction.run compiles the
# launch for sm_90 instead of running it) on the kernel's launches: every format, the three activation dtypes, the
# tiles of every device's TILES_BY_M (and the formats' own), PDL on.
COMPILE_LAUNCHES = r"""
import torch
import sm90_compile
from triton.runtime.jit import JITFunction
from gemma4.kernels import quantized_matmul as qm
from test_kernels_quantized_matmul import FORMATS, quantized_weight, tuned_tiles

JITFunction.run = sm90_compile._compile_launch
qm.launch_options = lambda x: {"PDL": True, "launch_pdl": True}
for fmt in FORMATS:
    qm.quantized_matmul(torch.randn(4, 4096, dtype=torch.bfloat16), quantized_weight(fmt, 2048, 4096, torch.bfloat16))
for dtype, fmt in ((torch.float16, "int4"), (torch.float32, "fp8")):
    qm.quantized_matmul(torch.randn(4, 4096, dtype=dtype), quantized_weight(fmt, 2048, 4096, dtype))
for fmt, tile in tuned_tiles():
    qm.quantized_matmul(torch.randn(tile[0], 4096, dtype=torch.bfloat16),
                        quantized_weight(fmt, 2048, 4096, torch.bfloat16), tile)
print("\n".join(sm90_compile.compiled))
print(len(sm90_compile.compiled), "launches compiled for sm_90")
"""


def test_compiles_for_sm90():
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU tensors of the quantized_weight helper
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root / "tests"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", COMPILE_LAUNCHES], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    launches = len(FORMATS) + 2 + len(tuned_tiles())
    assert f"{launches} launches compiled for sm_90" in done.stdout, done.stdout[-3000:]
