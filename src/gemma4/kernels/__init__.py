"""Triton kernels for the CUDA fast path, and C kernels for the CPU's (cpu.py), each the twin of plain PyTorch code in
`gemma4.model` (docs/architecture.md, Kernels). Tests without a GPU run the Triton kernels through Triton's
interpreter (TRITON_INTERPRET=1, set before Triton is imported) on CPU tensors, and `force()` makes a model take them
there too.
"""

from __future__ import annotations

import contextlib
import functools

from .. import options as _options
from . import cpu

_forced = False


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def enabled(x) -> bool:
    """Whether the model should run its fused kernels on tensor `x`: a CUDA tensor (or forced), Triton importable,
    the `kernels` option on (read as options.current, not options(): this runs once per op)."""
    return _options.current.kernels and (x.is_cuda or _forced) and triton_available()


def cpu_enabled(x) -> bool:
    """Whether the model should run its C kernels (cpu.py) on tensor `x`: a CPU tensor of a dtype they read (fp32, bf16,
    fp16), the `kernels` option on, not forced onto the Triton kernels, the kernels built on this machine."""
    if not (_options.current.kernels and x.device.type == "cpu" and not _forced and x.dtype in cpu.DTYPES):
        return False
    return cpu.library() is not None


@contextlib.contextmanager
def force():
    """Take the kernels on CPU tensors too (tests, under TRITON_INTERPRET=1)."""
    global _forced
    previous, _forced = _forced, True
    try:
        yield
    finally:
        _forced = previous
