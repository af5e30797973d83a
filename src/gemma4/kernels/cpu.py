"""The CPU's kernels (cpu.c), each the twin of plain PyTorch code in `gemma4.model`:

* `int4_matmul`: int4 weights in groups, read in the checkpoint's own layout, times inputs quantized per block of 32
  to two int8 parts (15 bits), with integer dot products (AVX512-VNNI, or AVX2), as llama.cpp's Q4_0 x Q8_0 with
  one int8 part (see cpu.c);
* `rms_norm` and `add_rms_norm`: common.RMSNorm and fused.add_normed in one call each, rounded as their eager ops
  round (a decode step's norms are ~40 tiny ops per layer otherwise);
* `norm_rope`: text.norm_rope (each head's RMSNorm, then RoPE) in one call;
* `gelu_gated`: fused.gated with the tanh gelu, vectorized (PyTorch's eager gelu is a loop of scalar tanh here);
* `attend`: attention.attend for a few queries per row, without fp32 copies of the keys and values;
* `decode_layers`: a decode step's decoder layers (text.DecoderLayer.forward, one token per row, int4 weights), all
  of them in one call: the products, norms and attention above without a Python call per op, K/V written into the
  paged pools and read there in place.

PyTorch's own int4 CPU kernel (aten._weight_int4pack_mm_for_cpu) dequantizes each weight to fp32 before its
multiply-add; integer dot products do less arithmetic per weight (benchmarks/cpu_matmul.py compares them). The C
file is compiled once per machine with the system's C compiler (`$CC`, else `cc`, with -march=native) into the cache
directory and loaded with ctypes; without a compiler (or off x86) the model keeps PyTorch's int4 kernel and its plain
ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..options import options

SOURCE = Path(__file__).with_name("cpu.c")
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use (about a second), or None where they cannot be built here."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS, platform.processor(), cpu_flags()]).encode())
    target = Path(options().cache_dir) / "kernels" / f"cpu-{key.hexdigest()[:16]}.so"
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
                built = Path(scratch) / target.name
                result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True)
                if result.returncode != 0:
                    return None
                os.replace(built, target)  # atomic: another process sees the whole file or none
        except OSError:  # a cache directory we cannot write
            return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError:  # e.g. the OpenMP runtime it links is missing
        return None
    i64, i32, pointer = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.gemma4_int4_matmul.restype = i32
    lib.gemma4_int4_matmul.argtypes = [pointer, i32, i64, i64, pointer, i64, pointer, i32, i64, i64, i64, pointer,
                                       i32, i64, i64, i32]
    float_, pointers = ctypes.c_float, [pointer] * 2
    lib.gemma4_add_rms_norm.restype = None
    lib.gemma4_add_rms_norm.argtypes = [*pointers, i32, i64, i64, pointer, i32, float_, float_, pointer, float_,
                                        *pointers]
    lib.gemma4_norm_rope.restype = None
    lib.gemma4_norm_rope.argtypes = [pointer, i32, i64, i64, i64, i64, pointer, i32, float_, pointer, pointer, pointer]
    lib.gemma4_attend.restype = None
    lib.gemma4_attend.argtypes = [pointer, i32, i64, i64, i64, i64, pointer, pointer, i64, i64, pointer, pointer, i32]
    lib.gemma4_gelu_gated.restype = None
    lib.gemma4_gelu_gated.argtypes = [pointer, i64, pointer, i64, i32, i64, i64, pointer]
    lib.gemma4_decode_layers.restype = None
    lib.gemma4_decode_layers.argtypes = [ctypes.POINTER(DecodeLayer), i64, ctypes.POINTER(DecodeStep)]
    return lib


def cpu_flags() -> str:
    """The CPU's feature flags (Linux), so that a cache directory shared between machines keeps one build each."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def int4_matmul(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, group_size: int,
                chunk: int = 0) -> torch.Tensor | None:
    """x [..., K] (fp32, bf16 or fp16) @ w.T -> [..., N] in x's dtype, for int4 in int32 words [N, K / 8] as
    checkpoints hold them (or with `chunk`, stored chunk by chunk: model/quantized.py `to_chunks`), scales
    [N, K / group_size] (rows of each contiguous); None where the kernel does not read these operands (groups not whole
    blocks of 32, a scale dtype it does not know, x of another K)."""
    w = int4_operands(values, scale, group_size, chunk)
    if w is None or x.shape[-1] != w.k:
        return None
    rows = x.reshape(-1, w.k).contiguous()
    out = torch.empty(rows.shape[0], w.n, dtype=x.dtype)
    status = library().gemma4_int4_matmul(
        rows.data_ptr(), DTYPES[rows.dtype], rows.shape[0], w.k, w.values, w.stride, w.scales, w.scale_dtype,
        w.scale_stride, w.group, w.n, out.data_ptr(), DTYPES[x.dtype], w.n, w.chunk, torch.get_num_threads())
    return out.view(*x.shape[:-1], w.n) if status == 0 else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """common.RMSNorm's forward: x [..., D] (contiguous), weight [D] or None; the C side's norm_rope of one head per
    row, without RoPE."""
    out = torch.empty_like(x)
    rows, dim = x.numel() // x.shape[-1], x.shape[-1]
    library().gemma4_norm_rope(x.data_ptr(), DTYPES[x.dtype], 1, rows, 1, dim, _pointer(weight), _dtype(weight), eps,
                               None, None, out.data_ptr())
    return out


