"""The quantized matmul kernel (gemma4.kernels.quantized_matmul: a few to a few hundred activation rows times a
QuantizedWeight, the weight dequantized tile by tile in registers) against the plain twin, F.linear(x,
weight.dequantize(x.dtype)): the same dequantized weights, bit for bit, so only the fp32 summation order differs;
or, for 8-bit weights with a scale per row, the exact values and the scales on the fp32 sums (within an ulp of the
twin, and bit for bit its sums where the scales are powers of two). `dequantize` (one pass) gives the twin's
weight bit for bit. Without a GPU the kernel runs in Triton's CPU
interpreter (conftest sets TRITON_INTERPRET=1); the last test compiles its launches for sm_90 in a process without
it."""

import struct

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from gemma4.kernels import quantized_matmul as qm, rounding, tuning  # noqa: E402
from gemma4.kernels.gemv import PER_ROW  # noqa: E402
from gemma4.kernels.quantized_matmul import max_rows, quantized_matmul, quantized_matmul_supported  # noqa: E402
from gemma4.model.quantized import ON_LOAD, QuantizedWeight, Scheme  # noqa: E402
from test_kernels_compile import compiling  # noqa: E402
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


def scales_after_sums(weight: QuantizedWeight) -> bool:
    """8-bit values with a scale per row: the kernel multiplies its fp32 sums of the exact values by the scales."""
    return qm._quantized_format(weight)[0]["WFMT"] == PER_ROW.value


def assert_equals_twin(x: torch.Tensor, weight: QuantizedWeight, tiles=None, share: float = 0.9):
    """The kernel against F.linear on the weight dequantized to x's dtype. fp32: summation order only (1e-5
    relative; the twin's q * scale rounded to fp32 moves a sum by less). 16-bit: one rounding of fp32 sums on both
    sides; with the same weights (scales that vary along K) a different order can flip the rounding by an ulp, so
    within an ulp and most elements equal; where the twin's weights are q * scale rounded to x's dtype (2^-9
    relative each) and the kernel's exact (scales per row), every sum moves by up to about an ulp of the outputs'
    magnitude (cancelling sums included), and by well under one on average."""
    out, want = quantized_matmul(x, weight, tiles), F.linear(x, weight.dequantize(x.dtype))
    assert out.shape == want.shape and out.dtype == want.dtype == x.dtype
    if x.dtype == torch.float32:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    elif scales_after_sums(weight):
        magnitude = want.float().abs().mean()  # the sums' moves scale with their terms, not with what cancels out
        torch.testing.assert_close(out.float(), want.float(), rtol=2**-7, atol=2**-7 * magnitude)
        assert (out.float() - want.float()).abs().mean() < 2**-8 * magnitude
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


