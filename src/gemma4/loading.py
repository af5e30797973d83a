"""Checkpoints: resolve a path or hub id, build the model on `meta`, fill it from memory-mapped safetensors.

Our parameter names are the multimodal checkpoint keys (`model.language_model.layers.0...`). The one exception is
the text-only layout (`Gemma4ForCausalLM`), whose keys lack the `language_model.` level: see `checkpoint_key`.
Only safetensors are read (never pickle).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import quantization as quantization_module
from .config import Config
from .model.fused import QuantizedLinear
from .model.gemma4 import Gemma4

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "auto": None}
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
# Released checkpoints store K/V weights for KV-shared layers, which never use them (they read the producer's K/V).
UNUSED_SHARED_KV = re.compile(r"layers\.(\d+)\.self_attn\.(k_proj\.|v_proj\.|k_norm\.|v_norm\.|k_scale$|v_scale$)")
KV_SCALES = (".self_attn.k_scale", ".self_attn.v_scale")  # a kv_cache_scheme's (quantization.py)
TOWERS = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is."""


def resolve_dtype(dtype, device: torch.device, default: torch.dtype = torch.bfloat16) -> torch.dtype:
    """`dtype` (a torch dtype or its name); None or "auto": `default`, the checkpoint's own (on every device: fp32
    only when asked for)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16")
        dtype = DTYPES[dtype]
    dtype = default if dtype is None else dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}; use torch.float32, torch.bfloat16 or torch.float16")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{torch.cuda.get_device_name(device)} cannot run bfloat16; use dtype=torch.float16")
    return dtype


def resolve_device(device) -> torch.device:
    """A torch device; None or "auto": CUDA when a GPU is visible, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA GPU is visible; use device='cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device='mps' was asked for but MPS is not available; use device='cpu'")
    return device


def checkpoint_dtype(config: Config, files: list[Path]) -> torch.dtype:
    """The dtype a checkpoint was saved in: config.json's `dtype` (`torch_dtype` in older files), else that of its
    first floating tensor (read from the header), else bfloat16 (the official checkpoints')."""
    for extra in (config.extra, config.text_config.extra):
        for key in ("dtype", "torch_dtype"):
            if isinstance(name := extra.get(key), str) and DTYPES.get(name) is not None:
                return DTYPES[name]
    names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    try:
        with safe_open(files[0], framework="pt", device="cpu") as reader:
            for key in reader.keys():
                if (kind := reader.get_slice(key).get_dtype()) in names:
                    return names[kind]
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{files[0]} is truncated or corrupt ({e}); re-download it") from None
    return torch.bfloat16


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local directory, or a hub id downloaded through huggingface_hub (honours HF_HOME and HF_HUB_OFFLINE)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    text = str(path_or_id)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(text, allow_patterns=HUB_FILES))
        except Exception as e:  # offline, unknown repo, gated model, ...
            raise FileNotFoundError(f"could not fetch {text!r} from the Hugging Face Hub ({type(e).__name__}: "
                                    f"{e}); download it first or pass a local directory") from None
    raise FileNotFoundError(f"no checkpoint directory at {path}; pass a directory with config.json and "
                            "*.safetensors, or a hub id such as google/gemma-4-E2B-it")