def add_rms_norm(residual: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                 scalar: torch.Tensor | None, next_weight: torch.Tensor | None, next_eps: float | None):
    """fused.add_normed: (new, next_norm(new) or None) of contiguous residual and y [..., D] of one dtype; weight,
    next_weight [D] and scalar [1] of one dtype."""
    new = torch.empty_like(residual)
    h = torch.empty_like(residual) if next_weight is not None else None
    rows, dim = residual.numel() // residual.shape[-1], residual.shape[-1]
    library().gemma4_add_rms_norm(
        residual.data_ptr(), y.data_ptr(), DTYPES[y.dtype], rows, dim, weight.data_ptr(), DTYPES[weight.dtype], eps,
        float(scalar) if scalar is not None else 1.0, _pointer(next_weight), next_eps or 0.0, new.data_ptr(),
        _pointer(h))
    return new, h


def _pointer(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _dtype(t: torch.Tensor | None) -> int:
    return DTYPES[t.dtype] if t is not None else 0


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor | None,
              sin: torch.Tensor | None) -> torch.Tensor:
    """text.norm_rope: x [B, L, H, D] (contiguous), weight [D] or None, cos/sin [B, L, 1, D] or None -> [B, H, L, D]."""
    batch, length, heads, dim = x.shape
    out = torch.empty(batch, heads, length, dim, dtype=x.dtype)
    if cos is not None:
        cos, sin = (t.expand(batch, length, 1, dim).to(x.dtype).contiguous() for t in (cos, sin))
    library().gemma4_norm_rope(x.data_ptr(), DTYPES[x.dtype], batch, length, heads, dim, _pointer(weight),
                               _dtype(weight), eps, _pointer(cos), _pointer(sin), out.data_ptr())
    return out


def gelu_gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """fused.gated(gate, up, "gelu_pytorch_tanh") of one shape and dtype, or None where they are not rows of one stride
    each (chunks of a wider product are)."""
    n = gate.shape[-1]
    try:
        gate_rows, up_rows = gate.view(-1, n), up.view(-1, n)
    except RuntimeError:
        return None
    if gate_rows.stride(-1) != 1 or up_rows.stride(-1) != 1:
        return None
    out = torch.empty(gate.shape, dtype=gate.dtype)
    library().gemma4_gelu_gated(gate_rows.data_ptr(), gate_rows.stride(0), up_rows.data_ptr(), up_rows.stride(0),
                                DTYPES[gate.dtype], gate_rows.shape[0], n, out.data_ptr())
    return out


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """attention.attend's few-query branch: query [B, H, Lq, D], key/value [B, Hkv, Lk, D] of one dtype, mask bool
    [B, 1, Lq, Lk] -> [B, Lq, H * D]."""
    batch, heads, length, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    allowed = mask.expand(batch, 1, length, keys).contiguous()
    out = torch.empty(batch, length, heads * dim, dtype=query.dtype)
    library().gemma4_attend(query.data_ptr(), DTYPES[query.dtype], batch, heads, length, dim, key.data_ptr(),
                            value.data_ptr(), kv_heads, keys, allowed.data_ptr(), out.data_ptr(),
                            torch.get_num_threads())
    return out


# ---- a decode step's layers in one call (cpu.c's structures, field for field) ---------------------------------------

_i64, _pointer_t = ctypes.c_int64, ctypes.c_void_p


class Int4Weight(ctypes.Structure):
    _fields_ = [("values", _pointer_t), ("scales", _pointer_t), *((name, _i64) for name in (
        "n", "k", "stride", "scale_stride", "group", "scale_dtype", "chunk"))]


