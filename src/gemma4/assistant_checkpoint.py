"""Drafter checkpoints (`gemma4_assistant`): load, save, and random ones that fit a target size.

The released layout is transformers 5.24's `Gemma4AssistantForCausalLM` state dict: `model.` (the decoder, whose
`embed_tokens` is the tied LM head), `pre_projection.`, `post_projection.`, and on E2B / E4B drafters
`masked_embedding.centroids.weight` and `masked_embedding.token_ordering`. Our parameter names are those keys;
`unread` and `checkpoint_tensor` are the one place that handles what a file may hold beyond them. Only safetensors
are read; a tensor-parallel rank reads only its slices (`load_assistant(ranks=...)`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import FULL, SLIDING, Config, TextConfig, preset_dir
from .loading import (CheckpointError, _own_memory, resolve_checkpoint, resolve_device, resolve_dtype,
                      safetensors_files)
from .model.assistant import Assistant, AssistantConfig, drafter_text_config

# K/V weights of KV-shared layers (a drafter's layers all are): the reference ignores them on load.
_SHARED_LAYER_KV = re.compile(r"^model\.layers\.\d+\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def unread(key: str, config: AssistantConfig) -> bool:
    """Whether the model deliberately does not read this checkpoint tensor: the LM head when it is tied to the
    embedding, K/V weights of KV-shared layers."""
    return (key == "lm_head.weight" and config.tie_word_embeddings) or bool(_SHARED_LAYER_KV.match(key))


def checkpoint_tensor(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A checkpoint tensor (one `unread` does not skip) as the model takes it: `token_ordering` holds token ids and
    stays an integer tensor (int64, whatever width the file uses); every other tensor takes `dtype`."""
    if key.endswith("token_ordering"):
        return tensor.long()
    return tensor.to(dtype)


def load_assistant(path_or_id, dtype=None, device="auto", ranks=None) -> Assistant:
    """`dtype` None: the checkpoint's (config.json's `dtype`, else bfloat16); `device` "auto": CUDA when present.
    `ranks`: a tensor-parallel rank's `distributed.Ranks`: the drafter is cut to that rank's part
    (`distributed.sharding.assistant_cut_specs`) and only those slices are read."""
    device = resolve_device(device)
    directory = resolve_checkpoint(path_or_id)
    config = AssistantConfig.from_file(directory)
    stored = config.extra.get("dtype", config.extra.get("torch_dtype"))
    dtype = resolve_dtype(dtype, device, _DTYPE_NAMES.get(stored, torch.bfloat16))
    with torch.device("meta"):
        model = Assistant(config)
    specs = {}
    if ranks is not None and ranks.size > 1:
        from .distributed.sharding import assistant_cut_specs, read_slice, shard_assistant_
        specs = assistant_cut_specs(config, ranks)
        shard_assistant_(model, ranks)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(directory):
        try:
            with safe_open(file, framework="pt", device="cpu") as reader:
                for key in reader.keys():
                    if unread(key, config):
                        continue
                    spec = specs.get(key)
                    tensor = checkpoint_tensor(key, read_slice(reader.get_slice(key), spec) if spec is not None
                                               else reader.get_tensor(key), dtype)
                    if key not in shapes:
                        raise CheckpointError(f"unexpected tensor {key!r} in {file.name}: this drafter checkpoint "
                                              "does not match its config.json")
                    if tensor.shape != shapes[key]:
                        raise CheckpointError(f"{key} has shape {tuple(tensor.shape)}, config.json implies "
                                              f"{tuple(shapes[key])}")
                    state[key] = tensor.to(device)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is truncated or corrupt ({e}); re-download it") from None
    if missing := [name for name in shapes if name not in state]:
        raise CheckpointError(f"drafter checkpoint lacks {len(missing)} tensors, e.g. {missing[0]!r}")
    model.load_state_dict(state, assign=True, strict=True)
    # RoPE tables are derived on the CPU when the model is built on meta; they follow the weights' device.
    model.model.inv_freq = {t: f.to(device) for t, f in model.model.inv_freq.items()}
    return model.ready_()