def checkpoint_key(name: str, layout: str) -> str:
    """Our parameter name -> the key in a checkpoint of `layout` ("multimodal" or "text")."""
    return name.replace("model.language_model.", "model.", 1) if layout == "text" else name


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is malformed ({e}); re-download the checkpoint") from None
        files = [directory / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        extra = " (found PyTorch .bin files, which are not loaded: convert them to safetensors)" \
            if list(directory.glob("*.bin")) else ""
        raise CheckpointError(f"no *.safetensors files in {directory}{extra}")
    if missing := [f.name for f in files if not f.is_file()]:
        raise CheckpointError(f"{directory} lacks {', '.join(missing)} listed in its index; re-download it")
    return files


def load_model(path_or_id, dtype=None, device="auto", with_towers: bool = True, progress: bool | None = None,
               model_class: type[Gemma4] = Gemma4, quantization: str | None = None, shard=None) -> Gemma4:
    """`dtype` None or "auto": the checkpoint's; `device` "auto": CUDA when present, else the CPU. `progress`: a bar
    on stderr (None: for checkpoints over 1 GiB, on a terminal). A compressed-tensors checkpoint loads quantized as
    it is stored (quantization.py); `quantization` ("fp8", "int8", "int4") quantizes a dense one on load (or, given
    the scheme a checkpoint is stored in, what it keeps dense and gemma4 would quantize: the tied head). `shard`: a
    tensor-parallel rank's `distributed.ShardPlan`: the model is cut to that rank's part and only those slices are
    read, of quantized tensors too; `quantization` then quantizes this rank's part (a collective for per-channel
    scales of row-parallel parts: every rank loads at once)."""
    device = resolve_device(device)
    directory = resolve_checkpoint(path_or_id)
    config = Config.from_file(directory)
    files = safetensors_files(directory)
    headers = read_headers(files)
    dtype = resolve_dtype(dtype, device, checkpoint_dtype(config, files))
    stored = stored_quantization(config, headers, with_towers)
    scheme = quantization_module.on_load_scheme(quantization) if quantization else None
    if stored and scheme and {module.scheme for module in stored.values()} != {scheme}:
        raise quantization_module.QuantizationError(f"{directory} is already quantized otherwise; load it without "
                                                    f"quantization={quantization!r}")
    with torch.device("meta"):
        model = model_class(config, with_towers=with_towers)
    if kv_strategy := quantization_module.kv_cache_strategy(config.quantization_config):
        quantization_module.add_kv_cache_scales_(model, kv_strategy)
    specs = {}
    if shard is not None and shard.ranks.size > 1:
        from .distributed.sharding import check_shardable, read_slice, shard_model_
        if quantization:  # the plan checked the checkpoint's own quantization; the cut must fit this one too
            check_shardable(config, shard.ranks.size, shard.expert_parallel, quantization)
        specs = shard.specs()
        shard_model_(model, shard)
    routes = quantized_routes(model, stored, config.layout, specs)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    expected = {checkpoint_key(name, config.layout): name for name in shapes}
    state: dict[str, torch.Tensor] = {}
    slices: dict[str, int] = {}  # stacked expert buffers: slices copied so far
    bar = progress_bar(sum(f.stat().st_size for f in files), "loading weights", progress)
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as reader:
                for key in reader.keys():
                    name = expected.get(key)
                    route = routes.get(key)
                    if name is None and route is None:
                        if _deliberately_unused(key, config, with_towers) or key in routes:
                            continue
                        raise CheckpointError(f"unexpected tensor {key!r} in {file.name}: this checkpoint does "
                                              "not match its config.json")
                    spec = route.spec if route is not None else specs.get(name)
                    tensor = read_slice(reader.get_slice(key), spec) if spec is not None else reader.get_tensor(key)
                    bar.update(tensor.numel() * tensor.element_size())
                    if route is not None:
                        _place_quantized(route, tensor, state, slices, shapes, device)
                        continue
                    if name.endswith(KV_SCALES) and tensor.numel() == shapes[name].numel():
                        tensor = tensor.reshape(shapes[name])  # a scalar, or [Hkv] (AutoFP8, older llm-compressor)
                    if tensor.shape != shapes[name]:
                        raise CheckpointError(f"{key} has shape {tuple(tensor.shape)}, config.json implies "
                                              f"{tuple(shapes[name])}")
                    state[name] = tensor.to(device=device, dtype=dtype)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is truncated or corrupt ({e}); re-download it") from None
    bar.close()
    stacked = {name: count for name, count in slices.items() if count != shapes[name][0] * _slices_per_expert(name)}
    if missing := [checkpoint_key(n, config.layout) for n in expected.values() if n not in state] + list(stacked):
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]!r}")
    model.load_state_dict(state, assign=True, strict=True)
    if scheme is not None:  # a checkpoint stored in that scheme: what is dense (the tied head) is quantized
        quantization_module.quantize_model_(model, scheme)
    generation_config = directory / "generation_config.json"
    if generation_config.is_file():
        model.generation_config = json.loads(generation_config.read_text())
    model.checkpoint_dir = directory
    return model.ready_()


