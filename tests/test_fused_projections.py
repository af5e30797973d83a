"""Fused projections (`Model.fuse_projections_`: q/k/v and gate/up as one matmul each) change nothing but the number
of matmuls: same logits and tokens on every family, the same state_dict (names and values), checkpoints that save
and load, and the fused path through the Triton kernels (strided q/k/v views). The tiny random models of each family
on their shortest layer stacks (conftest.short_text_config): fused and unfused layers on every family, KV-shared
layers (nothing to fuse) on E2B and E4B.

On a GPU the models run there (compiled kernels, loaders fuse by themselves: the unfused models are loaded with
`fuse_projections=False`); without one, on the CPU, where the kernels run only under `kernels.force()`."""

import copy

import pytest
import torch

from gemma4 import Model, kernels
from gemma4.model.text import MLP, Attention
from gemma4.options import override
from reference import FAMILIES, VOCAB, reference_model

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# On a GPU cuBLAS picks other algorithms (other split-K summation orders) for the fused shapes, and the post-norms of
# these random models amplify that fp32 rounding (as in test_kernels_model): 1e-3 there, still far below what a
# misplaced q/k/v slice does (O(1)). On the CPU only the BLAS blocking differs.
TOLERANCE = 1e-3 if CUDA else 1e-5


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory, short_text_config):
    path = tmp_path_factory.mktemp(request.param)
    reference_model(short_text_config(request.param), seed=11).save_pretrained(path)
    return path


def _ids():
    return torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0)).to(DEVICE)


def test_fused_model_equals_unfused(checkpoint):
    with override(fuse_projections=False):
        plain = Model.from_pretrained(checkpoint, dtype=torch.float32, device=DEVICE)
    fused = copy.deepcopy(plain).fuse_projections_()
    attention = [m for m in fused.modules() if isinstance(m, Attention)]
    assert any(m.qkv_weight is not None for m in attention)
    assert all(m.gate_up_weight is not None for m in fused.modules() if isinstance(m, MLP))
    # The parameters are views into the fused weights: one copy of the memory, the checkpoint keys unchanged.
    first = next(m for m in attention if m.qkv_weight is not None)
    assert first.q_proj.weight.data_ptr() == first.qkv_weight.data_ptr()
    assert plain.state_dict().keys() == fused.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fused.state_dict().values()))
    ids = _ids()
    # Same products, other matrix shapes: only the summation order may differ.
    assert (plain(ids) - fused(ids)).abs().max() <= TOLERANCE
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(plain.generate(ids, **kwargs), fused.generate(ids, **kwargs))


def test_fused_checkpoint_saves_and_loads(checkpoint, tmp_path):
    fused = Model.from_pretrained(checkpoint, dtype=torch.float32, device=DEVICE).fuse_projections_()
    fused.save_pretrained(tmp_path)  # views of one buffer are written as separate tensors
    again = Model.from_pretrained(tmp_path, dtype=torch.float32, device=DEVICE)
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), again.state_dict().values()))
    with override(fuse_projections=True):
        loaded = Model.from_pretrained(tmp_path, dtype=torch.float32, device=DEVICE)
    assert all(m.gate_up_weight is not None for m in loaded.modules() if isinstance(m, MLP))
    assert torch.equal(loaded(_ids()), fused(_ids()))


def test_fused_projections_through_the_kernels(checkpoint, request):
    """q, k and v arrive as strided slices of one matmul's output at the fused norm + RoPE kernel (compiled on a GPU,
    interpreted on the CPU): the unfused logits, to TOLERANCE."""
    if request.node.callspec.params["checkpoint"] not in ("E2B", "31B"):
        pytest.skip("two families (one with K=V) suffice; the interpreter is slow")
    pytest.importorskip("triton")
    with override(fuse_projections=False):
        plain = Model.from_pretrained(checkpoint, dtype=torch.float32, device=DEVICE)
    fused = copy.deepcopy(plain).fuse_projections_()
    ids = _ids()[:, :5]  # two rows of a few tokens: the slices' strides do not depend on the length
    with kernels.force():
        difference = (plain(ids) - fused(ids)).abs().max()
    assert difference <= TOLERANCE, difference
