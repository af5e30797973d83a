"""Programmatic dependent launch (PDL, Hopper and newer): a decode step is ~400 small kernels in a row, and without
PDL each one starts only after the previous one has finished and flushed, so every boundary costs a launch ramp and
the previous kernel's tail. With PDL the next kernel is scheduled while the previous one still runs; it may read what
no kernel writes (weights) at once, and waits (`griddepcontrol.wait`: the previous grid complete, its memory visible)
before it reads activations or writes anything.

Every kernel launched with `launch_options` must call `after_previous_kernel` before its first read of another
kernel's output and before its first store or atomic. Its completion then implies its predecessor's, so the chain
stays ordered however far back a dependency lies. Kernels launched without PDL (PyTorch's) wait as they always do.

The q/k norm kernels of norm.py (a decode step's cache store; the query's norm of a KV-shared layer) let the decode
attention after them start at once (`next_kernel_then_wait`), while the projection before them still runs: that
attention reads before its own wait only what kernels two or more launches back wrote (the older keys, positions and
slots: kernels/attention.py, `new_key_only`). Every other kernel reads only weights before its wait, which no kernel
writes, so it may follow them too.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .. import options as _options


@functools.cache
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def launch_options(x: torch.Tensor) -> dict:
    """Keyword arguments for a kernel launch: PDL on CUDA devices that have it, unless the `pdl` option is off
    (GEMMA4_PDL=0). The kernel takes the `PDL` constexpr; Triton takes `launch_pdl`. Never under torch.compile (the
    kernels launch through the compiler's own launcher) nor on the CPU (the interpreter: griddepcontrol is PTX, and
    programs run one by one anyway)."""
    if not torch.compiler.is_compiling() and x.is_cuda and _options.current.pdl and _supported(x.device.index or 0):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def next_kernel_then_wait(PDL: tl.constexpr):
    """Let the next kernel be scheduled, then wait for the previous one: the next kernel may start before the
    previous one ends, so before its own wait it must read only what the kernel before the previous one, or an
    earlier one, wrote."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def after_previous_kernel(PDL: tl.constexpr):
    """Wait for the previous kernel's grid (no-op without PDL), then let the next kernel be scheduled: it can load
    its weights while this one computes."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
