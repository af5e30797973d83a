"""PyTorch's CPU threads fitted to the cores this process may use (gemma4/threads.py)."""

import torch

from gemma4 import threads


def test_quota_caps_the_cores(monkeypatch, tmp_path):
    """A container's CPU quota (cgroup v2 cpu.max) caps the affinity mask's count; "max" is no cap."""
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 2.5)
    assert threads.available_cores() == 3
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert threads.available_cores() == 64


def test_threads_fitted_down_never_up(monkeypatch):
    """More threads than cores are cut to the cores; fewer stay; a count set by OMP_NUM_THREADS stays."""
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        monkeypatch.setattr(threads, "available_cores", lambda: 1)
        threads.fit_threads_to_cores()
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(threads, "available_cores", lambda: 4)
        threads.fit_threads_to_cores()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        monkeypatch.setattr(threads, "available_cores", lambda: 1)
        threads.fit_threads_to_cores()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
