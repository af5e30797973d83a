"""The compressed-tensors checkpoints of quantized_checkpoints.py: what they hold, and their transformers reference."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gemma4.options import override

from quantized_checkpoints import (dequantized_state_dict, linearize_experts, quantization_scheme, reference_greedy,
                                   reference_logits, write_quantized_checkpoint)
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
    """The reason reference_logits decompresses MoE checkpoints itself (transformers 5.24)."""
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


# --- gemma4 loading these checkpoints ---------------------------------------------------------------------------

def gemma4_logits(directory, ids=IDS, **kwargs) -> torch.Tensor:
    from gemma4.loading import load_model

    model = load_model(directory, dtype=torch.float32, device="cpu", **kwargs)
    with torch.no_grad():
        return model(ids).float()


def test_gemma4_logits_equal_the_reference(checkpoint):
    """Tolerance: both sides dequantize exactly in fp32 (an int4/int8/fp8 value times a bf16 scale has at most 16
    significant bits), so only the fp32 summation order differs: 1e-5 of the largest logit."""
    scheme, config, directory = checkpoint
    reference = weights_only_logits(directory)
    torch.testing.assert_close(gemma4_logits(directory), reference, rtol=0, atol=1e-5 * reference.abs().max().item())


def test_gemma4_greedy_tokens_equal_the_reference(checkpoint):
    from gemma4.pretrained import Model

    scheme, config, directory = checkpoint
    if scheme not in ("W4A16", "FP8_DYNAMIC"):
        pytest.skip("the two formats of the releases (one dense family and the experts each)")
    model = Model.from_pretrained(directory, dtype=torch.float32, device="cpu")
    ours = model.generate(IDS, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert torch.equal(ours, reference_greedy(directory, IDS, 4))


def unquantized_logits(config):
    with torch.no_grad():
        return reference_model(config, seed=SEED)(input_ids=IDS, use_cache=False).logits


def test_weight_only_products_are_closer_to_the_unquantized_model(checkpoint):
    """gemma4 runs products weight-only. The reference that also quantizes activations as the W8A8 and FP8 schemes
    say (dynamic, per token or per group of 128: int8 or fp8 e4m3, up to 2^-8 or 2^-4 relative per activation)
    differs from it by that rounding carried through the layers (on these tiny random models, measured: W8A8 0.07,
    FP8-dynamic 0.32 of the logit range at the worst logit). The weight-only logits are the closer ones to the
    unquantized model's, on average."""
    scheme, config, directory = checkpoint
    # FP8_BLOCK quantizes activations in groups of 128: the reference cannot on these 64-wide rows
    if scheme not in ("W8A8", "FP8_DYNAMIC") or has_experts(config):
        pytest.skip("activation quantization needs transformers' quantizer (dense checkpoints, token scales)")
    with_activations = reference_logits(directory, IDS, quantize_activations=True)
    ours = gemma4_logits(directory)
    unquantized = unquantized_logits(config)
    assert not torch.equal(ours, with_activations)
    assert (ours - unquantized).abs().mean() < (with_activations - unquantized).abs().mean()


def test_fp8_activations_equal_the_reference_that_quantizes_them(checkpoint):
    """With `fp8_activations` (W8A8: the FP8-dynamic scheme's activations quantized per token, fp8 tensor cores on a
    GPU) gemma4's logits are the reference's with its activation quantization on. Both quantize the same fp32 rows
    with the same amax / 448 scales and round to nearest; the products' terms are exact, so only the fp32
    summation order differs: 1e-5 of the largest logit, as the weight-only parity (measured 1.4e-7 of the range),
    where weight-only and W8A8 logits differ by 0.32 of it."""
    scheme, config, directory = checkpoint
    if scheme != "FP8_DYNAMIC" or has_experts(config):
        pytest.skip("activation quantization needs transformers' quantizer (dense checkpoints, token scales)")
    with override(fp8_activations=True):
        ours = gemma4_logits(directory)
    want = reference_logits(directory, IDS, quantize_activations=True)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-5 * want.abs().max().item())
    assert (ours - weights_only_logits(directory)).abs().max() > 0.1 * (want.max() - want.min())


