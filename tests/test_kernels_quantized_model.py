"""Quantized models with their Triton kernels (the quantized GEMVs, the MoE expert kernels on 8-bit and int4 experts)
equal the same quantized models without them (the dequantizing twin): tiny random models quantized on load, fp32, on
their shortest layer stacks (conftest.short_text_config), projections fused as on a GPU. Without a GPU the kernels
run in Triton's interpreter (`kernels.force()`)."""

from unittest import mock

import pytest
import torch

pytest.importorskip("triton")

from gemma4 import Model, kernels  # noqa: E402
from gemma4.model.fused import QuantizedLinear, stored  # noqa: E402
from gemma4.model.text import Experts  # noqa: E402
from gemma4.options import override  # noqa: E402
from reference import VOCAB, reference_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (family, quantization): int4 groups with PLE and KV sharing, fp8 and int4 experts (and dense MLP), int8 with K=V.
CASES = [("E2B", "int4"), ("26B-A4B", "fp8"), ("26B-A4B", "int4"), ("31B", "int8")]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(case) for case in CASES])
def model(request, tmp_path_factory, short_text_config):
    family, quantization = request.param
    path = tmp_path_factory.mktemp(family)
    reference_model(short_text_config(family), seed=7).save_pretrained(path)
    model = Model.from_pretrained(path, dtype=torch.float32, device=DEVICE, quantization=quantization)
    for module in model.modules():  # the Triton kernels read the checkpoint's layout, not the CPU int4 kernel's
        if isinstance(module, QuantizedLinear):
            weight = module.weight.in_checkpoint_layout()
            module.assign(stored(weight.values), weight.scale)
    model.quantized_head = None
    return model.fuse_projections_()


def _prompt(n: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)).to(DEVICE)


def test_quantized_and_fused(model):
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert quantized and all(m.values.dtype in (torch.int32, torch.int8, torch.uint8) for m in quantized)
    fused = [m.self_attn.qkv_weight for m in model.text.layers if m.self_attn.qkv_weight is not None]
    assert fused and all(type(w).__name__ == "QuantizedWeight" for w in fused)


@pytest.mark.parametrize("rows", [1, 2])
def test_decode_logits_and_tokens_equal(model, rows):
    """Prefill, then decode past the sliding window: at one row every product is a quantized GEMV kernel (with the
    deferred norms), at two the quantized matmul kernel; every forward's experts (the prefill's too: up to 44 pairs) are
    the decode expert kernels on the quantized experts. Tolerance as the dense kernels' test: fp32 summation order (the
    kernels apply a channel's scale once per dot product, or a group's per group), amplified by the post-norms."""
    from gemma4.kernels import gemv as gemv_module
    from gemma4.kernels import moe as moe_module

    ids = torch.cat([_prompt(11), _prompt(11)])[:rows]
    steps = 4
    logits = {}
    quantized_calls, expert_calls = [], []
    real, real_experts = gemv_module._weight_args, moe_module.moe_experts

    def spy(weight, *args, **kwargs):
        quantized_calls.append(not isinstance(weight, torch.Tensor))
        return real(weight, *args, **kwargs)

    for name in ("fused", "plain"):
        cache = model.make_cache(rows, ids.shape[1] + steps)
        with kernels.force() if name == "fused" else override(kernels=False), \
                mock.patch.object(gemv_module, "_weight_args", spy), \
                mock.patch.object(moe_module, "moe_experts", lambda *a: expert_calls.append(name) or real_experts(*a)):
            seq = [model(ids, cache=cache, last_only=True)[:, -1]]
            for _ in range(steps):
                seq.append(model(seq[-1].argmax(-1, keepdim=True), cache=cache, last_only=True)[:, -1])
        logits[name] = torch.stack(seq)
    assert (logits["fused"] - logits["plain"]).abs().max() <= 1e-3
    assert torch.equal(logits["fused"].argmax(-1), logits["plain"].argmax(-1))
    layers = model.config.text_config.num_hidden_layers
    if rows == 1:  # every decoder projection of each step, as its quantized GEMV
        assert sum(quantized_calls) >= steps * 3 * layers
    if any(isinstance(m, Experts) for m in model.modules()):
        assert expert_calls == ["fused"] * (1 + steps) * layers


def test_sorted_expert_kernels_read_quantized_experts(model, monkeypatch):
    """The serving batches' sorted expert kernels on fp8 and int4 experts: the same greedy tokens as the twin's loop."""
    if not any(isinstance(m, Experts) for m in model.modules()):
        pytest.skip("no experts")
    from gemma4.engine.engine import LLMEngine
    from gemma4.engine.sampling import SamplingParams

    prompts = [_prompt(n)[0].tolist() for n in (3, 9)]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    monkeypatch.setattr(Experts, "path", "sorted")
    with kernels.force():
        fused = LLMEngine(model, max_num_seqs=2, max_model_len=32, max_num_batched_tokens=16).generate(prompts, params)
    monkeypatch.setattr(Experts, "path", "loop")
    with override(kernels=False):
        plain = LLMEngine(model, max_num_seqs=2, max_model_len=32, max_num_batched_tokens=16).generate(prompts, params)
    assert fused == plain
