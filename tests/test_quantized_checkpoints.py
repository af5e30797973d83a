"""The compressed-tensors checkpoints of quantized_checkpoints.py: what they hold, and their transformers reference."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from quantized_checkpoints import (dequantized_state_dict, linearize_experts, quantization_scheme, reference_logits,
                                   write_quantized_checkpoint)
from reference import VOCAB, multimodal_config_dict, reference_model, text_config_dict

SEED = 3
# (scheme, family, layout): each format once, the 26B-A4B experts in an int and an fp8 format, one text layout.
CASES = [("W4A16", "E2B", "multimodal"), ("W4A16", "26B-A4B", "multimodal"), ("W8A16", "31B", "multimodal"),
         ("W8A8", "E4B", "multimodal"), ("FP8_DYNAMIC", "26B-A4B", "multimodal"), ("FP8_DYNAMIC", "E4B", "text"),
         ("FP8_BLOCK", "31B", "multimodal")]
IDS = torch.tensor([[2, 17, 301, 5, 99, 42, 250, 7, 1, 64, 380, 12]])
_LOGITS = {}


def weights_only_logits(directory) -> torch.Tensor:
    if directory not in _LOGITS:
        _LOGITS[directory] = reference_logits(directory, IDS)
    return _LOGITS[directory]


def has_experts(config) -> bool:
    return bool(config.get("text_config", config).get("enable_moe_block"))


@pytest.fixture(scope="module", params=CASES, ids=["-".join(case) for case in CASES])
def checkpoint(request, tmp_path_factory):
    scheme, family, layout = request.param
    config = text_config_dict(family) if layout == "text" else multimodal_config_dict(family)
    directory = write_quantized_checkpoint(config, scheme, tmp_path_factory.mktemp(f"{scheme}-{family}"), seed=SEED)
    return scheme, config, directory


def originals(config) -> dict[str, torch.Tensor]:
    """The bf16 weights that were quantized, experts per expert (the checkpoint's names)."""
    model = reference_model(config, seed=SEED).to(torch.bfloat16)
    linearize_experts(model)
    return {name: tensor.float() for name, tensor in model.state_dict().items()}


def per_element(scale: torch.Tensor, args, shape) -> torch.Tensor:
    rows, cols = shape
    if args.strategy == "channel":  # [N, 1]
        return scale.expand(rows, cols)
    if args.strategy == "group":  # [N, K / group]
        return scale.repeat_interleave(args.group_size, dim=1)[:, :cols]
    block_rows, block_cols = args.block_structure  # [ceil(N / rows), ceil(K / cols)]
    return scale.repeat_interleave(block_rows, dim=0).repeat_interleave(block_cols, dim=1)[:rows, :cols]


def rounding_bound(weight: torch.Tensor, scale: torch.Tensor, args) -> torch.Tensor:
    """How far a dequantized weight may be from its bf16 original: the library divides by the scale in bf16
    (2^-9 relative) before rounding, and its absmax scale is itself bf16 (the largest element may clamp)."""
    if args.type == "int":  # half a step, plus the bf16 quotient's error on |q| <= 2^(b-1)
        return scale * (0.5 + 2.0 ** (args.num_bits - 1) * 2.0 ** -8)
    # e4m3: 3 mantissa bits, half an ulp is 2^-4 relative; subnormals are spaced 2^-9 (in units of the scale)
    return weight.abs() * (2.0 ** -4 + 2.0 ** -8) + scale * 2.0 ** -10


def test_dequantized_weights_are_the_originals_within_rounding(checkpoint):
    scheme, config, directory = checkpoint
    quant_scheme, _ = quantization_scheme(scheme)
    args = quant_scheme.weights
    stored = load_file(directory / "model.safetensors")
    dequantized = dequantized_state_dict(directory, stack_experts=False)
    original = originals(config)
    tied = {"lm_head.weight"}
    assert set(dequantized) == set(original) - tied
    quantized = {key.removesuffix(".weight_scale") for key in stored if key.endswith(".weight_scale")}
    assert quantized, "nothing was quantized"
    for name, weight in original.items():
        if name in tied:
            continue
        module = name.removesuffix(".weight")
        if module in quantized:
            scale = per_element(stored[module + ".weight_scale"].float(), args, weight.shape)
            error = (dequantized[name] - weight).abs()
            bound = rounding_bound(weight, scale, args)
            assert (error <= bound * (1 + 1e-6)).all(), f"{name}: {(error / bound).max():.3f} of the bound"
            assert error.max() > 0, f"{name} was not rounded at all"
        else:
            assert torch.equal(dequantized[name], weight), name
    # What is quantized: every decoder projection, experts included; never the router; PLE unless ignored.
    projections = [m for m in quantized if re.search(r"\.(q|k|v|o|gate|up|down)_proj$", m)]
    assert len(projections) == len([n for n in original if re.search(r"_proj\.weight$", n) and ".router." not in n
                                    and "per_layer" not in n])
    assert not any(".router." in m or m == "lm_head" for m in quantized)
    per_layer = [n for n in original if re.search(r"per_layer_(input_gate|projection|model_projection)\.weight$", n)]
    assert all((n.removesuffix(".weight") in quantized) == (scheme != "W4A16") for n in per_layer)


def test_experts_stack_into_transformers_layout(checkpoint):
    scheme, config, directory = checkpoint
    if not has_experts(config):
        pytest.skip("no experts")
    single = dequantized_state_dict(directory, stack_experts=False)
    stacked = dequantized_state_dict(directory)
    model = reference_model(config, seed=SEED)
    for name, parameter in model.named_parameters():
        if name.endswith("experts.gate_up_proj"):
            prefix = name.removesuffix(".gate_up_proj")
            experts, rows = parameter.shape[0], parameter.shape[1] // 2
            assert stacked[name].shape == parameter.shape
            for e in range(experts):
                assert torch.equal(stacked[name][e, :rows], single[f"{prefix}.{e}.gate_proj.weight"])
                assert torch.equal(stacked[name][e, rows:], single[f"{prefix}.{e}.up_proj.weight"])
                assert torch.equal(stacked[prefix + ".down_proj"][e], single[f"{prefix}.{e}.down_proj.weight"])


def test_reference_logits(checkpoint):
    scheme, config, directory = checkpoint
    logits = weights_only_logits(directory)
    assert logits.shape == (1, IDS.shape[1], VOCAB) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    original = reference_model(config, seed=SEED)
    with torch.no_grad():
        unquantized = original(input_ids=IDS, use_cache=False).logits
    assert not torch.equal(logits, unquantized)
    if not has_experts(config):
        # transformers' own loading and the library's decompression into a plain model agree to the bit
        assert torch.equal(logits, reference_logits(directory, IDS, plain_model=True))


def test_transformers_leaves_per_expert_checkpoints_unloaded(checkpoint):
    """The reason reference_logits decompresses MoE checkpoints itself (transformers 5.23)."""
    import transformers

    scheme, config, directory = checkpoint
    if scheme != "W4A16" or not has_experts(config):
        pytest.skip("once, on a checkpoint with experts")
    _, info = transformers.Gemma4ForConditionalGeneration.from_pretrained(directory, output_loading_info=True)
    assert any(re.search(r"\.experts\.\d+\.gate_proj\.", key) for key in info["unexpected_keys"])
    assert any(key.endswith("experts.gate_up_proj") for key in info["missing_keys"])


def test_activation_quantization_changes_the_logits(checkpoint):
    scheme, config, directory = checkpoint
    if scheme != "FP8_DYNAMIC" or has_experts(config):
        pytest.skip("once, on dynamic activations that transformers' quantizer loads")
    weights_only = weights_only_logits(directory)
    both = reference_logits(directory, IDS, quantize_activations=True)
    assert torch.isfinite(both).all() and not torch.equal(both, weights_only)


def test_packed_layout(checkpoint):
    """pack-quantized: 32 / b values per int32 word, element j of a row at bits b * (j % (32 / b)) of word
    j // (32 / b), lowest bits first, each stored as q + 2^(b-1) (unsigned); reading them with numpy gives the
    library's values."""
    scheme, config, directory = checkpoint
    if scheme not in ("W4A16", "W8A16"):
        pytest.skip("not pack-quantized")
    assert json.loads((directory / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    bits = quantization_scheme(scheme)[0].weights.num_bits
    stored = load_file(directory / "model.safetensors")
    dequantized = dequantized_state_dict(directory, stack_experts=False)
    args = quantization_scheme(scheme)[0].weights
    for key in [k for k in stored if k.endswith(".weight_packed")][:6]:
        module = key.removesuffix(".weight_packed")
        rows, cols = stored[module + ".weight_shape"].tolist()
        words = stored[key].numpy().view(np.uint32)
        assert words.shape == (rows, -(-cols * bits // 32))
        per_word = 32 // bits
        fields = np.stack([(words >> (bits * i)) & ((1 << bits) - 1) for i in range(per_word)], axis=-1)
        q = fields.reshape(rows, -1)[:, :cols].astype(np.int64) - (1 << (bits - 1))
        scale = per_element(stored[module + ".weight_scale"].float(), args, (rows, cols)).numpy()
        np.testing.assert_array_equal(q * scale.astype(np.float64), dequantized[module + ".weight"].numpy())
