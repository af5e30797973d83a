"""Finished-programs counters: a kernel whose last program to finish does the rest of the work (the batch-1 routing
after the router's GEMV, a split reduction) counts its programs in int32 counters that each launch's last program
re-arms."""

from __future__ import annotations

import contextlib

import torch

_counters: dict[tuple[str, torch.device, bool], torch.Tensor] = {}
_retired: list[torch.Tensor] = []  # outgrown counters that captured CUDA graphs may still point to
_beside = False


def finished_counters(owner: str, device: torch.device, size: int = 1) -> torch.Tensor:
    """`size` finished-programs counters (int32) of one kernel (`owner`) whose last program to finish does the rest
    of the work: zero between launches (each launch's last program resets its own), so one set per device serves
    every launch of a stream, and a second set the kernels launched `beside`. Made (and grown) by eager calls: inside
    a CUDA-graph capture their zeroing would only be recorded (capture_graph warms every step up eagerly first)."""
    key = (owner, device, _beside)
    if key not in _counters or _counters[key].numel() < size:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{owner} must run once outside CUDA-graph capture first (its counters)")
        if key in _counters:  # graphs captured with the smaller set keep its address: it must stay allocated
            _retired.append(_counters[key])
        _counters[key] = torch.zeros(size, dtype=torch.int32, device=device)
    return _counters[key][:size]


@contextlib.contextmanager
def beside():
    """Kernels launched inside take a set of counters of their own: they run on a second stream (model/fused.py
    Beside), at the same time as kernels of the same kind on the first."""
    global _beside
    previous, _beside = _beside, True
    try:
        yield
    finally:
        _beside = previous
