"""Programmatic dependent launch (gemma4.kernels.pdl): kernels may start before their predecessor has finished, so a
chain of dependent kernels must still compute exactly what it computes launched one after the other."""

import pytest
import torch

pytest.importorskip("triton")

from gemma4.kernels.gemv import gemv, gemv_gated  # noqa: E402
from gemma4.kernels.norm import residual_rms_norm, rms_norm  # noqa: E402
from gemma4.kernels.pdl import launch_options  # noqa: E402
from gemma4.options import override  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def test_launch_options():
    assert launch_options(torch.empty(1)) == {"PDL": False}  # the interpreter has no griddepcontrol
    if HOPPER:
        assert launch_options(torch.empty(1, device="cuda")) == {"PDL": True, "launch_pdl": True}
        with override(pdl=False):
            assert launch_options(torch.empty(1, device="cuda")) == {"PDL": False}


def _chain(x, layers):
    """Each kernel reads the previous one's output; the residual-norm kernels also read the residual stream and
    return its next state."""
    residual = x
    h = rms_norm(x, None, 1e-6)
    for up, down, norm_weight in layers:
        h = gemv_gated(h, up, "gelu_pytorch_tanh")
        residual, h = residual_rms_norm(residual, gemv(h, down), norm_weight, 1e-6, None, norm_weight, 1e-6)
    return residual, h


def _serial_chain(x, layers):
    """The chain launched without PDL: each kernel starts after its predecessor has finished."""
    with override(pdl=False):
        return _chain(x, layers)


@pytest.mark.skipif(not HOPPER, reason="PDL needs a Hopper (sm_90) GPU or newer")
def test_dependent_chain_with_pdl_equals_serial():
    """A 24-layer chain of GEMV kernels, eager and replayed from a CUDA graph with PDL, bit-equal to the same chain
    launched without PDL. A kernel that read its input before the previous kernel finished would read stale or
    half-written rows: the products are large enough (8-16 MB of weights each) for kernels to overlap."""
    torch.manual_seed(0)
    hidden, width = 2048, 4096
    layers = [((torch.randn(2 * width, hidden, device="cuda") * hidden**-0.5).bfloat16(),
               (torch.randn(hidden, width, device="cuda") * width**-0.5).bfloat16(),
               (torch.rand(hidden, device="cuda") + 0.5).bfloat16()) for _ in range(24)]
    x = torch.randn(1, 1, hidden, device="cuda").bfloat16()

    with override(pdl=True):
        expected = _serial_chain(x, layers)
        for got, want in zip(_chain(x, layers), expected):
            assert torch.equal(got, want)

        static_x = x.clone()
        _chain(static_x, layers)  # compile and warm up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = _chain(static_x, layers)
        for _ in range(3):
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            expected = _serial_chain(static_x, layers)
            for got, want in zip(outputs, expected):
                assert torch.equal(got, want)
