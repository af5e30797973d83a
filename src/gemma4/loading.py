"""Checkpoints: resolve a path or hub id, build the model on `meta`, fill it from memory-mapped safetensors.

Our parameter names are the multimodal checkpoint keys (`model.language_model.layers.0...`). The one exception is
the text-only layout (`Gemma4ForCausalLM`), whose keys lack the `language_model.` level: see `checkpoint_key`.
Only safetensors are read (never pickle).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import Config
from .model.gemma4 import Gemma4

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "auto": None}
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
# Released checkpoints store K/V weights for KV-shared layers, which never use them (they read the producer's K/V).
UNUSED_SHARED_KV = re.compile(r"layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")


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
               model_class: type[Gemma4] = Gemma4) -> Gemma4:
    """`dtype` None or "auto": the checkpoint's; `device` "auto": CUDA when present, else the CPU. `progress`: a bar
    on stderr (None: for checkpoints over 1 GiB, on a terminal)."""
    device = resolve_device(device)
    directory = resolve_checkpoint(path_or_id)
    config = Config.from_file(directory)
    files = safetensors_files(directory)
    dtype = resolve_dtype(dtype, device, checkpoint_dtype(config, files))
    with torch.device("meta"):
        model = model_class(config, with_towers=with_towers)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    expected = {checkpoint_key(name, config.layout): name for name in shapes}
    state: dict[str, torch.Tensor] = {}
    bar = progress_bar(sum(f.stat().st_size for f in files), "loading weights", progress)
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as reader:
                for key in reader.keys():
                    name = expected.get(key)
                    if name is None:
                        if _deliberately_unused(key, config, with_towers):
                            continue
                        raise CheckpointError(f"unexpected tensor {key!r} in {file.name}: this checkpoint does "
                                              "not match its config.json")
                    tensor = reader.get_tensor(key)
                    if tensor.shape != shapes[name]:
                        raise CheckpointError(f"{key} has shape {tuple(tensor.shape)}, config.json implies "
                                              f"{tuple(shapes[name])}")
                    state[name] = tensor.to(device=device, dtype=dtype)
                    bar.update(tensor.numel() * tensor.element_size())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is truncated or corrupt ({e}); re-download it") from None
    bar.close()
    if missing := [checkpoint_key(n, config.layout) for n in expected.values() if n not in state]:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]!r}")
    model.load_state_dict(state, assign=True, strict=True)
    generation_config = directory / "generation_config.json"
    if generation_config.is_file():
        model.generation_config = json.loads(generation_config.read_text())
    model.checkpoint_dir = directory
    return model.ready_()


def _deliberately_unused(key: str, config: Config, with_towers: bool) -> bool:
    shared = (match := UNUSED_SHARED_KV.search(key)) and config.text_config.is_kv_shared(int(match.group(1)))
    tied = key == "lm_head.weight" and config.text_config.tie_word_embeddings  # the embedding serves
    towers = not with_towers and key.startswith(  # of a multimodal checkpoint loaded text-only
        ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio."))
    return bool(shared or tied or towers)


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
    config = model.config
    config.save(directory)
    # Shards are planned from the sizes alone and copied to host memory one at a time: a model on the GPU is written
    # with one shard's worth of host memory.
    shards: list[dict[str, torch.Tensor]] = [{}]  # checkpoint key -> the model's tensor, wherever it lives
    sizes = [0]  # bytes of each shard
    for name, tensor in model.state_dict().items():
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
