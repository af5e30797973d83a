"""Quantized weights: the formats of compressed-tensors checkpoints (int4 in groups, int8 and fp8 per channel, fp8
in blocks) and the same formats made from a bf16 weight on load.

A `QuantizedWeight` holds a [N, K] linear weight as `values` and `scale`; `dequantize` is the plain PyTorch twin of
every kernel that reads one: w = values * scale, the product exact in fp32 and rounded once to the compute dtype, as
compressed-tensors' own decompression (it multiplies in the scale's dtype, bf16 in the releases: one rounding of the
same exact product). Products are weight-only: activations stay in the model dtype, also for checkpoints whose
scheme quantizes them dynamically (W8A8, FP8-dynamic), which the product then approximates more closely.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import cpu as cpu_kernels

FP8_MAX = 448.0  # float8_e4m3fn


@dataclass(frozen=True)
class Scheme:
    """How a weight is quantized; symmetric, no zero points.

    kind "int" or "float", `bits` 4 or 8; strategy "channel" (one scale per output row), "group" (`group_size`
    inputs of a row share a scale) or "block" (`block` = (rows, cols) tiles share one)."""
    kind: str
    bits: int
    strategy: str
    group_size: int | None = None
    block: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        size = f"/{self.group_size}" if self.group_size else f"/{self.block[0]}x{self.block[1]}" if self.block else ""
        return f"{self.kind}{self.bits} per {self.strategy}{size}"

    @property
    def packed(self) -> bool:
        """int4 values stay packed as the checkpoints store them: 8 per int32 word, element j of a row in bits
        4*(j % 8) of word j // 8, stored as q + 8."""
        return self.kind == "int" and self.bits == 4

    def scale_shape(self, n: int, k: int) -> tuple[int, int]:
        """The scale's shape for a [N, K] weight."""
        if self.strategy == "channel":
            return n, 1
        if self.strategy == "group":
            return n, k // self.group_size
        return -(-n // self.block[0]), -(-k // self.block[1])


# `quantization=` of the loaders: what a bf16 checkpoint becomes (weights only, so the product equals dequantizing
# and running the model in its dtype on the same values).
INT8_PER_CHANNEL = Scheme("int", 8, "channel")
ON_LOAD = {"fp8": Scheme("float", 8, "channel"), "int8": INT8_PER_CHANNEL,
           "int4": Scheme("int", 4, "group", group_size=32)}


def _qmax(kind: str, bits: int) -> float:
    """The scale divides the absolute maximum by this (compressed-tensors: half the integer range, so int8 maps
    the maximum to 127.5 and rounds the negative end to -128; fp8: its largest finite value)."""
    return FP8_MAX if kind == "float" else (2**bits - 1) / 2


def _round(scaled: torch.Tensor, kind: str, bits: int) -> torch.Tensor:
    """Values in the quantized type's grid, still as floats: clamp, then round half to even or cast to fp8."""
    if kind == "float":
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(scaled.dtype)
    return scaled.clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).round_()  # `scaled` is the caller's temporary