def save_assistant(model: Assistant, directory) -> Path:
    """config.json and one model.safetensors in the released layout (the tied LM head not written)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    dtype = next(model.parameters()).dtype
    config.extra["dtype"] = str(dtype).removeprefix("torch.")
    config.save(directory)
    state = {key: _own_memory(t.detach().contiguous().cpu()) for key, t in model.state_dict().items()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


# A random drafter's own sizes. The released drafters' config.json files are not available here, so these are
# placeholders (small, like a drafter); what must fit the target is derived from its config (see below).
DRAFTER_HIDDEN, DRAFTER_INTERMEDIATE, DRAFTER_LAYERS = 256, 2048, 4
CLUSTERED_HEAD_PRESETS = ("E2B", "E4B")


def random_assistant_config(preset: str, num_layers: int = DRAFTER_LAYERS) -> AssistantConfig:
    """A drafter that fits the target `preset` (`assistant_config_for`); E2B / E4B drafters get the clustered head,
    with the reference's default cluster counts."""
    return assistant_config_for(Config.preset(preset).text_config, num_layers,
                                clustered=preset_dir(preset).name in CLUSTERED_HEAD_PRESETS)


def assistant_config_for(target: TextConfig, num_layers: int = DRAFTER_LAYERS, hidden_size: int = DRAFTER_HIDDEN,
                         intermediate_size: int = DRAFTER_INTERMEDIATE, clustered: bool = False,
                         **head) -> AssistantConfig:
    """A drafter that fits the target text config: the target's width as backbone_hidden_size, and attention shaped
    to read the target's K/V (head dims, KV heads, K=V on global layers, window, RoPE); the last layer global, the
    others sliding. `head`: AssistantConfig's clustered-head fields (num_centroids, centroid_intermediate_top_k)."""
    text = target.to_dict()
    keep = ("vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_activation",
            "rms_norm_eps", "pad_token_id", "eos_token_id", "bos_token_id", "rope_parameters", "attention_bias",
            "sliding_window", "attention_k_eq_v", "max_position_embeddings", "final_logit_softcapping")
    text = {key: text[key] for key in keep}
    text.update(model_type="gemma4_text", hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_layers, layer_types=[SLIDING] * (num_layers - 1) + [FULL],
                global_head_dim=target.global_head_dim, num_global_key_value_heads=target.num_global_key_value_heads,
                num_kv_shared_layers=num_layers, tie_word_embeddings=True)
    return AssistantConfig(text_config=drafter_text_config(text), backbone_hidden_size=target.hidden_size,
                           use_ordered_embeddings=clustered, **head)


def random_assistant(config: AssistantConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     device: str = "cpu") -> Assistant:
    """Random weights (random_init.randomize_) and, for the clustered head, a random split of the vocabulary into
    clusters (`token_ordering`: a permutation of the token ids)."""
    from .random_init import randomize_

    with torch.device("meta"):
        model = Assistant(config).to(dtype)
    model = randomize_(model.to_empty(device=device), seed)
    model.model.inv_freq = {t: f.to(device) for t, f in model.model.inv_freq.items()}
    if model.masked_embedding is not None:
        generator = torch.Generator().manual_seed(seed)
        ordering = torch.randperm(config.text_config.vocab_size, generator=generator)
        model.masked_embedding.token_ordering.copy_(ordering)
    return model.ready_()


def write_random_assistant(preset: str, out, num_layers: int = DRAFTER_LAYERS, dtype: torch.dtype = torch.bfloat16,
                           seed: int = 0, device: str = "cpu") -> Path:
    model = random_assistant(random_assistant_config(preset, num_layers), dtype, seed, resolve_device(device))
    return save_assistant(model, out)
