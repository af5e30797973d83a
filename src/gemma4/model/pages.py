"""Memory-mapped checkpoint pages given back once a weight has been read into another form (the CPU's int4 repacking
and quantized LM head), so that a process's resident memory holds what it runs with, not what it loaded from."""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys

import numpy as np
import torch

MADV_DONTNEED = 4  # unmap these pages; a file's stay in the page cache
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
    """Give the whole pages under `tensor` back to the system. Pages of a memory-mapped file (the checkpoint's) that
    were not written (`_file_pages`) leave the resident set but stay in the page cache (madvise MADV_DONTNEED: a later
    touch maps them again without reading the disk); other memory is only asked to be reclaimed (MADV_PAGEOUT:
    without swap anonymous memory stays, so its data too). A hint: a no-op on other systems, on kernels without it
    and for GPU tensors."""
    madvise = _madvise()
    if madvise is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (start + size) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        madvise(first, last - first, MADV_DONTNEED if _file_pages(first, last) else MADV_PAGEOUT)


def _file_pages(first: int, last: int) -> bool:
    """Whether every page of [first, last) that is in memory is a file's page, none swapped (/proc/self/pagemap: bit 61
    file page, 62 swapped, 63 present): dropping such pages cannot lose data, as a page written since it was mapped
    privately (copy on write) would be anonymous. Pages not in memory read the same again."""
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(first // mmap.PAGESIZE * 8)
            entries = np.frombuffer(pagemap.read((last - first) // mmap.PAGESIZE * 8), dtype=np.uint64)
    except OSError:
        return False
    present, swapped, file = ((entries >> np.uint64(bit)) & np.uint64(1) for bit in (63, 62, 61))
    return entries.size == (last - first) // mmap.PAGESIZE and not swapped.any() and bool(file[present == 1].all())
