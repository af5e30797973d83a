"""Random weights of any size: how users, tests and benchmarks get a Gemma 4 model without a download.

Values are varied on purpose (norm weights, layer scalars, router scales and clip bounds are not left at their
neutral 1 / +-inf), so that a term dropped by an implementation changes the logits."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .config import Config, preset_dir
from .model.fused import QuantizedLinear


# Matrices get std GAIN / sqrt(fan_in). Below 1 the random network is less chaotic, so float rounding (e.g. another
# attention kernel's summation order) is not amplified layer after layer into visible logit differences.
GAIN = 0.5
# Part of the cached checkpoints' names (`cached_random_checkpoint`): raised when the draws change, so that older
# caches are not reused.
RANDOM_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, progress: bool | None = None) -> torch.nn.Module:
    """Fill every weight in place. `progress`: a bar on stderr (None: for models over 1 GiB, on a terminal)."""
    from .loading import progress_bar

    generators: dict[torch.device, torch.Generator] = {}  # one per device: values are drawn where they live
    scratch: dict[torch.device, torch.Tensor] = {}  # one fp32 block per device, drawn into again and again
    block_values = 1 << 25

    def fill(tensor, draw):
        # Row blocks of at most ~32M values: a full-size PLE table (2.3B values) never exists in fp32 at once. The
        # values are drawn in place into one reused buffer (a fresh one per block cost as much time in page faults
        # as the drawing itself).
        rows = max(1, block_values // max(1, tensor[0].numel())) if tensor.dim() else 1
        flat = tensor if tensor.dim() else tensor.view(1)
        device = tensor.device
        generator = generators.setdefault(device, torch.Generator(device).manual_seed(seed))
        for start in range(0, flat.shape[0], rows):
            block = flat[start:start + rows]
            if scratch.get(device) is None or scratch[device].numel() < block.numel():
                scratch[device] = torch.empty(block.numel(), device=device)
            out = scratch[device][:block.numel()].view(block.shape)
            draw(out, generator)
            block.copy_(out)
        bar.update(tensor.numel() * tensor.element_size())

    def uniform(low, high):
        return lambda out, g: torch.rand(out.shape, generator=g, out=out).mul_(high - low).add_(low)

    def normal(std):
        return lambda out, g: torch.randn(out.shape, generator=g, out=out).mul_(std)

    states = model.state_dict()
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    bar = progress_bar(sum(t.numel() * t.element_size() for t in states.values()), "random weights", progress)
    for module in quantized.values():
        _randomize_quantized_(module, generators.setdefault(module.values.device,
                                                            torch.Generator(module.values.device).manual_seed(seed)))
        bar.update(sum(t.numel() * t.element_size() for t in (module.values, module.scale)))
    # state_dict() holds what a checkpoint holds (not derived buffers such as RoPE tables), sharing storage.
    for name, tensor in states.items():
        module, _, leaf = name.rpartition(".")
        if not tensor.is_floating_point() or module in quantized:
            continue
        if leaf.endswith("_min"):  # clip bounds of clippable linears: finite, so clipping really happens
            fill(tensor, uniform(-3.0, -1.5))
        elif leaf.endswith("_max"):
            fill(tensor, uniform(1.5, 3.0))
        elif leaf == "layer_scalar":
            fill(tensor, uniform(0.5, 1.0))
        elif module.endswith(("q_norm", "k_norm")):
            # Attention scale is 1.0, so trained q/k norm weights set the logits' spread. Weights around 1 would
            # give q.k a std of sqrt(head_dim) (16 at head_dim 256): near-hard argmax attention that makes the random
            # network chaotic (bf16 rounding alone left a 10-layer E2B's logits uncorrelated with fp32: cosine 0.19).
            # Around head_dim ** -0.25 each, q.k has unit spread.
            fill(tensor, uniform(0.5 * tensor.shape[0] ** -0.25, 1.5 * tensor.shape[0] ** -0.25))
        elif tensor.dim() <= 1:  # norm weights, router scales: around 1; biases: small
            fill(tensor, normal(0.02) if leaf == "bias" else uniform(0.5, 1.5))
        else:  # matrices: std GAIN / sqrt(fan_in)
            fill(tensor, normal(GAIN * tensor.shape[-1] ** -0.5))
    bar.close()
    return model


@torch.no_grad()
def _randomize_quantized_(module: QuantizedLinear, generator: torch.Generator) -> None:
    """A quantized Linear drawn in its quantized form, not quantized from a drawn matrix (a full-size E2B's 1.9B int4
    values in a second, where quantizing costs minutes on a CPU): integers uniform over the type's range (int4: 8
    random nibbles a word; fp8: normal values cast), scales around GAIN / sqrt(fan_in) / std(q), so that the
    dequantized matrix has about the spread of `randomize_`'s dense ones."""
    scheme, values = module.scheme, module.values
    if scheme.kind == "int":
        low, high = (-2**31, 2**31 - 1) if scheme.packed else (-128, 128)
        values.random_(low, high, generator=generator)
        spread = ((2**scheme.bits) ** 2 / 12) ** 0.5  # std of integers uniform over 2^bits values
    else:
        values.copy_(torch.randn(values.shape, generator=generator, device=values.device).to(torch.float8_e4m3fn)
                     .view(torch.uint8))
        spread = 1.0
    fan_in = module.in_features
    scale = torch.rand(module.scale.shape, generator=generator, device=values.device).add_(0.5)
    module.scale.copy_(scale.mul_(GAIN * fan_in**-0.5 / spread))


