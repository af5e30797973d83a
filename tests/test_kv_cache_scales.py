"""Calibrated fp8 KV cache scales (a compressed-tensors `kv_cache_scheme` with `self_attn.k_scale` / `v_scale`):
loaded into the fp8 pools and used as llm-compressor calibrated them.

The reference: compressed-tensors 0.20.1 cannot hook transformers 5.24's Gemma 4 attention (its KV hook looks for a
`past_key_values` argument, which Gemma 4's forward calls `cache`), so it neither writes these scales for Gemma 4 nor
applies them. The checkpoint is written as llm-compressor writes one (the scheme from the library's
QuantizationConfig, scales of the library's min-max `calculate_qparams` over a calibration prompt's K/V), and the
reference is transformers in fp32 with every K/V it caches fake-quantized by the library's own `fake_quantize`
with those scales (what the hook does where it works). Both sides compute fp8(x / scale) * scale in fp32 from the
same fp32 K/V, so they differ by the summation order only: fp32 logits within 1e-4 (measured ~1e-6). The scales
matter: the same model with scales 1.0 is >1e-3 away."""

import json

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from gemma4 import Model
from gemma4.loading import CheckpointError, load_model
from gemma4.model.cache import KVCache
from gemma4.quantization import QuantizationError, kv_cache_scales
from reference import VOCAB, engine_outputs, reference_model, text_config_dict

TOL = 1e-4
PROMPT, CALIBRATION, STEPS = 13, 20, 4  # the prompt is past the window of 8: sliding rings wrap


def _kv_args(strategy: str) -> QuantizationArgs:
    return QuantizationArgs(num_bits=8, type="float", strategy=strategy, dynamic=False, symmetric=True)