def read_headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, safetensors dtype name) of every tensor, from the headers alone."""
    headers = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as reader:
                for key in reader.keys():
                    piece = reader.get_slice(key)
                    headers[key] = (tuple(piece.get_shape()), piece.get_dtype())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is truncated or corrupt ({e}); re-download it") from None
    return headers


def stored_quantization(config: Config, headers: dict, with_towers: bool) -> dict:
    """The quantized modules of a compressed-tensors checkpoint (quantization.plan), {} for a dense one; every check
    on the headers, before any weight is read."""
    quantization_config = config.quantization_config
    if quantization_config is None:
        if scale := next((key for key in headers if key.endswith(".weight_scale")), None):
            raise quantization_module.QuantizationError(f"{scale} is a quantization scale, but config.json has no "
                                                        "quantization_config")
        return {}
    groups = quantization_module.parse_config(quantization_config)
    modules = quantization_module.plan(headers, groups)
    return {name: module for name, module in modules.items()
            if not _deliberately_unused(name + ".weight", config, with_towers)}


class Route(NamedTuple):
    """Where one tensor of a quantized checkpoint module goes: `kind` ("values" or "scale") of the buffer `name`,
    whole or (`slot`) one expert's (index held here, 0 gate / 1 up half) block; `spec`: the part of the stored tensor
    this rank reads (None: all of it); `shape`: [N, K] of the dense weight that part holds."""
    name: str
    module: quantization_module.QuantizedModule
    kind: str
    slot: tuple[int, int] | None
    spec: tuple | None
    shape: tuple[int, int]


def quantized_routes(model: Gemma4, modules: dict, layout: str, specs: dict | None = None) -> dict:
    """Replaces the model's modules that the checkpoint stores quantized (on meta), and returns checkpoint key ->
    Route for their tensors; their other tensors (weight_shape, input_scale: checked or not used) map to None. With a
    tensor-parallel rank's `specs` (ShardPlan.specs of the dense weights, already cut on meta): the holders take this
    rank's part, each tensor is read in its part (`quantized_spec`), and experts held by other ranks map to None."""
    from .distributed.sharding import quantized_spec

    specs = specs or {}
    routes = {}
    for checkpoint_module, module in modules.items():
        name = model_name(checkpoint_module, layout)
        per_expert = quantization_module.PER_EXPERT.match(name)
        if per_expert:
            owner, index, projection = per_expert.groups()
            experts = model.get_submodule(owner)
            if not isinstance(experts.gate_up_proj, QuantizedLinear):
                quantization_module.quantize_experts_module(experts, module.scheme)
            target = f"{owner}.{'down_proj' if projection == 'down' else 'gate_up_proj'}"
            half = 1 if projection == "up" else 0
            held, spec = _expert_part(specs.get(target), int(index), half, module.shape()[0])
            if held is None:  # another rank's expert: not read
                routes.update({key: None for key, _, _ in module.tensors.values()})
                continue
            slot = (held, half)
        else:
            quantization_module.replace_linear(model, name, module.scheme)
            target, slot, spec = name, None, specs.get(name + ".weight")
        shape = _part_shape(module.shape(), spec)
        for local, (key, stored_shape, _) in module.tensors.items():
            kind = "values" if local == module.values_key() else "scale" if local == "weight_scale" else None
            if kind is None:
                routes[key] = None
                continue
            per_column = 32 // module.scheme.bits if local == "weight_packed" else 1
            per_tensor = kind == "scale" and tuple(stored_shape) != module.scheme.scale_shape(*module.shape())
            part = None if spec is None or per_tensor else quantized_spec(spec, 2, module.scheme, kind, per_column,
                                                                          key)
            routes[key] = Route(f"{target}.{kind}", module, kind, slot, part, shape)
    return routes


def _expert_part(spec, index: int, half: int, rows: int) -> tuple[int | None, tuple | None]:
    """(the slot of expert `index` among those held here, None: another rank's; the part of its gate, up (`half` 1) or
    down matrix held here, None: all of it), from the cut `spec` of the stacked [E, 2W, H] / [E, H, W] weight. Each
    matrix [N, K] of `rows` rows is stored on its own (llm-compressor's layout)."""
    if spec is None:
        return index, None
    dim, ranges = spec
    if dim == 0:  # whole experts
        start, stop = ranges[0]
        return (index - start, None) if start <= index < stop else (None, None)
    if dim == 1:  # rows of the stacked gate and up halves: this half's, from its first row
        low, high = half * rows, (half + 1) * rows
        ranges = [(max(a, low) - low, min(b, high) - low) for a, b in ranges if a < high and b > low]
    return index, (dim - 1, ranges)


