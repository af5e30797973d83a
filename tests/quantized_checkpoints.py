"""Tiny Gemma 4 checkpoints in the compressed-tensors format, and the transformers 5.24 reference for them.

`write_quantized_checkpoint` writes what llm-compressor writes for a published release (Google's QAT W4A16 "-ct",
RedHatAI's FP8-dynamic, ...): it quantizes with compressed-tensors' own API (apply_quantization_config, then
ModelCompressor compresses the modules, save_pretrained writes them and update_config adds `quantization_config`).
compressed-tensors 0.20.1 leaves calibration to llm-compressor; the weight scales here are what llm-compressor's
default weight observer (min-max) gives: the min and max over each channel / group / block, turned into a scale by
the library's `calculate_qparams`.

`reference_logits` runs such a checkpoint in transformers 5.24 on the CPU, in fp32. transformers loads the dense
layers itself (its compressed-tensors quantizer); it cannot load the 26B-A4B experts (see `reference_logits`), so
a checkpoint that has them goes through `dequantized_state_dict` (the library's decompression) and a plain model.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                             apply_quantization_config, preset_name_to_scheme)
from compressed_tensors.quantization.utils import calculate_qparams, maybe_pad_tensor_for_block_quant
from safetensors import safe_open
from safetensors.torch import load_file

from gemma4.random_init import TOKENIZER_FILES
from reference import ATTN, reference_model

# What the releases leave in their original dtype. Targets are "Linear", so embeddings and norms never match; the
# router projection and the towers' projections are Linear and are ignored by name (compressed-tensors' "re:" is
# re.match). Sources: llm-compressor's Gemma 4 examples (FP8_DYNAMIC: "lm_head", "re:.*embed.*", "re:.*router",
# "re:.*vision_tower.*"), and third-party recipes copying Google's QAT W4A16 release, which also keep the towers
# and the per-layer-input (PLE) projections: "re:.*per_layer.*".
IGNORE = ["lm_head", "re:.*embed_vision.*", "re:.*embed_audio.*", "re:.*vision_tower.*", "re:.*audio_tower.*",
          "re:.*router.*"]
IGNORE_PER_LAYER_INPUTS = [*IGNORE, "re:.*per_layer.*"]

# name -> (scheme arguments, ignore list). All symmetric, so no zero points are written.
SCHEMES = {
    # Google's QAT "-qat-w4a16-ct": int4 in groups of 32 along the input dimension -> format pack-quantized.
    "W4A16": (dict(weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group",
                                            group_size=32)), IGNORE_PER_LAYER_INPUTS),
    # int8 per output channel, weights only: compressed-tensors stores it pack-quantized too (4 int8 per int32).
    "W8A16": (dict(weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")), IGNORE),
    # int8 per channel, int8 per-token dynamic activations -> format int-quantized (an int8 `weight`).
    "W8A8": ("W8A8", IGNORE),
    # RedHatAI "-FP8-dynamic": fp8 e4m3 per channel, fp8 per-token dynamic activations -> float-quantized.
    "FP8_DYNAMIC": ("FP8_DYNAMIC", IGNORE),
    # DeepSeek-style fp8 in 128x128 blocks, activations fp8 dynamic in groups of 128 -> float-quantized.
    "FP8_BLOCK": ("FP8_BLOCK", IGNORE),
    # fp8 in 32x32 blocks, weights only: blocks small enough for the tiny models' rows to be cut between them
    # (test_tensor_parallel_quantized.py).
    "FP8_BLOCK32": (dict(weights=QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="block",
                                                  block_structure=[32, 32])), IGNORE),
}

# The tensors of one quantized Linear, by format (the dense `weight` of the others is replaced).
COMPRESSED_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_global_scale",
                       "input_scale", "input_zero_point", "input_global_scale")
PER_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def quantization_scheme(name: str) -> tuple[QuantizationScheme, list[str]]:
    """The compressed-tensors scheme of `name` (one of SCHEMES), targeting every Linear, and its ignore list."""
    args, ignore = SCHEMES[name]
    if isinstance(args, str):
        return preset_name_to_scheme(args, ["Linear"]), list(ignore)
    return QuantizationScheme(targets=["Linear"], **copy.deepcopy(args)), list(ignore)


class _ExpertLinears(torch.nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        for name, weight in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            linear.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
            self.add_module(name, linear)


def linearize_experts(model: torch.nn.Module) -> None:
    """Each Gemma4TextExperts (3-D gate_up_proj [E, 2I, H], down_proj [E, H, I], not Linear, so never a target)
    becomes E numbered modules of gate_proj [I, H], up_proj [I, H], down_proj [H, I] Linears, as llm-compressor's
    SequentialGemma4TextExperts does before quantizing (permanently): the checkpoint then holds
    `...layers.L.experts.E.{gate,up,down}_proj.*`, the names vLLM's Gemma 4 loader reads. No forward."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

    for name, experts in list(model.named_modules()):
        if isinstance(experts, Gemma4TextExperts):
            linears = torch.nn.Module()
            size = experts.intermediate_dim
            for e in range(experts.num_experts):
                gate_up = experts.gate_up_proj.data[e]
                linears.add_module(str(e), _ExpertLinears(gate_up[:size], gate_up[size:], experts.down_proj.data[e]))
            model.set_submodule(name, linears)


