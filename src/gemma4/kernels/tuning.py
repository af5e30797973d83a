"""The kernels' tuned launch parameters, as data: one JSON file per device in `configs/`, named after
torch.cuda.get_device_name with spaces as underscores (`NVIDIA_H200.json`). `default.json` serves any other device
and the CPU interpreter, and any key a device's file leaves out. A file maps kernel -> key -> value; lists are tile
tuples. The values so far were tuned on an H200 and an H100 (the benchmarks/ scripts sweep them).

Keys. A tile tuple names its entries; warps and stages are Triton's num_warps and num_stages.

gemv: (BLOCK_N weight rows a program, BLOCK_K inputs a step, warps, stages, GROUPS of BLOCK_N rows a program, which
  share its input only where the row is one BLOCK_K step)
  TILES               the default
  WIDE_TILES          rows longer than TILES' BLOCK_K, up to its own (in one step, where TILES would take two)
  NORMED_TILES        a GEMV that normalizes its input (`norms=`); BLOCK_K is then the row's width
  NORMED_GATED_TILES  the same, gated
  GROUPS_MIN_WIDTH    outputs narrower than this take one group of rows (small GEMVs need every program)
  INT4_<key>, BYTE_<key>  a tile key for int4 or 8-bit (fp8, int8) weights, where they differ (BLOCK_K counts
                      weights, not bytes); absent: the key itself
  INT4_MMA_TILES      (BLOCK_N, warps) of int4_mma's kernel (BLOCK_N a multiple of 16 x warps)
  INT4_MMA_PROGRAMS   the programs its K splits aim for (the fewest splits that reach them)
  INT4_MMA_MIN_ELEMENTS  weights of an int4 GEMV from which it runs there (smaller ones: gemv.py's kernels)
  INT4_MMA_BY_SHAPE   {call: (BLOCK_N, warps, target programs[, steps prefetched: 1 or 2, 1 if absent]) or null
                      (gemv.py's kernels)} for the calls measured
                      (`int4_mma.shape_key`: "N x K", "gated", "normed"), before the three defaults above
moe:
  GU_BLOCK_W, GU_BLOCK_H, GU_WARPS       decode gate/up kernel: gate (and up) rows a program, columns a step, warps
  DOWN_BLOCK_H, DOWN_BLOCK_W, DOWN_WARPS decode down kernel: output rows a program, columns a step, warps
  DOWN_ONE_TOKEN_BLOCK_H                 its output rows a program for one token (all k experts in one load)
  SORTED_GU_BLOCK_N, SORTED_GU_BLOCK_K, SORTED_GU_WARPS        sorted-pairs gate/up kernel: output columns a
  SORTED_DOWN_BLOCK_N, SORTED_DOWN_BLOCK_K, SORTED_DOWN_WARPS  program, reduction step, warps; and its down kernel
  SORTED_BLOCK_M      pairs per tl.dot; null: from the mean pairs per expert
  COMBINE_BLOCK_H     columns per program of the pairs' weighted sum
  INT4_GU_BLOCK_H, INT4_DOWN_BLOCK_W, INT4_SORTED_GU_BLOCK_K, INT4_SORTED_DOWN_BLOCK_K  the same reduction steps
                      (inputs a step) on int4 experts: whole 8-input words, and multiples of the checkpoints' group
                      sizes (32, 128), so that a step holds whole groups (one scale load a group); INT4_GU_BLOCK_H
                      reads as many bytes a step as bf16's GU_BLOCK_H (a quarter of the bytes a weight). Not yet
                      measured on a GPU
  INT4_<key>, BYTE_<key>  any key above for int4 or 8-bit (fp8, int8) experts (`for_format`; the kernel that reads
                      gate_up_proj takes the gate/up keys of its format, the one that reads down_proj the down keys)
attention (decode):
  MAX_BLOCK_N         keys per block at most
  MAX_TILE_BYTES      bytes of a [BLOCK_N, D] K (or V) tile at most, so that num_stages of both fit shared memory
  SHRINK_MAX_HEAD_DIM head dims up to which blocks shrink where rows are split: to SPLIT_MAX_TILE_BYTES, then (to 16
                      keys) while there are too few for the wanted splits
  SPLIT_MAX_TILE_BYTES  bytes of a tile at most there
  PROGRAMS_PER_SM     programs in all the splits aim for, per SM
  MAX_SPLITS          splits of a row's keys at most
  num_warps, num_stages  of the split kernel
  SMALL_GRID_PROGRAMS, SMALL_GRID_WARPS  its warps where its grid has at most SMALL_GRID_PROGRAMS programs
  COMBINE_BLOCK_D     head dims per program of the merge
prefill_attention: (BLOCK_M queries, BLOCK_N keys, BLOCK_DV value dims (null: the whole head), warps)
  TILES               16-bit dtypes, head dims up to 256
  WIDE_HEAD_TILES     16-bit dtypes, larger head dims
  FP32_TILES          fp32
  num_stages
logits:
  SOFTCAP_BLOCK, ARGMAX_BLOCK  values per program
quantized_matmul: (BLOCK_M activation rows, BLOCK_N weight rows, BLOCK_K inputs a step, warps, stages[, SPLIT_K:
  slices of K in separate programs, summed by each tile's last one to finish; 1 where left out])
  TILES_BY_M  [[max rows M (null: any), *tile], ...]: the first entry whose max covers M (blocks shrink to the
              matrix's sides, 16 at least)
  MAX_M       rows up to which the model takes the kernel (`quantized_matmul.max_rows`); more: the weight dequantized
              once and cuBLAS
  INT4_<key>, BYTE_<key>  either key for int4 or 8-bit weights, where they differ (benchmarks/quantized_matmul_tiles.py
              writes them)
  DEQUANTIZE_TILES  (BLOCK_N weight rows, BLOCK_K inputs, warps) a program of `quantized_matmul.dequantize` (the
              weight dequantized once for a prefill's cuBLAS GEMM or the grouped experts). Not swept yet (timed only
              within quantized_matmul_tiles.py's "dequantized + cuBLAS" column)
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

CONFIGS = Path(__file__).with_name("configs")


@functools.cache
def device_name(device: torch.device | None) -> str:
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return "default"
    return torch.cuda.get_device_name(device).replace(" ", "_")


@functools.cache
def _load(name: str) -> dict:
    table = json.loads((CONFIGS / "default.json").read_text())
    path = CONFIGS / f"{name}.json"
    if name != "default" and path.exists():
        for kernel, values in json.loads(path.read_text()).items():
            table.setdefault(kernel, {}).update(values)
    return {kernel: {key: tuple(v) if isinstance(v, list) else v for key, v in values.items()}
            for kernel, values in table.items()}


def config(kernel: str, device: torch.device | None = None) -> dict:
    """`kernel`'s table for `device` (None: default.json's); one dict per device name, which tests and benchmarks
    override entries of."""
    return _load(device_name(device))[kernel]


def for_format(table: dict, prefix: str) -> dict:
    """A kernel's table as a weight format reads it: each key with the format's own entry (`prefix` + key: INT4_,
    BYTE_) where the table has one."""
    own = {key[len(prefix):]: value for key, value in table.items() if prefix and key.startswith(prefix)}
    return {**table, **own}


def tile(kernel: str, key: str, device: torch.device | None = None):
    """One tuned value of `kernel` for `device` (see the module docstring for the keys)."""
    return config(kernel, device)[key]


def every_device(kernel: str) -> dict[str, dict]:
    """`kernel`'s table for each device that has a file in `configs/` (and default.json's), by file name."""
    return {path.stem: _load(path.stem)[kernel] for path in sorted(CONFIGS.glob("*.json"))}


def update_config(device: torch.device, kernel: str, values: dict) -> Path:
    """Merge `values` into `kernel`'s table in the device's JSON file (a dict value into the dict there), a tile tuple
    a line (benchmarks/ tuners, --write). Returns the file's path."""
    path = CONFIGS / f"{device_name(device)}.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    current = table.setdefault(kernel, {})
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(current.get(key), dict):
            current[key].update(value)
        else:
            current[key] = value
    text = json.dumps(table, indent=2)
    # lists of numbers on one line, as the files are written by hand
    text = re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    path.write_text(text + "\n")
    _load.cache_clear()
    return path