class FakeQuantizedCache(DynamicCache):
    """A DynamicCache whose K/V go through compressed-tensors' fake_quantize as they are cached (None scales: record
    each layer's absolute maxima instead, for calibration)."""

    def __init__(self, config, args: QuantizationArgs, scales: dict | None):
        super().__init__(config=config)
        self.args, self.scales, self.absmax = args, scales, {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        states = []
        for kind, x in (("k", key_states), ("v", value_states)):
            if self.scales is None:
                # [B, Hkv, T, D]: per head, or over everything
                amax = x.abs().amax(dim=(0, 2, 3)) if self.args.strategy == "attn_head" else x.abs().amax()[None]
                old = self.absmax.get((layer_idx, kind))
                self.absmax[layer_idx, kind] = amax if old is None else torch.maximum(old, amax)
            else:
                scale = self.scales[layer_idx, kind]
                x = fake_quantize(x, scale, torch.zeros_like(scale, dtype=torch.int8), self.args)
            states.append(x)
        return super().update(*states, layer_idx, *args, **kwargs)


def _reference_logits(reference, ids, args, scales, feed=None):
    """fp32 logits of a prefill of `ids` then STEPS decode steps, through a FakeQuantizedCache, [STEPS + 1, vocab],
    and the tokens: `feed`'s (prompt + STEPS) if given, else the greedy ones."""
    cache = FakeQuantizedCache(reference.config, args, scales)
    out, tokens = [], ids
    with torch.no_grad():
        logits = reference(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
        for step in range(STEPS):
            out.append(logits)
            token = logits.argmax(-1, keepdim=True) if feed is None else feed[:, PROMPT + step:PROMPT + step + 1]
            tokens = torch.cat([tokens, token], dim=1)
            logits = reference(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
        out.append(logits)
    return torch.cat(out), tokens


def _calibrated_scales(reference, args) -> dict:
    """llm-compressor's min-max calibration over one random prompt: (layer, "k" | "v") -> scale, shaped as
    compressed-tensors stores it ([1] per tensor, [Hkv, 1, 1] per head)."""
    cache = FakeQuantizedCache(reference.config, args, None)
    ids = torch.randint(3, VOCAB, (1, CALIBRATION), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference(input_ids=ids, cache=cache, use_cache=True)
    scales = {}
    for key, amax in cache.absmax.items():
        scale, _ = calculate_qparams(-amax, amax, args)
        scales[key] = scale.reshape((1,) if args.strategy == "tensor" else (-1, 1, 1))
    return scales


def _write(family, strategy, directory):
    """A tiny random checkpoint of `family` with calibrated KV scales (as llm-compressor writes them), and those
    scales."""
    reference = reference_model(text_config_dict(family), seed=0)
    args = _kv_args(strategy)
    scales = _calibrated_scales(reference, args)
    reference.save_pretrained(directory)
    tensors = load_file(directory / "model.safetensors")
    for (layer, kind), scale in scales.items():
        tensors[f"model.layers.{layer}.self_attn.{kind}_scale"] = scale
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = QuantizationConfig(config_groups={}, kv_cache_scheme=args).model_dump(mode="json")
    (directory / "config.json").write_text(json.dumps(config))
    return reference, args, scales


@pytest.fixture(scope="module", params=[("31B", "attn_head"), ("E4B", "tensor")])  # K=V with 1-head global layers;
def checkpoint(request, tmp_path_factory):                                            # KV sharing
    family, strategy = request.param
    directory = tmp_path_factory.mktemp(f"kv-{family}")
    return (directory, *_write(family, strategy, directory))


def _our_logits(model, tokens, fp8: bool, scales: dict | None = None):
    """Our logits over the same prefill + decode steps (fed the reference's tokens), through an fp8 KVCache with the
    given scales (None: the pools' 1.0)."""
    cache = KVCache(model.config.text_config, 1, PROMPT + STEPS + 1, model.dtype, model.device,
                    "fp8" if fp8 else "auto")
    if scales is not None:
        cache.pools.load_scales_(scales)
    out = []
    with torch.no_grad():
        out.append(model(tokens[:, :PROMPT], cache=cache, last_only=True)[:, -1])
        for step in range(STEPS):
            out.append(model(tokens[:, PROMPT + step:PROMPT + step + 1], cache=cache, last_only=True)[:, -1])
    return torch.cat(out).float()


def test_calibrated_scales_load_and_match_the_fake_quantized_reference(checkpoint):
    directory, reference, args, scales = checkpoint
    model = load_model(directory, dtype=torch.float32, device="cpu", model_class=Model)
    loaded = kv_cache_scales(model)
    assert sorted(loaded) == sorted({layer for layer, _ in scales})
    for layer, (key_scale, value_scale) in loaded.items():
        heads = model.config.text_config.layer_num_kv_heads[layer]
        for got, kind in ((key_scale, "k"), (value_scale, "v")):
            assert torch.equal(got, scales[layer, kind].reshape(-1).expand(heads))

    ids = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    want, tokens = _reference_logits(reference, ids, args, scales)
    got = _our_logits(model, tokens, fp8=True, scales=loaded)
    assert (got - want).abs().max() < TOL
    unscaled = _our_logits(model, tokens, fp8=True)  # the pools' default scales 1.0: the calibration matters
    assert (unscaled - want).abs().max() > 10 * TOL
    # A cache in the model's dtype ignores the scales: the plain reference.
    plain, _ = _reference_logits(reference, ids, args, None, feed=tokens)
    assert (_our_logits(model, tokens, fp8=False) - plain).abs().max() < TOL


def test_the_engine_takes_the_calibrated_scales(checkpoint):
    directory, reference, args, scales = checkpoint
    from gemma4.engine.engine import LLMEngine
    from gemma4.engine.sampling import SamplingParams

    ids = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    _, tokens = _reference_logits(reference, ids, args, scales)
    model = load_model(directory, dtype=torch.float32, device="cpu", model_class=Model)
    engine = LLMEngine(model, max_num_seqs=2, num_blocks=8, block_size=16, kv_cache_dtype="fp8")
    [(got, _)] = engine_outputs(engine, [ids[0].tolist()], SamplingParams(temperature=0.0, max_tokens=STEPS))
    assert got == tokens[0, PROMPT:].tolist()


def test_a_saved_model_keeps_its_scales(checkpoint, tmp_path):
    directory = checkpoint[0]
    model = load_model(directory, dtype=torch.float32, device="cpu", model_class=Model)
    from gemma4.loading import save_model
    save_model(model, tmp_path)
    again = load_model(tmp_path, dtype=torch.float32, device="cpu", model_class=Model)
    for layer, pair in kv_cache_scales(model).items():
        assert all(torch.equal(a, b) for a, b in zip(pair, kv_cache_scales(again)[layer]))


def _edit(directory, tmp_path, config_edit=None, tensor_edit=None):
    import shutil
    target = tmp_path / "edited"
    shutil.copytree(directory, target)
    if config_edit:
        config = json.loads((target / "config.json").read_text())
        config_edit(config["quantization_config"]["kv_cache_scheme"])
        (target / "config.json").write_text(json.dumps(config))
    if tensor_edit:
        tensors = load_file(target / "model.safetensors")
        tensor_edit(tensors)
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("edit", [dict(num_bits=4, type="int"), dict(dynamic=True), dict(strategy="channel"),
                                  dict(symmetric=False)])
def test_unsupported_kv_cache_schemes_are_named(checkpoint, tmp_path, edit):
    target = _edit(checkpoint[0], tmp_path, config_edit=lambda scheme: scheme.update(edit))
    with pytest.raises(QuantizationError, match="kv_cache_scheme"):
        load_model(target, dtype=torch.float32, device="cpu", model_class=Model)


def test_a_scale_of_the_wrong_shape_is_named(checkpoint, tmp_path):
    def widen(tensors):
        key = "model.layers.0.self_attn.k_scale"
        tensors[key] = torch.ones(7, 1, 1)
    target = _edit(checkpoint[0], tmp_path, tensor_edit=widen)
    with pytest.raises(CheckpointError, match=r"layers\.0\.self_attn\.k_scale"):
        load_model(target, dtype=torch.float32, device="cpu", model_class=Model)


def test_tensor_parallel_ranks_take_their_heads_scales(checkpoint):
    """2 gloo ranks: each holds the scales of its KV heads (31B-like: the sliding layers' 2 heads split, the global
    layers' 1 head replicated) and its fp8 pools use them; ids and logprobs equal one process's (fp32, 1e-4)."""
    from gemma4 import distributed
    from gemma4.llm import LLM

    directory = checkpoint[0]
    prompt = torch.randint(3, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    params = dict(temperature=0.0, max_tokens=STEPS, stop_token_ids=[], logprobs=1)
    kwargs = dict(dtype="float32", device="cpu", kv_cache_dtype="fp8")
    [want] = LLM(str(directory), **kwargs).generate([prompt], params)
    try:
        llm = LLM(str(directory), tensor_parallel_size=2, **kwargs)
        [got] = llm.generate([prompt], params)
        model = llm.model
        assert all(scales[0].shape == (model.config.text_config.layer_num_kv_heads[layer],)
                   for layer, scales in kv_cache_scales(model).items())
    finally:
        distributed.shutdown()
    assert got.token_ids == want.token_ids
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in got.logprobs]),
                               torch.tensor([lp.logprob for lp in want.logprobs]), rtol=0, atol=TOL)
