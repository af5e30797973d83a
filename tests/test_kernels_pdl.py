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


@pytest.mark.skipif(not HOPPER, reason="PDL needs a Hopper (sm_90) GPU or newer")
def test_decode_attention_after_the_store_with_pdl_equals_serial():
    """Decode layers as a step runs them: the q/k/v GEMV, the store of the new key and value into a sliding ring
    (qkv_norm_rope_store, which lets the attention start at once), decode attention with new_key_only (older keys
    loaded before its wait, while the GEMV and the store still run; the new one after), the output GEMV. Bit-equal to
    the chain launched without PDL, caches included, for a new key inside a split's early first block and outside
    it. Reading the new slot early would see the key of 1,024 positions before."""
    from gemma4.kernels.attention import decode_attention
    from gemma4.kernels.norm import qkv_norm_rope_store

    torch.manual_seed(0)
    hidden, heads, kv_heads, dim, window = 2048, 8, 4, 256, 1024
    widths = [heads * dim, kv_heads * dim, kv_heads * dim]
    layers = [((torch.randn(sum(widths), hidden, device="cuda") * hidden**-0.5).bfloat16(),
               (torch.randn(hidden, heads * dim, device="cuda") * (heads * dim)**-0.5).bfloat16(),
               (torch.rand(dim, device="cuda") + 0.5).bfloat16(), (torch.rand(dim, device="cuda") + 0.5).bfloat16())
              for _ in range(8)]
    caches = [tuple(torch.randn(1, kv_heads, window + 1, dim, device="cuda").bfloat16() for _ in range(2))
              for _ in layers]
    angles = torch.rand(1, 1, dim, device="cuda")
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()

    def step(h, caches, position):
        ring = torch.arange(position - window + 1, position + 1, device="cuda")
        positions = torch.full((1, window + 1), -1, device="cuda")  # the last slot stays empty
        positions[0, ring % window] = ring
        query_positions, slots = torch.tensor([position], device="cuda"), torch.tensor([[position % window]],
                                                                                       device="cuda")
        for (qkv_weight, o_weight, q_norm, k_norm), (key_cache, value_cache) in zip(layers, caches):
            q, k, v = gemv(h, qkv_weight).split(widths, -1)
            query = qkv_norm_rope_store(q, k, v, q_norm, k_norm, 1e-6, cos, sin, key_cache, value_cache, slots)
            out = decode_attention(query[:, :, 0], key_cache, value_cache, positions, query_positions, window,
                                   new_key_only=True)
            h = gemv(out.reshape(1, 1, -1), o_weight)
        return h

    x = torch.randn(1, 1, hidden, device="cuda").bfloat16()
    for position in (5000, 5016):  # slots 904 and 920: the first and the second block of a split (64 splits of 32)
        serial_caches = [tuple(t.clone() for t in cache) for cache in caches]
        with override(pdl=False):
            expected = step(x, serial_caches, position)
        with override(pdl=True):
            got = step(x, caches, position)
        assert torch.equal(got, expected)
        assert all(torch.equal(a, b) for cache, serial in zip(caches, serial_caches) for a, b in zip(cache, serial))