def random_config(preset: str, num_layers: int | None = None, text_only: bool = False) -> Config:
    config = Config.preset(preset)
    text = config.text_config
    if num_layers is not None and num_layers != text.num_hidden_layers:
        # Keep the layer pattern and the share of KV-shared layers; the last layer stays global.
        pattern = text.layer_types
        shared = round(text.num_kv_shared_layers * num_layers / text.num_hidden_layers)
        config.text_config = type(text).from_dict({
            **text.to_dict(), "num_hidden_layers": num_layers,
            "layer_types": [pattern[i % len(pattern)] for i in range(num_layers)],
            "num_kv_shared_layers": min(shared, max(num_layers - 6, 0)) if shared else 0,
            "per_layer_config": None, "global_head_dim": text.global_head_dim,
            "num_global_key_value_heads": text.num_global_key_value_heads})
    if text_only:
        config.vision_config = config.audio_config = None
    return config


def random_model(config: Config, dtype: torch.dtype = torch.bfloat16, seed: int = 0, device: str = "cpu",
                 quantization: str | None = None):
    """A Model of `config` with random weights, allocated directly in `dtype` (a full-size E2B fits in 10 GB);
    `quantization` ("fp8", "int8", "int4"): the Linears that `load_model` quantizes on load are drawn quantized."""
    from .pretrained import Model
    from .quantization import on_load_scheme, quantize_model_

    scheme = on_load_scheme(quantization) if quantization else None
    with torch.device("meta"):
        model = Model(config).to(dtype)
        if scheme is not None:
            quantize_model_(model, scheme)  # on meta: the holders, without values
    return randomize_(model.to_empty(device=device), seed).ready_()


def write_random_checkpoint(preset: str, out: str | Path, num_layers: int | None = None, text_only: bool = False,
                            dtype: torch.dtype = torch.bfloat16, tokenizer: str | Path | None = None,
                            seed: int = 0, device: str = "cpu", quantization: str | None = None) -> Path:
    """The weights are drawn on `device` and written a shard at a time; with `quantization`, quantized and written
    as a compressed-tensors checkpoint."""
    from .loading import resolve_device

    official = preset_dir(preset)
    config = random_config(preset, num_layers, text_only)
    if text_only:
        config.layout = "text"
    model = random_model(config, dtype, seed, resolve_device(device), quantization)
    out = Path(out)
    generation = json.loads((official / "generation_config.json").read_text())
    model.save_pretrained(out, generation_config=generation)
    shutil.copy(official / "processor_config.json", out / "processor_config.json")
    if tokenizer is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer) / name).is_file():
                shutil.copy(Path(tokenizer) / name, out / name)
    return out


def cached_random_checkpoint(preset: str, num_layers: int | None = None, quantization: str | None = None,
                             seed: int = 0) -> tuple[Path, bool]:
    """A random text-only checkpoint of `preset` drawn on the CPU, written once under the cache directory (option
    cache_dir, $GEMMA4_CACHE) and reused: loading it memory-maps the file, so a later run starts in seconds and
    reads only the pages it touches (E2B's 4.7 GB per-layer embedding table: the rows of the tokens it sees).
    Returns (its directory, whether this call wrote it). A run interrupted while writing leaves no cache behind."""
    from .options import options

    name = f"{preset}-{num_layers or 'all'}layers-{quantization or 'bf16'}-seed{seed}-v{RANDOM_VERSION}"
    root = Path(options().cache_dir) / "random"
    path = root / name
    if (path / "config.json").is_file():
        return path, False
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".{name}.{os.getpid()}.partial"
    try:
        write_random_checkpoint(preset, partial, num_layers, text_only=True, quantization=quantization, seed=seed,
                                device="cpu")
        partial.rename(path)
    except OSError:
        if not (path / "config.json").is_file():  # not another run's finished copy: a real failure
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path, True
