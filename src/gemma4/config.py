"""Configuration dataclasses that mirror Gemma 4's `config.json`, key for key.

Two on-disk forms exist for the same text model and both are read here:
  * the released checkpoints: `global_head_dim` and `num_global_key_value_heads`;
  * files written by transformers 5.23: a `per_layer_config` map ({"05": {"head_dim": 512, ...}}) instead.
From either we derive the per-layer plan (`layer_head_dims`, `layer_num_kv_heads`, `kv_sharing_modes`) that the
model is built from. Unknown keys are kept in `extra` and written back on save.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
PRESETS = ("E2B", "E4B", "26B-A4B", "31B")
PRESET_DIR = Path(__file__).parent / "presets"


def preset_dir(name: str) -> Path:
    """The folder of a released size's official files (config, generation and processor configs): E2B, E4B, 26B-A4B
    or 31B, in any case, also as gemma-4-E2B-it."""
    canonical = {p.lower(): p for p in PRESETS}.get(name.lower().removeprefix("gemma-4-").removesuffix("-it"))
    if canonical is None:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESET_DIR / canonical


class ConfigError(ValueError):
    """A config.json that cannot describe a Gemma 4 model."""


class _JsonConfig:
    """from_dict / to_dict: config.json key names, unknown keys kept in `extra` instead of failing."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} expects a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        try:
            return cls(**{k: v for k, v in data.items() if k in names},
                       extra={k: v for k, v in data.items() if k not in names})
        except TypeError as e:  # a value of the wrong kind, e.g. a string where a number belongs
            raise ConfigError(f"invalid {cls.__name__}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init and f.name != "extra"},
                **self.extra}


