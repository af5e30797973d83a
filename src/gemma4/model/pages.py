"""Memory-mapped checkpoint pages given back once a weight has been read into another form (the CPU's int4 repacking
and quantized LM head), so that a process's resident memory holds what it runs with, not what it loaded from."""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys

import torch

MADV_PAGEOUT = 21  # Linux 5.4 and newer: reclaim these pages now


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    call.argtypes, call.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return call


def page_out(tensor: torch.Tensor) -> None:
    """Ask the kernel to reclaim the whole pages under `tensor` (madvise MADV_PAGEOUT). Pages of a memory-mapped file
    leave the resident set and are read from the file again if touched; anonymous memory without swap stays: the
    data never changes. A hint: a no-op on other systems, on kernels without it and for GPU tensors."""
    madvise = _madvise()
    if madvise is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (start + size) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        madvise(first, last - first, MADV_PAGEOUT)