class DecodeLayer(ctypes.Structure):
    _fields_ = [*((name, Int4Weight) for name in ("qkv", "o", "gate_up", "down", "ple_gate", "ple_projection")),
                *((name, _pointer_t) for name in ("q_norm", "k_norm", "post_attention_norm", "pre_feedforward_norm",
                                                  "post_feedforward_norm", "post_ple_norm", "next_norm", "scalar")),
                ("norm_dtype", _i64), ("eps", ctypes.c_float),
                *((name, _i64) for name in ("index", "kv_source", "full", "heads", "kv_heads", "head_dim", "width",
                                            "ple_dim", "writes_kv", "has_value", "has_ple"))]


class DecodeStep(ctypes.Structure):
    _fields_ = [*((name, _i64) for name in ("rows", "hidden", "dtype", "threads", "window", "num_layers")),
                ("x", _pointer_t), ("h", _pointer_t), ("per_layer_inputs", _pointer_t),
                ("cos", _pointer_t * 2), ("sin", _pointer_t * 2), ("query_positions", _pointer_t),
                ("num_keys", _pointer_t), ("write_slots", _pointer_t * 2), ("key_slots", _pointer_t * 2),
                ("key_positions", _pointer_t * 2), ("candidates", _i64 * 2), ("key_pools", _pointer_t),
                ("value_pools", _pointer_t), ("pool_slots", _pointer_t)]


def int4_operands(values: torch.Tensor, scale: torch.Tensor, group_size: int, chunk: int = 0) -> Int4Weight | None:
    """gemma4_int4_matmul's weight operands (int4_matmul's, and the decode layers'), or None where it would decline
    them: it is checked here, since the decode layers cannot fall back."""
    if values.dim() != 2:
        return None
    n, k = values.shape[0], values.shape[1] * 8
    if (values.stride(-1) != 1 or scale.stride(-1) != 1 or scale.dtype not in DTYPES
            or k % 32 or group_size % 32 or k % group_size or chunk < 0 or chunk % (4 * group_size)):
        return None
    return Int4Weight(values.data_ptr(), scale.data_ptr(), n, k, values.stride(0) * 4, scale.stride(0), group_size,
                      DTYPES[scale.dtype], chunk)


def decode_layers(layers: ctypes.Array, x: torch.Tensor, h: torch.Tensor, per_layer_inputs: torch.Tensor | None,
                  ropes: dict[int, tuple[torch.Tensor, torch.Tensor]], steps: dict[int, tuple],
                  pools: tuple[list, list], query_positions: torch.Tensor, num_keys: torch.Tensor, window: int) -> None:
    """Run `layers` (DecodeLayer array) on x and h [rows, hidden] (contiguous; updated in place: the residual stream
    and its input norm, then the last layer's next norm of it). per_layer_inputs [rows, layers, ple_dim] or None;
    per layer type (0 sliding, 1 global): ropes (cos, sin) [rows, head_dim] and steps (write slots [rows], key slots
    and key positions [rows, candidates]) as int64; pools: (keys, values), a pool [kv_heads, slots, head_dim] or None
    per layer; query_positions, num_keys [rows] int64 (-1 / 0 on padding rows)."""
    rows, hidden = x.shape
    keys, values = pools
    key_pools = (_pointer_t * len(keys))(*(_pointer(pool) for pool in keys))
    value_pools = (_pointer_t * len(keys))(*(_pointer(pool) for pool in values))
    pool_slots = (_i64 * len(keys))(*(pool.shape[1] if pool is not None else 0 for pool in keys))
    step = DecodeStep(rows, hidden, DTYPES[x.dtype], torch.get_num_threads(), window, len(keys), x.data_ptr(),
                      h.data_ptr(), _pointer(per_layer_inputs), query_positions=query_positions.data_ptr(),
                      num_keys=num_keys.data_ptr(), key_pools=ctypes.cast(key_pools, _pointer_t),
                      value_pools=ctypes.cast(value_pools, _pointer_t), pool_slots=ctypes.cast(pool_slots, _pointer_t))
    for kind, (cos, sin) in ropes.items():
        step.cos[kind], step.sin[kind] = cos.data_ptr(), sin.data_ptr()
    for kind, (write, slots, positions) in steps.items():
        step.write_slots[kind], step.key_slots[kind] = write.data_ptr(), slots.data_ptr()
        step.key_positions[kind], step.candidates[kind] = positions.data_ptr(), positions.shape[1]
    library().gemma4_decode_layers(layers, len(layers), ctypes.byref(step))