@dataclass
class TextConfig(_JsonConfig):
    """`text_config` of a Gemma 4 checkpoint (`model_type: gemma4_text`). Defaults are transformers' defaults."""

    model_type: str = "gemma4_text"
    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int | None = None
    num_global_key_value_heads: int | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None
    attention_bias: bool = False
    sliding_window: int = 512
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = None
    use_bidirectional_attention: str | None = None
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    enable_moe_block: bool = False
    use_double_wide_mlp: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    per_layer_config: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # Older files call the expert width `expert_intermediate_size`.
        if self.moe_intermediate_size is None and "expert_intermediate_size" in self.extra:
            self.moe_intermediate_size = self.extra.pop("expert_intermediate_size")
        if self.model_type != "gemma4_text":
            raise ConfigError(f"text_config.model_type is {self.model_type!r}, expected 'gemma4_text'")
        n = self.num_hidden_layers
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "sliding_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"text_config.{name} must be a positive integer, got {value!r}")
        if self.layer_types is None:  # 5 sliding : 1 global
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != n:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {n} layers")
        if bad := set(self.layer_types) - {SLIDING, FULL}:
            raise ConfigError(f"unknown layer types {sorted(bad)}; expected {SLIDING!r} or {FULL!r}")
        self.layer_types[-1] = FULL  # the reference forces the last layer to be global
        if self.rope_parameters is None:
            self.rope_parameters = {
                SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
            }
        for layer_type in set(self.layer_types):
            rope = self.rope_parameters.get(layer_type)
            if not rope or rope.get("rope_type", "default") not in ("default", "proportional"):
                raise ConfigError(f"rope_parameters[{layer_type!r}] must have rope_type 'default' or 'proportional'")
        if self.use_bidirectional_attention not in (None, "vision"):
            raise ConfigError(
                f"use_bidirectional_attention={self.use_bidirectional_attention!r} is not supported "
                "(only None and 'vision', as in the released checkpoints)")
        if not 0 <= self.num_kv_shared_layers < n:
            raise ConfigError(f"num_kv_shared_layers={self.num_kv_shared_layers} must be in [0, {n})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.enable_moe_block:
            if not (self.num_experts and self.top_k_experts and self.moe_intermediate_size):
                raise ConfigError("enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size")
            if not 0 < self.top_k_experts <= self.num_experts:
                raise ConfigError(f"top_k_experts={self.top_k_experts} must be in [1, num_experts]")
        self._derive_per_layer_shapes()
        self._derive_kv_sharing()

    def _derive_per_layer_shapes(self) -> None:
        """Head dim and KV-head count of every layer, from either on-disk form."""
        n = self.num_hidden_layers
        if self.per_layer_config is not None:  # transformers 5.23 form: explicit overrides per layer index
            overrides: dict[int, dict] = {}
            for key, value in self.per_layer_config.items():
                try:
                    index = int(key)
                except ValueError:
                    raise ConfigError(f"per_layer_config key {key!r} is not a layer index") from None
                if not 0 <= index < n:
                    raise ConfigError(f"per_layer_config names layer {index}, but there are {n} layers")
                overrides[index] = value
        else:  # released form: every global layer gets `global_head_dim` (and its KV heads when K=V)
            override: dict[str, int] = {"head_dim": self.global_head_dim or 512}
            if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
                override["num_key_value_heads"] = self.num_global_key_value_heads
            overrides = {i: override for i, t in enumerate(self.layer_types) if t == FULL}
        self.layer_head_dims = [overrides.get(i, {}).get("head_dim", self.head_dim) for i in range(n)]
        self.layer_num_kv_heads = [
            overrides.get(i, {}).get("num_key_value_heads", self.num_key_value_heads) for i in range(n)]
        for i, kv in enumerate(self.layer_num_kv_heads):
            if self.num_attention_heads % kv:
                raise ConfigError(f"layer {i}: num_attention_heads is not a multiple of its {kv} KV heads")
        # Keep the released-form keys consistent, so that either form can be written back.
        first_global = self.layer_types.index(FULL)
        self.global_head_dim = self.layer_head_dims[first_global]
        if self.attention_k_eq_v:
            self.num_global_key_value_heads = self.layer_num_kv_heads[first_global]

    def _derive_kv_sharing(self) -> None:
        """Which layers compute K/V ("store" marks the producer a later layer reads), which reuse it.

        The last `num_kv_shared_layers` layers compute no K/V: each reads the K/V of the last earlier
        layer of its own type (sliding or global)."""
        n, shared = self.num_hidden_layers, self.num_kv_shared_layers
        first_shared = n - shared
        self.kv_sharing_modes: list[str | None] = [None if i < first_shared else "reuse" for i in range(n)]
        self.kv_source_layer: list[int] = list(range(n))
        if shared == 0:
            return
        for layer_type in set(self.layer_types):
            producers = [i for i in range(first_shared) if self.layer_types[i] == layer_type]
            if not producers:
                raise ConfigError(f"KV-shared {layer_type} layers have no earlier {layer_type} layer to reuse")
            self.kv_sharing_modes[producers[-1]] = "store"
            for i in range(first_shared, n):
                if self.layer_types[i] == layer_type:
                    self.kv_source_layer[i] = producers[-1]

    # --- helpers the model is built from -------------------------------------------------------------
    def is_kv_shared(self, layer_idx: int) -> bool:
        return self.kv_sharing_modes[layer_idx] == "reuse"

    def mlp_width(self, layer_idx: int) -> int:
        doubled = self.use_double_wide_mlp and self.is_kv_shared(layer_idx)
        return self.intermediate_size * (2 if doubled else 1)

    def has_v_proj(self, layer_idx: int) -> bool:
        # K=V: global layers take their values from the key projection.
        return not (self.attention_k_eq_v and self.layer_types[layer_idx] == FULL)

    def to_dict(self) -> dict[str, Any]:
        """The transformers 5.23 form (`per_layer_config`), which transformers and we both read."""
        out = {k: v for k, v in super().to_dict().items() if k not in ("global_head_dim", "num_global_key_value_heads")}
        out["per_layer_config"] = {
            f"{i:02d}": {"head_dim": hd, "num_key_value_heads": kv}
            for i, (hd, kv) in enumerate(zip(self.layer_head_dims, self.layer_num_kv_heads))
            if (hd, kv) != (self.head_dim, self.num_key_value_heads)
        }
        return out


@dataclass
class VisionConfig(_JsonConfig):
    """`vision_config` (`model_type: gemma4_vision`)."""

    model_type: str = "gemma4_vision"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131_072
    attention_bias: bool = False
    rope_parameters: dict | None = None
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.model_type != "gemma4_vision":
            raise ConfigError(f"vision_config.model_type is {self.model_type!r}, expected 'gemma4_vision'")
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 100.0}