def _weight_range(weight: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each set of elements that shares a scale (llm-compressor's flatten_for_calibration, reduced
    as its min-max observer reduces): [N, 1] per channel, [N, K/g] per group, [ceil(N/bh), ceil(K/bw)] per block
    (zero-padded: zero never widens a range that calculate_qparams extends to 0 anyway)."""
    if args.strategy == "channel":
        grouped = weight.unsqueeze(-2)
    elif args.strategy == "group":
        grouped = weight.unflatten(-1, (-1, args.group_size))
    elif args.strategy == "block":
        rows, cols = args.block_structure
        padded = maybe_pad_tensor_for_block_quant(weight, (rows, cols))
        grouped = padded.reshape(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols).transpose(1, 2)
        grouped = grouped.flatten(-2)
    else:
        raise NotImplementedError(f"weight strategy {args.strategy}")
    return grouped.amin(-1), grouped.amax(-1)


@torch.no_grad()
def write_quantized_checkpoint(config: dict, scheme: str, directory, seed: int = 0,
                               dtype: torch.dtype = torch.bfloat16, tokenizer=None) -> Path:
    """The random tiny model of `config` (reference.py's, in `dtype`: releases are bf16, and so are their scales)
    quantized with `scheme` (a key of SCHEMES) and written to `directory` (returned) as a compressed-tensors
    checkpoint: config.json with `quantization_config`, model.safetensors, and the tokenizer files of `tokenizer`
    (a directory) when given. MoE experts are quantized per expert (see `linearize_experts`)."""
    model = reference_model(config, seed=seed).to(dtype)
    linearize_experts(model)
    quant_scheme, ignore = quantization_scheme(scheme)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": quant_scheme}, ignore=ignore),
                              show_progress=False)
    for module in model.modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is not None:
            scale, zero_point = calculate_qparams(*_weight_range(module.weight.data, args), args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))
    # What llm-compressor's save_pretrained wrapper does: infer the format, compress, save, add the config.
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    directory = Path(directory)
    model.save_pretrained(directory)
    compressor.update_config(directory)
    if tokenizer is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer) / name).is_file():
                shutil.copy(Path(tokenizer) / name, directory / name)
    return directory


def _group_for(name: str, quantization: QuantizationConfig) -> QuantizationScheme:
    """The config group of module `name`: one whose "re:" targets match it, else one targeting a class (Linear:
    every module that carries quantized tensors is one)."""
    groups = list(quantization.config_groups.values())
    for group in groups:
        if any(t.startswith("re:") and re.match(t.removeprefix("re:"), name) for t in group.targets):
            return group
    return next(group for group in groups if any(not t.startswith("re:") for t in group.targets))


def dequantized_state_dict(directory, stack_experts: bool = True) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with every quantized Linear decompressed by compressed-tensors' own compressor for
    its format, in fp32: a scale upcast to fp32 makes `q * scale` exact (an int4/int8/fp8 value times a bf16 scale
    has at most 16 significant bits). With `stack_experts`, per-expert weights are stacked back into transformers'
    3-D `experts.gate_up_proj` [E, 2I, H] (gate rows first) and `experts.down_proj` [E, H, I]. Other tensors as
    stored."""
    directory = Path(directory)
    quantization = QuantizationConfig.model_validate(
        json.loads((directory / "config.json").read_text())["quantization_config"])
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        module, _, local = key.rpartition(".")
        if local in COMPRESSED_SUFFIXES:
            modules.setdefault(module, {})[local] = tensor
        else:
            state[key] = tensor
    for module, local in modules.items():
        scheme = _group_for(module, quantization)
        if module + ".weight" in state:  # int-/float-quantized: the quantized values under the dense name
            local["weight"] = state.pop(module + ".weight")
        local["weight_scale"] = local["weight_scale"].float()
        compressor = BaseCompressor.get_value_from_registry(scheme.format or quantization.format)
        state[module + ".weight"] = compressor.decompress(local, scheme)["weight"].float()
    return _stack_experts(state) if stack_experts else state


def _stack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for key in [k for k in state if PER_EXPERT.match(k)]:
        prefix, index, projection = PER_EXPERT.match(key).groups()
        experts.setdefault(prefix, {}).setdefault(projection, {})[int(index)] = state.pop(key)
    for prefix, projections in experts.items():
        count = len(projections["down"])
        state[prefix + ".gate_up_proj"] = torch.stack(
            [torch.cat([projections["gate"][e], projections["up"][e]]) for e in range(count)])
        state[prefix + ".down_proj"] = torch.stack([projections["down"][e] for e in range(count)])
    return state


def _model_class(config: dict):
    import transformers

    return transformers.Gemma4ForCausalLM if config["model_type"] == "gemma4_text" \
        else transformers.Gemma4ForConditionalGeneration


def _plain_reference(directory: Path, config: dict):
    """A plain fp32 transformers model (no quantizer) holding `dequantized_state_dict`."""
    import transformers

    config = {k: v for k, v in config.items() if k != "quantization_config"}
    hf_config = (transformers.Gemma4TextConfig if config["model_type"] == "gemma4_text"
                 else transformers.Gemma4Config)(**config)
    hf_config._attn_implementation = ATTN
    model = _model_class(config)(hf_config).float().eval()
    missing, unexpected = model.load_state_dict(dequantized_state_dict(directory), strict=False)
    tied = {"lm_head.weight"} if hf_config.get_text_config().tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{directory}: unexpected {unexpected}, missing {sorted(set(missing) - tied)}")
    model.tie_weights()
    return model


def reference_logits(checkpoint_dir, input_ids: torch.Tensor, quantize_activations: bool = False,
                     plain_model: bool = False) -> torch.Tensor:
    """fp32 logits of `loaded_reference(checkpoint_dir, quantize_activations, plain_model)` for input_ids."""
    model = loaded_reference(checkpoint_dir, quantize_activations, plain_model)
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits.float()


def reference_greedy(checkpoint_dir, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation by the weights-only reference: [1, prompt + new_tokens], full forwards (no cache)."""
    model = loaded_reference(checkpoint_dir)
    ids = input_ids
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return ids


def loaded_reference(checkpoint_dir, quantize_activations: bool = False, plain_model: bool = False):
    """transformers 5.24 in fp32 on the CPU holding the compressed-tensors checkpoint in `checkpoint_dir`.

    transformers' compressed-tensors quantizer (default `dequantize=False`) builds the quantized modules in fp32,
    loads the packed tensors and decompresses them on the first forward, in fp32: exact `q * scale`. Its quantized
    forward also quantizes-dequantizes each input activation when the scheme says so (W8A8, FP8_*: dynamic per
    token or per group of 128): on with `quantize_activations`, off by default (weight-only dequantization, which is
    what a loader that dequantizes to a dense model computes). Its other mode, `dequantize=True`, dequantizes at
    load in the scale's dtype (bf16 products) and is not used here.

    transformers 5.24 has no conversion for Gemma 4's per-expert `experts.E.*_proj` tensors: it reports them
    unexpected and leaves `experts.gate_up_proj`/`down_proj` randomly initialized, with only a load report.
    Checkpoints that have them (and every checkpoint with `plain_model=True`) go through `dequantized_state_dict`
    and a plain model instead, which cannot quantize activations."""
    directory = Path(checkpoint_dir)
    config = json.loads((directory / "config.json").read_text())
    keys: set[str] = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(file, framework="pt") as reader:
            keys.update(reader.keys())
    if plain_model or any(re.search(r"\.experts\.\d+\.", key) for key in keys):
        if quantize_activations:
            raise NotImplementedError("activation quantization needs transformers' quantizer, which cannot load "
                                      "per-expert checkpoints")
        model = _plain_reference(directory, config)
    else:
        model = _model_class(config).from_pretrained(directory, dtype=torch.float32, attn_implementation=ATTN).eval()
        for module in model.modules():
            if hasattr(module, "quantization_scheme"):
                module.quantization_enabled = quantize_activations  # weights are decompressed either way
    return model