@pytest.mark.parametrize("tiles", [(64, 64, 64, 4, 1), (64, 64, 64, 4, 1, 3), (64, 32, 64, 4, 1)])
@pytest.mark.parametrize("m", [5, 64, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_tiles_of_64_rows(fmt, dtype, m, tiles, monkeypatch):
    """Tiles of 64 weight rows and 64 activation rows, where fp8 weights per row run the transposed product (out.T =
    w @ x.T, the weight tile the MMA's A operand; with its K in slices too) and the other formats the plain one; 32
    weight rows: the plain one. Ragged N (70), K (160) and M (5, 130)."""
    monkeypatch.setattr(qm, "_sm_count", lambda device: 64)
    weight = quantized_weight(fmt, 70, 160, dtype)
    assert_equals_twin(rand(m, 160, dtype=dtype), weight, tiles)


@pytest.mark.parametrize("split_k", [2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_split_k(fmt, dtype, split_k, monkeypatch):
    """K cut into SPLIT_K slices of whole steps, summed by each output tile's last slice to finish: K = 160 is three
    64-input steps, so 2 slices take two steps and one (its second ragged), 3 slices one each, and 8 are cut back to
    3. The twin's product up to the fp32 summation order, as without slices; fp32 sums within 1e-5 of the unsliced
    kernel's; a second launch gives the same bits (the counters re-armed). (The 3 programs of the output's tiles
    leave SMs idle on a device of 64.)"""
    monkeypatch.setattr(qm, "_sm_count", lambda device: 64)
    weight = quantized_weight(fmt, 70, 160, dtype)
    x = rand(5, 160, dtype=dtype)
    assert qm._tiles(5, 70, 160, torch.device(DEVICE), (*STEPS, split_k))[-1] == min(split_k, 3)
    assert_equals_twin(x, weight, (*STEPS, split_k))
    assert torch.equal(quantized_matmul(x, weight, (*STEPS, split_k)), quantized_matmul(x, weight, (*STEPS, split_k)))
    if dtype == torch.float32:
        torch.testing.assert_close(quantized_matmul(x, weight, (*STEPS, split_k)), quantized_matmul(x, weight, STEPS),
                                   rtol=1e-5, atol=1e-5)


def test_split_k_only_where_programs_leave_sms_idle(monkeypatch):
    """A tile's SPLIT_K is a ceiling: a product takes the slices that bring its programs up to the SMs, no more."""
    monkeypatch.setattr(qm, "_sm_count", lambda device: 132)
    tile = (32, 64, 128, 4, 4, 4)
    assert qm._tiles(64, 2816, 4096, DEVICE, tile)[-1] == 2  # 2 x 44 = 88 programs -> 176
    assert qm._tiles(64, 1024, 4096, DEVICE, tile)[-1] == 4  # 32 programs: the tile's most
    assert qm._tiles(64, 8192, 2816, DEVICE, tile)[-1] == 1  # 256 programs: none
    assert qm._tiles(64, 262144, 2816, DEVICE, tile)[-1] == 1  # the LM head
    assert qm._tiles(64, 1024, 4096, DEVICE, tile[:5])[-1] == 1  # no SPLIT_K: none


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_default_tiles(fmt, dtype):
    """The tuned tiles (configs/default.json) on [2, 3, K] inputs: N = 200 over two rows of 128-row blocks, K = 288
    one whole 256-input step (two blocks' scales in it, eight int4 groups) and a ragged one."""
    weight = quantized_weight(fmt, 200, 288, dtype, seed=2)
    x = rand(2, 3, 288, dtype=dtype)
    assert_equals_twin(x, weight)
    assert quantized_matmul(x, weight).shape == (2, 3, 200)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_power_of_two_scales_give_the_twins_sums(fmt):
    """Scales per row rounded to powers of two: the twin's q * scale is exact in bf16, so the kernel's scaled sums are
    the twin's up to the summation order: most outputs equal, as for the formats that use the twin's weights."""
    weight = quantized_weight(fmt, 70, 160, torch.bfloat16)
    assert scales_after_sums(weight)
    scale = torch.exp2(weight.scale.float().log2().round()).to(weight.scale.dtype)
    exact = QuantizedWeight(weight.values, scale, weight.scheme)
    x = rand(64, 160, dtype=torch.bfloat16)
    out, want = quantized_matmul(x, exact, STEPS), F.linear(x, exact.dequantize(x.dtype))
    torch.testing.assert_close(out.float(), want.float(), rtol=2**-7, atol=1e-5)
    assert (out == want).float().mean() > 0.9


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


@pytest.mark.parametrize("tiles", [None, (16, 64, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_same_bits(fmt, dtype, tiles, monkeypatch):
    """dequantize is the twin's weight.dequantize bit for bit: ragged sides (N = 70 over 16-row tiles; K = 160 in one
    ragged tile or in 64-input steps), a fused weight's row block read through views, stacked experts as one
    matrix."""
    if tiles is not None:
        monkeypatch.setitem(tuning.config("quantized_matmul", torch.device(DEVICE)), "DEQUANTIZE_TILES", tiles)
    weight = quantized_weight(fmt, 70, 160, dtype)
    assert qm.dequantize_supported(weight) is None
    assert torch.equal(qm.dequantize(weight, dtype), weight.dequantize(dtype))
    if fmt == "fp8 blocks":  # block scales: one matrix at a time (row blocks would straddle stacked matrices)
        return
    parts = [quantized_weight(fmt, 24, 160, dtype, seed=i) for i in range(3)]
    fused = QuantizedWeight.cat(parts)
    view = QuantizedWeight(fused.values[24:48], fused.scale[24:48], fused.scheme)
    assert torch.equal(qm.dequantize(view, dtype), parts[1].dequantize(dtype))
    experts = QuantizedWeight(torch.stack([p.values for p in parts]), torch.stack([p.scale for p in parts]),
                              parts[0].scheme)
    assert qm.dequantize_supported(experts) is None
    assert torch.equal(qm.dequantize(experts, dtype), experts.dequantize(dtype))


def test_dense_takes_the_kernel_where_it_reads_the_weight(monkeypatch):
    """model/fused.py `dense` (prefill products, the grouped experts): the kernel on CUDA (here forced), the twin for
    what it cannot read (values not viewable as one matrix)."""
    from gemma4 import kernels
    from gemma4.model.fused import dense

    calls = []
    real = qm.dequantize
    monkeypatch.setattr(qm, "dequantize", lambda *args: calls.append(1) or real(*args))
    parts = [quantized_weight("fp8", 24, 160, torch.bfloat16, seed=i) for i in range(2)]
    experts = QuantizedWeight(torch.stack([p.values for p in parts]), torch.stack([p.scale for p in parts]),
                              parts[0].scheme)
    strided = QuantizedWeight(experts.values.transpose(0, 1), experts.scale.transpose(0, 1), experts.scheme)
    assert qm.dequantize_supported(strided) is not None
    with kernels.force():
        assert torch.equal(dense(experts, torch.bfloat16), experts.dequantize(torch.bfloat16)) and calls == [1]
        assert torch.equal(dense(strided, torch.bfloat16), strided.dequantize(torch.bfloat16)) and calls == [1]


def test_empty_and_strided_inputs():
    weight = quantized_weight("int8", 70, 160, torch.bfloat16)
    assert quantized_matmul(rand(0, 160, dtype=torch.bfloat16), weight).shape == (0, 70)
    x = rand(5, 320, dtype=torch.bfloat16)[:, ::2]  # no unit stride along K: copied
    assert torch.equal(quantized_matmul(x, weight, STEPS), quantized_matmul(x.contiguous(), weight, STEPS))
    assert max_rows() >= 64


def test_each_format_reads_its_own_tiles(monkeypatch):
    """BYTE_TILES_BY_M / BYTE_MAX_M decide for 8-bit weights (as INT4_ would for int4), the plain keys for the
    others: the tiles chosen, the rows up to which the model takes the kernel, and the product still the twin's."""
    table = tuning.config("quantized_matmul", torch.device(DEVICE))
    monkeypatch.setitem(table, "BYTE_TILES_BY_M", ((4, 16, 16, 32, 4, 1), (None, 32, 32, 64, 4, 1)))
    monkeypatch.setitem(table, "BYTE_MAX_M", 8)
    fp8, int4 = quantized_weight("fp8", 70, 160, torch.bfloat16), quantized_weight("int4", 70, 160, torch.bfloat16)
    assert qm._tiles(3, 70, 160, torch.device(DEVICE), None, fp8) == (16, 16, 32, 4, 1, 1)
    assert qm._tiles(5, 70, 160, torch.device(DEVICE), None, fp8) == (16, 32, 64, 4, 1, 1)  # BLOCK_M shrinks to 16
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


def run_ptx(asm: str, inputs: list[int], outputs: int) -> list[int]:
    """A few PTX instructions as FP8_TO_BF16 and FP8_PAIR_TO_BF16 use them (mov, prmt, shr, and, lop3 on .b32;
    cvt.u32.u16; fma.rn.bf16x2), run on Python ints: registers $0.. the outputs, then the inputs."""
    regs = {f"${i}": 0 for i in range(outputs)} | {f"${outputs + i}": v for i, v in enumerate(inputs)}

    def value(token: str) -> int:
        return regs[token] if token in regs else int(token, 0)

    def bf16(bits: int) -> float:  # a bf16 is the top half of an fp32
        return struct.unpack("<f", struct.pack("<I", bits << 16))[0]

    def bf16_bits(x: float) -> int:
        return torch.tensor([x], dtype=torch.float64).to(torch.bfloat16).view(torch.int16).item() & 0xFFFF

    for line in asm.replace("{", "").replace("}", "").split(";"):
        if not line.strip() or line.split()[0] == ".reg":
            continue
        op, *args = line.replace(",", " ").split()
        dst, *src = args
        v = [value(a) for a in src]
        if op == "mov.b32":
            out = v[0]
        elif op == "prmt.b32":  # default mode: selector nibble i picks byte i of the result from {b, a}
            pool = (v[0] | v[1] << 32).to_bytes(8, "little")
            out = int.from_bytes(bytes(pool[(v[2] >> 4 * i) & 7] for i in range(4)), "little")
        elif op == "cvt.u32.u16":
            out = v[0] & 0xFFFF
        elif op == "shr.b32":
            out = v[0] >> v[1]
        elif op == "and.b32":
            out = v[0] & v[1]
        elif op == "lop3.b32":
            a, b, c, lut = v
            out = sum(((lut >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1))) & 1) << i for i in range(32))
        elif op == "fma.rn.bf16x2":
            lanes = [bf16_bits(bf16(v[0] >> s & 0xFFFF) * bf16(v[1] >> s & 0xFFFF) + bf16(v[2] >> s & 0xFFFF))
                     for s in (0, 16)]
            out = lanes[0] | lanes[1] << 16
        else:
            raise NotImplementedError(op)
        regs[dst] = out & 0xFFFFFFFF
    return [regs[f"${i}"] for i in range(outputs)]


def test_fp8_to_bf16_asm_reads_every_code():
    """rounding.FP8_TO_BF16 (fp8 tiles for bf16 dots, here, in the sorted MoE kernels and in decode attention over an
    fp8 cache; PTX, run here by a small emulator of its instructions) gives torch's bf16 of every fp8 e4m3 code,
    subnormals and both zeros included, in byte order; the NaN codes read 480. So does FP8_PAIR_TO_BF16, two codes at
    a time."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    want = codes.view(torch.float8_e4m3fn).to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    nan = torch.tensor([0x7F, 0xFF])
    want[nan] = torch.tensor([480.0, -480.0]).to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    got = []
    for word in codes.view(-1, 4).to(torch.int64):
        low, high = run_ptx(rounding.FP8_TO_BF16.value, [int(sum(int(b) << 8 * i for i, b in enumerate(word)))], 2)
        got += [low & 0xFFFF, low >> 16, high & 0xFFFF, high >> 16]
    assert got == want.tolist()
    pairs = []  # FP8_PAIR_TO_BF16: two codes in a 16-bit register
    for low, high in codes.view(-1, 2).to(torch.int64).tolist():
        (out,) = run_ptx(rounding.FP8_PAIR_TO_BF16.value, [low | high << 8], 1)
        pairs += [out & 0xFFFF, out >> 16]
    assert pairs == want.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the inline PTX runs on CUDA")
@pytest.mark.parametrize("keep_layout, pairs", [(False, False), (True, False), (False, True)])
def test_fp8_dot_operand_on_the_gpu(keep_layout, pairs):
    """The same on the GPU: dot_operand's bf16 of every fp8 code (NaN codes aside) is torch's, the conversion free to
    move into the dot operand's layout or kept in the loaded one, four codes at a time or two."""
    import triton
    import triton.language as tl

    @triton.jit
    def operand(w_ptr, like_ptr, out_ptr, KEEP_LAYOUT: tl.constexpr, PAIRS: tl.constexpr):
        i = tl.arange(0, 256)
        tl.store(out_ptr + i, rounding.dot_operand(tl.load(w_ptr + i), tl.load(like_ptr + i), False, KEEP_LAYOUT,
                                                   PAIRS))

    codes = torch.arange(256, dtype=torch.int32, device="cuda").to(torch.uint8)
    codes = codes[(codes != 0x7F) & (codes != 0xFF)]
    codes = torch.cat([codes, codes[:2]])  # 256 values
    out = torch.empty(256, dtype=torch.bfloat16, device="cuda")
    operand[(1,)](codes.view(torch.float8_e4m3fn), torch.zeros(256, dtype=torch.bfloat16, device="cuda"), out,
                  keep_layout, pairs)
    assert torch.equal(out.view(torch.int16), codes.view(torch.float8_e4m3fn).to(torch.bfloat16).view(torch.int16))


def tuned_tiles() -> list[tuple[str, tuple]]:
    """(format, tile) for every tile of every device's TILES_BY_M, in the formats that read it: the BYTE_ table's in
    fp8, the INT4_ table's in int4, the plain table's in both."""
    formats = {"": ("int4", "fp8"), "BYTE_": ("fp8",), "INT4_": ("int4",)}
    return sorted({(fmt, tuple(entry[1:])) for table in tuning.every_device("quantized_matmul").values()
                   for prefix, fmts in formats.items() for entry in table.get(prefix + "TILES_BY_M", ())
                   for fmt in fmts})


def fp8_midpoints() -> torch.Tensor:
    """Every positive fp8 e4m3 value and the midpoint above it (ties, which go to the even neighbour), 448 last:
    exact in bf16 (e4m3's 3 mantissa bits and one more)."""
    values = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 2^-9 .. 448, no NaN
    return torch.cat([values[:-1], (values[:-1] + values[1:]) / 2, values[-1:]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_rows_equal_the_twin(dtype):
    """The per-token fp8 quantization of activation rows (W8A8): the kernel's scales bit for bit the twin's
    (model/quantized.py `fp8_rows`: amax / 448), its bytes the twin's round-to-nearest-even ones (rounding.store_fp8,
    the KV cache's store). Rows: random over one BLOCK_K step and over three (ragged), an all-zero row (the smallest
    normal scale, zeros out), each e4m3 value and midpoint with both signs at a scale of 1, values below e4m3's
    normals and -0."""
    from gemma4.model.quantized import fp8_rows
    ties = fp8_midpoints()
    for k in (640, 5000):
        x = rand(6, k, dtype=dtype) * 3
        x[1] = 0
        x[2, :2 * len(ties)] = torch.cat([ties, -ties]).to(x.dtype)
        x[3, :5] = torch.tensor([1e3, 1e-4, -3e-3, 2e-3, -0.0])  # under 2^-6 of amax / 448: e4m3 subnormals
        quantized, scale = qm.fp8_rows(x)
        want, want_scale = fp8_rows(x)
        assert quantized.dtype == torch.float8_e4m3fn and scale.shape == (6, 1) and scale.dtype == torch.float32
        assert torch.equal(scale, want_scale) and scale[2].item() == 1.0
        amax = x.abs().amax(-1, keepdim=True).double().clamp(min=torch.finfo(torch.float32).tiny)
        assert torch.equal(want_scale, (amax / 448).float())  # amax / 448 correctly rounded, also on CUDA
        assert torch.equal(quantized.view(torch.uint8), want.view(torch.uint8))
        assert torch.equal(quantized[2, :2 * len(ties)].float().abs()[:len(ties)],
                           ties.to(torch.float8_e4m3fn).float().to(DEVICE))  # ties to even, as torch's cast
        assert not quantized[1].float().any()


def test_scaled_linear_is_the_product_of_the_quantized_operands():
    """W8A8's product (torch._scaled_mm): fp32 sums of the fp8 rows times the fp8 weight, scaled by both scales, as
    the dequantized operands' product in fp32 (exact terms: 4 + 4 significant bits times a scale); in bf16 that
    rounded once. On CUDA in bf16 (cuBLAS's fp8 GEMM) the sums are looser: Hopper's fp8 MMA adds in less than fp32's
    precision (measured on an H100: up to 1.2e-4 of the sum of the terms' magnitudes, 2^-13), so there each output
    is within 2^-11 of that sum plus one bf16 ulp."""
    from gemma4.model.quantized import fp8_rows, scaled_linear
    weight = quantized_weight("fp8", 96, 160, torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        x = rand(2, 5, 160, dtype=dtype)
        quantized, scale = fp8_rows(x.reshape(-1, 160))
        rows, dense = quantized.float() * scale, weight.dequantize(torch.float32)
        want = rows @ dense.t()
        out = scaled_linear(x, weight)
        assert out.shape == (2, 5, 96) and out.dtype == dtype
        if x.is_cuda and dtype == torch.bfloat16:
            bound = 2**-11 * (rows.abs() @ dense.abs().t()) + 2**-7 * want.abs()
            assert ((out.reshape(-1, 96).float() - want).abs() <= bound).all()
        else:
            torch.testing.assert_close(out.reshape(-1, 96).float(), want.to(dtype).float(), rtol=1e-5, atol=1e-5)


def test_fp8_activations_take_several_rows_of_fp8_weights_only():
    """The option's reach (model/fused.py `product`): products of several rows with fp8 per-channel weights run
    W8A8; one row (a batch-1 decode step, the GEMVs' case) and the other formats stay weight-only. Off unless
    GEMMA4_FP8_ACTIVATIONS=1."""
    from gemma4.model import fused
    from gemma4.model.quantized import scaled_linear
    from gemma4.options import Options, override
    assert Options.from_environ({"GEMMA4_FP8_ACTIVATIONS": "1"}).fp8_activations
    assert not Options.from_environ({}).fp8_activations and not Options().fp8_activations
    weights = {fmt: quantized_weight(fmt, 96, 160, torch.float32) for fmt in ("fp8", "int8", "int4")}
    one, several = rand(1, 160, dtype=torch.float32), rand(3, 160, dtype=torch.float32)
    weight_only = {(fmt, len(x)): fused.product(x, w) for fmt, w in weights.items() for x in (one, several)}
    with override(fp8_activations=True):
        assert torch.equal(fused.product(several, weights["fp8"]), scaled_linear(several, weights["fp8"]))
        assert not torch.equal(fused.product(several, weights["fp8"]), weight_only["fp8", 3])
        for (fmt, rows), want in weight_only.items():
            if (fmt, rows) != ("fp8", 3):
                assert torch.equal(fused.product(one if rows == 1 else several, weights[fmt]), want)


# Runs in a process without TRITON_INTERPRET: tests/sm90_compile.py's launch compiler (JITFunction.run compiles the
# launch for sm_90 instead of running it) on the kernel's launches: every format, the three activation dtypes, the
# tiles of every device's TILES_BY_M (and the formats' own), K in slices, PDL on; and dequantize's, every format.
COMPILE_LAUNCHES = r"""
import torch
import sm90_compile
from gemma4.kernels import quantized_matmul as qm
from test_kernels_quantized_matmul import FORMATS, quantized_weight, tuned_tiles

sm90_compile.compile_launches(qm)
qm._sm_count = lambda device: 132  # an H100's: the slices of K below are taken
for fmt in FORMATS:
    qm.quantized_matmul(torch.randn(4, 4096, dtype=torch.bfloat16), quantized_weight(fmt, 2048, 4096, torch.bfloat16))
for dtype, fmt in ((torch.float16, "int4"), (torch.float32, "fp8")):
    qm.quantized_matmul(torch.randn(4, 4096, dtype=dtype), quantized_weight(fmt, 2048, 4096, dtype))
for fmt, tile in tuned_tiles():
    qm.quantized_matmul(torch.randn(tile[0], 4096, dtype=torch.bfloat16),
                        quantized_weight(fmt, 2048, 4096, torch.bfloat16), tile)
for fmt in ("fp8", "int4"):  # K in slices, summed by each tile's last slice
    qm.quantized_matmul(torch.randn(64, 4096, dtype=torch.bfloat16), quantized_weight(fmt, 2048, 4096, torch.bfloat16),
                        (32, 64, 128, 4, 4, 4))
for fmt in FORMATS:
    qm.dequantize(quantized_weight(fmt, 2048, 4096, torch.bfloat16), torch.bfloat16)
for k in (2816, 5000):  # fp8 activation rows: one step, several with a ragged last
    qm.fp8_rows(torch.randn(64, k, dtype=torch.bfloat16))
print("\n".join(sm90_compile.compiled))
print(len(sm90_compile.compiled), "launches compiled for sm_90")
"""


def test_compiles_for_sm90():
    done = compiling("-c", COMPILE_LAUNCHES)
    launches = len(FORMATS) + 2 + len(tuned_tiles()) + 2 + len(FORMATS) + 2  # + K in slices, dequantize's, fp8 rows
    assert f"{launches} launches compiled for sm_90" in done.stdout, done.stdout[-3000:]