def test_padded_batch_rows_equal_single_rows(checkpoint):
    from gemma4.loading import load_model

    scheme, config, directory = checkpoint
    if scheme != "W4A16":
        pytest.skip("once per family with experts and without")
    model = load_model(directory, dtype=torch.float32, device="cpu")
    short = IDS[:, 3:]
    batch = torch.cat([IDS, torch.cat([torch.zeros(1, 3, dtype=IDS.dtype), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).float()
        single = model(short).float()
    torch.testing.assert_close(padded[1, 3:], single[0], rtol=1e-5, atol=1e-5)


def test_quantize_on_load_makes_the_library_values(checkpoint):
    """gemma4's quantize (quantize-on-load) gives the values and scales compressed-tensors stored for the same bf16
    weights, for the schemes it offers on load (int4 groups of 32, int8 and fp8 per channel)."""
    from gemma4.loading import load_model, model_name
    from gemma4.model.quantized import ON_LOAD, quantize

    scheme, config, directory = checkpoint
    offered = {"W4A16": ON_LOAD["int4"], "W8A16": ON_LOAD["int8"], "W8A8": ON_LOAD["int8"],
               "FP8_DYNAMIC": ON_LOAD["fp8"]}
    if scheme not in offered or has_experts(config):
        pytest.skip("a scheme quantize-on-load offers, dense")
    loaded = dict(load_model(directory, dtype=torch.float32, device="cpu").named_modules())
    layout = "text" if config["model_type"] == "gemma4_text" else "multimodal"
    compared = 0
    for name, weight in originals(config).items():
        module = loaded.get(model_name(name.removesuffix(".weight"), layout))
        if getattr(module, "scheme", None) is None or not name.endswith(".weight"):
            continue
        ours = quantize(weight.to(torch.bfloat16), offered[scheme])
        assert torch.equal(ours.integers().view(torch.int8), module.weight.integers().view(torch.int8)), name
        assert torch.equal(ours.scale.float(), module.scale.float()), name
        compared += 1
    assert compared > 10


@pytest.mark.parametrize("quantization", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("family", ["E2B", "26B-A4B"])
def test_quantize_on_load_equals_dequantized_bf16(family, quantization, tmp_path):
    """A bf16 checkpoint loaded with quantization=... gives the logits of the dense model holding the dequantized
    weights, in bf16, bit for bit (the same products); the router, embeddings and norms stay unquantized. Saved, it
    is a compressed-tensors checkpoint that transformers (weights-only) and gemma4 read to the same logits."""
    from gemma4.loading import load_model, save_model
    from gemma4.model.fused import QuantizedLinear

    from reference import saved_reference

    saved_reference(family, tmp_path / "dense", seed=SEED)
    quantized = load_model(tmp_path / "dense", dtype=torch.bfloat16, device="cpu", quantization=quantization)
    dense = load_model(tmp_path / "dense", dtype=torch.bfloat16, device="cpu")
    replaced = 0
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedLinear):
            target = dense.get_submodule(name) if ".experts." not in name + "." else None
            values = module.weight.dequantize(torch.bfloat16)
            if target is None:
                setattr(dense.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1],
                        torch.nn.Parameter(values, requires_grad=False))
            else:
                assert not torch.equal(target.weight, values)
                target.weight = torch.nn.Parameter(values, requires_grad=False)
            replaced += 1
        assert ".router." not in name + "." or not isinstance(module, QuantizedLinear)
    assert replaced > 10
    # On the CPU the tied head is quantized too, for the logits (test_cpu_quantized.py): the same for both here.
    dense.quantized_head = quantized.quantized_head
    with torch.no_grad(), override(kernels=False):  # the twin; the CPU's int4/int8 kernels: test_cpu_quantized.py
        assert torch.equal(quantized(IDS), dense(IDS))
    save_model(quantized, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "compressed-tensors"
    reference = reference_logits(tmp_path / "saved", IDS)
    ours = gemma4_logits(tmp_path / "saved")
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5 * reference.abs().max().item())


# --- bad input --------------------------------------------------------------------------------------------------

def _edited_checkpoint(source, target, config_edit=None, drop=()):
    from safetensors.torch import save_file

    shutil.copytree(source, target)
    if config_edit is not None:
        config = json.loads((target / "config.json").read_text())
        config_edit(config["quantization_config"])
        (target / "config.json").write_text(json.dumps(config))
    if drop:
        tensors = load_file(target / "model.safetensors")
        save_file({k: v for k, v in tensors.items() if k not in drop}, target / "model.safetensors")
    return target


@pytest.fixture(scope="module")
def w4a16(tmp_path_factory):
    return write_quantized_checkpoint(multimodal_config_dict("31B"), "W4A16", tmp_path_factory.mktemp("w4"), seed=SEED)


def _set_weights(key, value):
    def edit(quantization_config):
        quantization_config["config_groups"]["group_0"]["weights"][key] = value
    return edit


@pytest.mark.parametrize("edit,message", [
    (_set_weights("symmetric", False), "asymmetric"),
    (_set_weights("num_bits", 2), "int2 weights per group is not supported"),
    (_set_weights("group_size", 64), "not a multiple of the group size 64"),
    (lambda q: q.update(quant_method="gptq"), "quant_method 'gptq' is not supported"),
    (lambda q: q["config_groups"]["group_0"].update(format="marlin-24"), "format 'marlin-24' is not supported"),
])
def test_unsupported_schemes_fail_before_any_weight_is_read(w4a16, tmp_path, monkeypatch, edit, message):
    from gemma4 import loading
    from gemma4.quantization import QuantizationError

    directory = _edited_checkpoint(w4a16, tmp_path / "edited", config_edit=edit)
    monkeypatch.setattr(loading, "quantized_routes", lambda *a: pytest.fail("the model was built"))
    with pytest.raises(QuantizationError, match=message):
        loading.load_model(directory, device="cpu")


def test_missing_scale_names_the_tensor(w4a16, tmp_path):
    from gemma4.loading import load_model
    from gemma4.quantization import QuantizationError

    key = "model.language_model.layers.1.mlp.down_proj.weight_scale"
    directory = _edited_checkpoint(w4a16, tmp_path / "edited", drop=[key])
    with pytest.raises(QuantizationError, match=re.escape(key.replace("weight_scale", "weight_packed"))):
        load_model(directory, device="cpu")


def test_group_size_mismatch_names_the_tensor(w4a16, tmp_path):
    from gemma4.loading import load_model
    from gemma4.quantization import QuantizationError

    directory = _edited_checkpoint(w4a16, tmp_path / "edited", config_edit=_set_weights("group_size", 64))
    with pytest.raises(QuantizationError, match=r"model\.language_model\.layers\.\d+\.\S+\.weight_packed: 96 input"):
        load_model(directory, device="cpu")


def test_quantization_argument_errors(w4a16, tmp_path):
    from gemma4.loading import load_model
    from gemma4.quantization import QuantizationError

    with pytest.raises(QuantizationError, match="already quantized"):
        load_model(w4a16, device="cpu", quantization="int8")
    from reference import saved_reference
    saved_reference("E2B", tmp_path / "dense")
    with pytest.raises(QuantizationError, match="quantization='nf4' is not supported"):
        load_model(tmp_path / "dense", device="cpu", quantization="nf4")


@pytest.mark.parametrize("name", ["fp8", "int8", "int4", "fp8 blocks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_in_the_scale_dtype_rounds_once(name, dtype):
    """QuantizedWeight.dequantize computes q * scale in the scale's dtype when it is the target: one rounding of the
    exact product, bit for bit the fp32 product rounded (as compressed-tensors decompresses)."""
    from gemma4.model.quantized import ON_LOAD, QuantizedWeight, Scheme, quantize

    generator = torch.Generator().manual_seed(0)
    if name == "fp8 blocks":
        values = (torch.randn(200, 300, generator=generator) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        weight = QuantizedWeight(values, torch.rand(2, 3, generator=generator).to(dtype) + 0.01,
                                 Scheme("float", 8, "block", block=(128, 128)))
    else:
        weight = quantize(torch.randn(3, 64, 96, generator=generator).to(dtype), ON_LOAD[name])
    assert weight.scale.dtype == dtype
    assert torch.equal(weight.dequantize(dtype), weight.dequantize(torch.float32).to(dtype))