def _part_shape(shape: tuple[int, int], spec) -> tuple[int, int]:
    """The shape of the part `spec` of a tensor of `shape` (all of it for None)."""
    if spec is None:
        return shape
    dim, ranges = spec
    cut = list(shape)
    cut[dim] = sum(b - a for a, b in ranges)
    return tuple(cut)


def _slices_per_expert(name: str) -> int:
    return 2 if ".gate_up_proj." in name else 1


def _place_quantized(route: Route, tensor: torch.Tensor, state: dict, slices: dict, shapes: dict,
                     device: torch.device) -> None:
    """A quantized module's values or scale into its buffer: whole, or one expert's gate, up or down block of the
    stacked [E, 2W, .] / [E, H, .] buffer."""
    name, module, kind, slot = route.name, route.module, route.kind, route.slot
    value = quantization_module.stored_values(module, tensor) if kind == "values" else \
        quantization_module.stored_scale(module, tensor, route.shape)
    if slot is None:
        state[name] = value.to(device)
        return
    expert, half = slot
    if name not in state:
        state[name] = torch.empty(shapes[name], dtype=value.dtype, device=device)
    rows = value.shape[0]
    block = state[name][expert, half * rows:(half + 1) * rows]
    if block.shape != value.shape or expert >= shapes[name][0]:
        raise CheckpointError(f"{module.name}: {kind} of shape {tuple(value.shape)} does not fit the experts' "
                              f"{tuple(shapes[name])}")
    block.copy_(value)
    slices[name] = slices.get(name, 0) + 1


def model_name(checkpoint_name: str, layout: str) -> str:
    """The inverse of `checkpoint_key`."""
    return checkpoint_name.replace("model.", "model.language_model.", 1) if layout == "text" else checkpoint_name


def _deliberately_unused(key: str, config: Config, with_towers: bool) -> bool:
    if key.startswith(TOWERS):  # of a multimodal checkpoint loaded text-only (a tower's layers are not the text's)
        return not with_towers
    text = config.text_config
    layer = int(match.group(1)) if (match := UNUSED_SHARED_KV.search(key)) else None
    shared = layer is not None and layer < text.num_hidden_layers and text.is_kv_shared(layer)
    tied = key == "lm_head.weight" and text.tie_word_embeddings  # the embedding serves
    return shared or tied


def progress_bar(total_bytes: int, desc: str, enabled: bool | None = None):
    """A tqdm bar over bytes, on stderr. `enabled` None: for work over 1 GiB, when stderr is a terminal."""
    from tqdm import tqdm

    disable = (None if total_bytes > 2**30 else True) if enabled is None else not enabled
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=disable)


def _own_memory(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor safetensors can write: a view into a larger buffer (fused projections) is copied out."""
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole else tensor.clone()


def save_model(model: Gemma4, directory, max_shard_bytes: int = 5 * 2**30, generation_config: dict | None = None,
               progress: bool | None = None):
    """Write config.json and safetensors (sharded with an index when large) in the layout transformers writes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, quantization_config = quantization_module.compressed_state(model)
    config = model.config
    if quantization_config is not None:  # a quantized model is written as a compressed-tensors checkpoint
        quantization_config["ignore"] = [checkpoint_key(name, config.layout) for name in quantization_config["ignore"]]
        config = copy.deepcopy(config)
        (config.text_config.extra if config.layout == "text" else config.extra)["quantization_config"] = \
            quantization_config
    config.save(directory)
    # Shards are planned from the sizes alone and copied to host memory one at a time: a model on the GPU is written
    # with one shard's worth of host memory.
    shards: list[dict[str, torch.Tensor]] = [{}]  # checkpoint key -> the model's tensor, wherever it lives
    sizes = [0]  # bytes of each shard
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][checkpoint_key(name, config.layout)] = tensor
        sizes[-1] += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    bar = progress_bar(sum(sizes), "writing weights", progress)
    for name, shard, size in zip(names, shards, sizes):
        host = {key: _own_memory(t.detach().contiguous().cpu()) for key, t in shard.items()}
        save_file(host, directory / name, metadata={"format": "pt"})
        bar.update(size)
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    bar.close()
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