@dataclass
class AudioConfig(_JsonConfig):
    """`audio_config` (`model_type: gemma4_audio`), a Conformer encoder."""

    model_type: str = "gemma4_audio"
    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    subsampling_conv_channels: list[int] = field(default_factory=lambda: [128, 32])
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.model_type != "gemma4_audio":
            raise ConfigError(f"audio_config.model_type is {self.model_type!r}, expected 'gemma4_audio'")
        self.subsampling_conv_channels = list(self.subsampling_conv_channels)


@dataclass
class Config(_JsonConfig):
    """Top-level `config.json`. A text-only file (`model_type: gemma4_text`) becomes a Config without towers."""

    model_type: str = "gemma4"
    text_config: TextConfig = field(default_factory=TextConfig)
    vision_config: VisionConfig | None = None
    audio_config: AudioConfig | None = None
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    image_token_id: int = 258_880
    video_token_id: int = 258_884
    boa_token_id: int = 256_000
    eoa_token_index: int = 258_883
    audio_token_id: int = 258_881
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    vision_soft_tokens_per_image: int = 280
    extra: dict[str, Any] = field(default_factory=dict)
    # The layout of the checkpoint this came from: "multimodal" (Gemma4ForConditionalGeneration) or "text".
    layout: str = field(default="multimodal", compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        if not isinstance(data, dict):
            raise ConfigError("config.json must hold a JSON object")
        model_type = data.get("model_type")
        if model_type == "gemma4_text":
            text = TextConfig.from_dict(data)
            return cls(text_config=text, eos_token_id=text.eos_token_id, layout="text",
                       tie_word_embeddings=text.tie_word_embeddings)
        if model_type != "gemma4":
            raise ConfigError(
                f"config.json has model_type {model_type!r}; gemma4 loads only Gemma 4 checkpoints "
                "(model_type 'gemma4' or 'gemma4_text')")
        if not isinstance(data.get("text_config"), dict):
            raise ConfigError("config.json of model_type 'gemma4' needs a 'text_config' object")
        vision, audio = data.get("vision_config"), data.get("audio_config")
        return super().from_dict({**data, "text_config": TextConfig.from_dict(data["text_config"]),
                                  "vision_config": VisionConfig.from_dict(vision) if vision else None,
                                  "audio_config": AudioConfig.from_dict(audio) if audio else None})

    def to_dict(self) -> dict[str, Any]:
        if self.layout == "text":
            return {**self.text_config.to_dict(), "architectures": ["Gemma4ForCausalLM"]}
        out = super().to_dict()
        out.pop("layout")
        for key in ("text_config", "vision_config", "audio_config"):
            out[key] = out[key].to_dict() if out[key] else None
        out.setdefault("architectures", ["Gemma4ForConditionalGeneration"])
        return out

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}: point to a Gemma 4 checkpoint directory")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-download the checkpoint") from None
        return cls.from_dict(data)

    @property
    def quantization_config(self) -> dict | None:
        """config.json's `quantization_config` (a quantized checkpoint's), wherever the layout keeps it."""
        return (self.text_config.extra if self.layout == "text" else self.extra).get("quantization_config")

    def save(self, directory: str | os.PathLike) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def preset(cls, name: str) -> "Config":
        """The official config of a released size: E2B, E4B, 26B-A4B or 31B."""
        return cls.from_file(preset_dir(name) / "config.json")
