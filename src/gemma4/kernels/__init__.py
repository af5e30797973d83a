"""Triton kernels for the CUDA fast path: fused norms and RoPE, decode attention, MoE experts.

Every kernel has a plain PyTorch twin in `gemma4.model` (the reference the tests compare against). The model takes
the kernels only where `enabled(tensor)` says so: on CUDA tensors with Triton importable, unless the `kernels` option
is off (GEMMA4_KERNELS=0, see gemma4.options).
Tests on machines without a GPU run the kernels themselves through Triton's interpreter (TRITON_INTERPRET=1, set
before Triton is imported) on CPU tensors, and `force()` makes a model take them there too.
"""

from __future__ import annotations

import contextlib
import functools

from .. import options as _options

_forced = False


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def enabled(x) -> bool:
    """Whether the model should run its fused kernels on tensor `x`."""
    if not _options.current.kernels:  # a module attribute, not options(): this runs once per op
        return False
    return (x.is_cuda or _forced) and triton_available()


@contextlib.contextmanager
def force():
    """Take the kernels on CPU tensors too (tests, under TRITON_INTERPRET=1)."""
    global _forced
    previous, _forced = _forced, True
    try:
        yield
    finally:
        _forced = previous