def _per_scale(x: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """x [..., N, K] viewed as [..., N, scales per row, elements sharing one scale] (channel or group strategies)."""
    if scheme.strategy == "channel":
        return x.unsqueeze(-2)
    return x.unflatten(-1, (-1, scheme.group_size))


@dataclass
class QuantizedWeight:
    """values: fp8 e4m3 [..., N, K], int8 [..., N, K], or int4 packed in int32 [..., N, K / 8]; scale: float
    [..., *scheme.scale_shape(N, K)]. Leading dimensions: one matrix per expert.

    `cpu_scales_and_zeros` set: an int4 matrix in the layout of the CPU's int4 kernel (`to_cpu_int4`): values uint8
    [N, K / 2], and this [K / group, N, 2] tensor of (scale, 0) pairs, which `scale` views.
    `chunk` > 0: int4 words stored chunk by chunk for the native CPU kernel (`to_chunks`; the tensor keeps its shape
    [N, K / 8] but not its rows' order in memory)."""
    values: torch.Tensor
    scale: torch.Tensor
    scheme: Scheme
    cpu_scales_and_zeros: torch.Tensor | None = None
    chunk: int = 0

    @property
    def shape(self) -> torch.Size:
        *lead, k = self.values.shape
        return torch.Size((*lead, k * (2 if self.cpu_scales_and_zeros is not None else 8) if self.scheme.packed
                           else k))

    def __getitem__(self, index) -> QuantizedWeight:
        """One expert's matrix (index over the leading dimension)."""
        return QuantizedWeight(self.values[index], self.scale[index], self.scheme)

    def integers(self) -> torch.Tensor:
        """The quantized values [..., N, K] as int8 (int formats) or fp8."""
        if self.cpu_scales_and_zeros is not None:
            return unpack_cpu_int4(self.values)
        if self.chunk:
            return unpack(from_chunks(self.values, self.chunk), 4)
        return unpack(self.values, 4) if self.scheme.packed else self.values

    def in_checkpoint_layout(self) -> QuantizedWeight:
        """The matrix as checkpoints (and the CUDA kernels) hold it: int4 back in int32 words from the CPU's layouts."""
        if self.chunk:
            return QuantizedWeight(from_chunks(self.values, self.chunk), self.scale, self.scheme)
        if self.cpu_scales_and_zeros is None:
            return self
        return QuantizedWeight(pack(self.integers(), 4), self.scale.contiguous(), self.scheme)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """values * scale rounded to `dtype`. The product is exact in fp32 (q: at most 8 significant bits, a scale of
        16 bits at most 11), so where the scale already is of `dtype` it is computed in `dtype` (torch multiplies in
        fp32 and rounds once): the same result in fewer, narrower passes."""
        compute = dtype if self.scale.dtype == dtype else torch.float32
        q = self.integers().to(compute)
        scale = self.scale.to(compute)
        if self.scheme.strategy == "block":  # ragged edge blocks: the scale tiles cut to the matrix
            rows, cols = self.scheme.block
            scale = scale.repeat_interleave(rows, -2)[..., : q.shape[-2], :].repeat_interleave(cols, -1)
            return (q * scale[..., : q.shape[-1]]).to(dtype)
        return (_per_scale(q, self.scheme) * scale.unsqueeze(-1)).flatten(-2).reshape(q.shape).to(dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ w.T, the plain way: the dequantized weight in x's dtype."""
        return F.linear(x, self.dequantize(x.dtype))

    @staticmethod
    def cat(weights: list[QuantizedWeight]) -> QuantizedWeight:
        """Row blocks stacked (fused projections): values and scales concatenated along the output rows. In the CPU
        int4 layout (`to_cpu_int4`: blocks of whole 64-row blocks) too, or as checkpoints hold them where the
        layouts are mixed."""
        layouts = {w.cpu_scales_and_zeros is not None for w in weights}
        if layouts == {True}:
            scales_and_zeros = torch.cat([w.cpu_scales_and_zeros for w in weights], 1)
            return QuantizedWeight(torch.cat([w.values for w in weights]), scales_and_zeros[..., 0].t(),
                                   weights[0].scheme, scales_and_zeros)
        weights = [w.in_checkpoint_layout() for w in weights]
        return QuantizedWeight(torch.cat([w.values for w in weights]), torch.cat([w.scale for w in weights]),
                               weights[0].scheme)


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation rows [M, K] quantized dynamically per row (per token) to fp8 e4m3, as FP8-dynamic checkpoints'
    input_activations say: scale = amax / 448 in fp32, q = x / scale rounded to nearest (|q| <= 448 by
    construction). Returns (q [M, K], scale [M, 1] fp32); an all-zero row gets the smallest normal scale. The scale is
    the correctly rounded quotient on every device: torch on CUDA multiplies by a Python number's reciprocal instead
    of dividing by it (1 ulp off for most maxima), so the divisor is a tensor (filled on the device: no copy from the
    host, which a CUDA graph's capture would refuse)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=torch.finfo(torch.float32).tiny)
    scale = amax / torch.full_like(amax, FP8_MAX)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_activations_reads(weight: QuantizedWeight) -> bool:
    """Whether `scaled_linear` takes this weight: one [N, K] fp8 matrix with a scale per row, N and K multiples of
    16 (the fp8 GEMMs' operand alignment)."""
    n_out, k_in = weight.shape
    return (weight.values.dtype == torch.float8_e4m3fn and weight.scheme.strategy == "channel"
            and weight.values.dim() == 2 and n_out % 16 == 0 and k_in % 16 == 0 and weight.values.stride(-1) == 1)


def scaled_linear(x: torch.Tensor, weight: QuantizedWeight, rows=fp8_rows) -> torch.Tensor:
    """x @ w.T with the activations quantized per row to fp8 (`rows`: fp8_rows or a kernel giving its bits) and the
    fp8 weight as stored, on the fp8 tensor cores (W8A8): fp32 sums of the exact products q_x * q_w, times the row's
    and the weight row's scales, rounded once to x's dtype. Against the weight-only product each activation moves
    by up to 2^-4 of itself (e4m3's 3 mantissa bits), as the checkpoint's scheme specifies."""
    flat = x.reshape(-1, x.shape[-1])
    quantized, scale = rows(flat)
    if x.is_cuda and x.dtype != torch.bfloat16:  # CUDA's row-scaled fp8 GEMM writes bf16: the same sums in fp32
        out = ((quantized.float() * scale) @ weight.dequantize(torch.float32).t()).to(x.dtype)
    else:
        out = torch._scaled_mm(quantized, weight.values.t(), scale_a=scale,
                               scale_b=weight.scale.float().reshape(1, -1), out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def quantize(weight: torch.Tensor, scheme: Scheme, for_cpu: bool = False, whole_rows=None) -> QuantizedWeight:
    """weight [..., N, K] -> its `scheme` form, as llm-compressor's min-max observer and compressed-tensors make it:
    scale = absmax / qmax per channel / group / block, in the weight's dtype; values = the scaled weight rounded.
    `for_cpu`: int4 packed straight into the CPU kernel's layout (`to_cpu_int4` of the result, without the words).
    `whole_rows`: for a weight that holds some of each row's inputs (a tensor-parallel part), the absolute maxima of
    the whole rows from this part's [..., N, 1] (a maximum over the ranks): per-channel scales are then the whole
    matrix's (exactly: a maximum rounds nothing)."""
    assert scheme.strategy != "block", "blocks are read from checkpoints, not made on load"
    grouped = _per_scale(weight, scheme)
    low, high = grouped.aminmax(dim=-1)  # the absolute maximum, without a copy of |weight|
    absmax = torch.maximum(high, -low)
    if whole_rows is not None and scheme.strategy == "channel":
        absmax = whole_rows(absmax)
    scale = absmax / _qmax(scheme.kind, scheme.bits)
    scale = torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)
    q = _round(grouped / scale.unsqueeze(-1), scheme.kind, scheme.bits).flatten(-2).reshape(weight.shape)
    if scheme.kind == "float":
        return QuantizedWeight(q.to(torch.float8_e4m3fn), scale, scheme)
    if not scheme.packed:
        return QuantizedWeight(q.to(torch.int8), scale, scheme)
    if for_cpu:
        return _cpu_int4(pack_cpu_int4(_unsigned(q, 4)), scale, scheme)
    return QuantizedWeight(pack(q, 4), scale, scheme)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integers [..., K] (as floats or ints) -> int32 words [..., K * bits / 32], as compressed-tensors packs
    them: element j of a row in bits bits * (j % (32 / bits)) of word j // (32 / bits), stored as q + 2^(bits - 1).
    Made as bytes (int4: element 2i in the low nibble of byte i, 2i + 1 in the high one), then read as
    little-endian words: a quarter of the memory traffic of shifting int32s."""
    return pack_unsigned(_unsigned(q, bits), bits)


def pack_unsigned(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack` of integers already stored as q + 2^(bits - 1): uint8 [..., K]."""
    if bits == 4:
        unsigned = unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)
    return unsigned.contiguous().view(torch.int32)


def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`: int8 [..., K]."""
    unsigned = unpack_unsigned(words, bits)
    return (unsigned ^ 0x80).view(torch.int8) if bits == 8 else unsigned.view(torch.int8) - 8


def unpack_unsigned(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The stored fields q + 2^(bits - 1) of int32 words, as uint8 [..., K]."""
    data = words.contiguous().view(torch.uint8)
    return torch.stack([data & 0xF, data >> 4], -1).flatten(-2) if bits == 4 else data


def _unsigned(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q + 2^(bits - 1) as uint8 (in q's float type where it holds the sum exactly: bf16 up to 256)."""
    wide = q if q.is_floating_point() else q.to(torch.int16)
    return (wide + 2 ** (bits - 1)).to(torch.uint8)


assert sys.byteorder == "little", "packed int4/int8 words are read as little-endian bytes"


# --- the CPU's weight-only kernels (torch.ops.aten) ---------------------------------------------------------------
# _weight_int8pack_mm reads int8 [N, K] as stored, with a scale per row; _weight_int4pack_mm_for_cpu reads int4 in
# groups from its own layout, which _convert_weight_to_int4pack_for_cpu makes: for N a multiple of 64, blocks of 64
# rows; in a block, input column k is 32 bytes, row j's value + 8 in the low nibble of byte j and row j + 32's in the
# high one. Both multiply in fp32 and round the output once to the activations' dtype; with bf16 activations they
# are several times faster than with fp32 ones on CPUs with bf16 instructions.
CPU_INT4_BLOCK = 64
CPU_INT4_GROUPS = (32, 64, 128, 256)  # the group sizes the kernel takes
# Up to this many rows the kernels beat dequantizing and F.linear (benchmarks/cpu_matmul.py); prefills take the twin.
CPU_KERNEL_MAX_ROWS = 64


def cpu_int4_supported(weight: QuantizedWeight) -> bool:
    """Whether `to_cpu_int4` takes the matrix: one matrix (no expert dimension) that `cpu_int4_takes`."""
    return weight.values.dim() == 2 and cpu_int4_takes(weight.scheme, weight.shape[0])


def cpu_int4_takes(scheme: Scheme, rows: int) -> bool:
    """Whether `rows` rows of `scheme` are repacked for PyTorch's CPU int4 kernel: int4 in groups it knows, whole row
    blocks, where the native kernel (`native_int4`) is not built."""
    return (scheme.packed and scheme.strategy == "group" and scheme.group_size in CPU_INT4_GROUPS
            and rows % CPU_INT4_BLOCK == 0 and not native_int4(scheme) and cpu_int4_layout_known())


# The native kernel's inputs: it holds each input in 15 bits of its block's largest, which covers 16-bit floats' 8 or
# 11 significant bits; fp32 inputs (the parity tests' models) take the exact twin instead.
NATIVE_INT4_INPUTS = (torch.bfloat16, torch.float16)


def native_int4(scheme: Scheme) -> bool:
    """Whether int4 matrices of `scheme` run through kernels/cpu.py (integer dot products, compiled on this machine),
    which reads them in the checkpoint's layout: int4 in groups of a multiple of 32."""
    if not (scheme.packed and scheme.strategy == "group" and scheme.group_size % 32 == 0):
        return False
    return cpu_kernels.library() is not None


def native_int4_reads(weight: QuantizedWeight) -> bool:
    """Whether the native kernel reads this matrix as it is held: one int4 matrix of a `native_int4` scheme, in the
    checkpoint's layout or `to_chunks`'s, not repacked for PyTorch's kernel."""
    return weight.cpu_scales_and_zeros is None and weight.values.dim() == 2 and native_int4(weight.scheme)


# The native kernel sums a K wider than this in chunks of at most this many inputs, stored chunk by chunk
# (`to_chunks`): a chunk's quantized inputs then stay in L1 while its weights stream past (benchmarks/cpu_matmul.py).
CPU_INT4_CHUNK_INPUTS = 6144


def cpu_int4_chunk(weight: QuantizedWeight) -> int:
    """The chunk (in inputs) that `to_chunks` stores `weight` in for the native kernel, or 0: not chunked (K fits one,
    or groups too wide for a chunk)."""
    k, group = weight.shape[-1], weight.scheme.group_size
    chunk = CPU_INT4_CHUNK_INPUTS // (4 * group) * (4 * group)  # whole quads of blocks, whole groups
    return chunk if weight.values.dim() == 2 and chunk and k > chunk else 0


def to_chunks(words: torch.Tensor, chunk: int) -> torch.Tensor:
    """int4 words [N, K / 8] -> the same shape, stored chunk by chunk: columns [0, chunk / 8) of every row, then the
    next chunk's, the last one possibly narrower (what gemma4_int4_matmul reads with `chunk`)."""
    pieces = [piece.contiguous().view(-1) for piece in words.split(chunk // 8, dim=1)]
    return torch.cat(pieces).view(words.shape)


def from_chunks(words: torch.Tensor, chunk: int) -> torch.Tensor:
    """The inverse of `to_chunks`: row-major words [N, K / 8]."""
    n, width = words.shape
    widths = [min(chunk // 8, width - start) for start in range(0, width, chunk // 8)]
    return torch.cat([piece.view(n, w) for piece, w in zip(words.view(-1).split([n * w for w in widths]), widths)],
                     dim=1)


def to_cpu_int4(weight: QuantizedWeight) -> QuantizedWeight:
    """The same matrix in the CPU int4 kernel's layout (the scale in its dtype, exactly: zeros of 0)."""
    return _cpu_int4(pack_cpu_int4(unpack_unsigned(weight.values, 4)), weight.scale, weight.scheme)


def _cpu_int4(values: torch.Tensor, scale: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    scales_and_zeros = torch.stack([scale.t(), torch.zeros_like(scale.t())], -1).contiguous()
    return QuantizedWeight(values, scales_and_zeros[..., 0].t(), scheme, scales_and_zeros)


def pack_cpu_int4(unsigned: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of q + 8 -> the layout of _convert_weight_to_int4pack_for_cpu, uint8 [N, K / 2] (made here in
    one pass over bytes; `cpu_int4_layout_known` checks it against the op)."""
    n, k = unsigned.shape
    halves = unsigned.view(n // CPU_INT4_BLOCK, 2, CPU_INT4_BLOCK // 2, k).permute(0, 3, 1, 2)  # [blocks, K, 2, 32]
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).contiguous().view(n, k // 2)


def unpack_cpu_int4(values: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_cpu_int4`, as signed integers: int8 [N, K] (the plain twin reads the layout with this)."""
    n, k = values.shape[0], values.shape[1] * 2
    blocks = values.view(n // CPU_INT4_BLOCK, k, CPU_INT4_BLOCK // 2)
    nibbles = torch.stack([blocks & 0xF, blocks >> 4], 1)  # [blocks, 2, K, 32]: rows j, then rows j + 32
    return nibbles.transpose(2, 3).reshape(n, k).view(torch.int8) - 8


@functools.cache
def cpu_int4_layout_known() -> bool:
    """Whether this torch's int4 kernel reads the layout `pack_cpu_int4` makes (checked once on a random matrix
    against its own packing op; else the CPU keeps the checkpoint's layout and the plain twin)."""
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return False
    q = torch.randint(-8, 8, (2 * CPU_INT4_BLOCK, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q + 8, 1)
    except RuntimeError:
        return False
    return torch.equal(packed, pack_cpu_int4((q + 8).to(torch.uint8)))


def cpu_linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor | None:
    """x @ w.T through the CPU's kernels, or None where they do not take the weight (fp8, int8 groups, int4 that
    neither int4 kernel reads): the caller then runs the twin. int4: the native kernel (kernels/cpu.py) for 16-bit
    inputs where it is built, else PyTorch's on the matrices `to_cpu_int4` repacked."""
    if x.dtype in NATIVE_INT4_INPUTS and native_int4_reads(weight):
        out = cpu_kernels.int4_matmul(x, weight.values, weight.scale, weight.scheme.group_size, weight.chunk)
        if out is not None:
            return out
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if weight.cpu_scales_and_zeros is not None:
        scales_and_zeros = weight.cpu_scales_and_zeros.to(x.dtype)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight.values, weight.scheme.group_size,
                                                         scales_and_zeros)
    elif weight.scheme == INT8_PER_CHANNEL and weight.values.dim() == 2:
        out = torch.ops.aten._weight_int8pack_mm(rows, weight.values, weight.scale.view(-1).to(x.dtype))
    else:
        return None
    return out.view(*x.shape[:-1], -1)
