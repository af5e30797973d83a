"""Quantized checkpoints in the compressed-tensors format, and quantization on load.

A checkpoint's config.json names the format in `quantization_config` (quant_method "compressed-tensors"): config
groups of a weight scheme (and an activation scheme, which is not applied here: products run weight-only, see
README), targets, an `ignore` list. Each quantized Linear holds, per format:

  pack-quantized   weight_packed int32 [N, K*bits/32], weight_scale [N, K/group or 1], weight_shape int64 [2]
  int-quantized    weight int8 [N, K], weight_scale [N, 1]
  float-quantized  weight float8_e4m3fn [N, K], weight_scale [N, 1], [1] or blocks [ceil(N/bh), ceil(K/bw)]

Which modules are quantized is read from the tensors present (a `weight_scale`), the scheme from the group whose
targets match. 26B-A4B's experts come per expert (`experts.E.{gate,up,down}_proj`, llm-compressor's layout) and are
stacked into the model's [E, 2I, H] and [E, H, I]. Every check runs on the safetensors headers, before a weight moves.

A `kv_cache_scheme` (fp8, static scales per tensor or per KV head, calibrated by llm-compressor) comes with a
`self_attn.k_scale` and `v_scale` per attention layer: stored K = fp8(K / k_scale), read back times k_scale, of the
K/V the cache holds (after k_norm / v_norm and RoPE). They become buffers of the attention modules
(`add_kv_cache_scales_`) and the fp8 KV pools' scales (`kv_cache_dtype="fp8"`, KVPools.load_scales_); with the
default cache of the model's dtype they are not used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .model.fused import Linear, QuantizedLinear, stored
from .model.quantized import ON_LOAD, Scheme, pack, unpack

PER_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj$")
# (type, bits) -> the scale strategies gemma4 runs for such weights
STRATEGIES = {("int", 4): ("group", "channel"), ("int", 8): ("group", "channel"),
              ("float", 8): ("channel", "tensor", "block")}


class QuantizationError(ValueError):
    """A quantized checkpoint (or a `quantization=` request) that gemma4 cannot run."""


@dataclass(frozen=True)
class Group:
    targets: tuple[str, ...]
    scheme: Scheme
    format: str


def parse_scheme(weights: dict, name: str) -> Scheme:
    """A config group's `weights` arguments -> the Scheme we run, or one error naming what is not supported."""
    kind, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
    described = f"{name}: {kind}{bits} weights per {strategy}"
    if not weights.get("symmetric", True):
        raise QuantizationError(f"{described}, asymmetric (zero points): gemma4 runs symmetric schemes only")
    if weights.get("actorder") not in (None, "static"):
        raise QuantizationError(f"{described} with activation ordering {weights['actorder']!r} is not supported")
    if not isinstance(bits, int) or strategy not in STRATEGIES.get((kind, bits), ()):
        raise QuantizationError(f"{described} is not supported; gemma4 runs int4 (groups or channels), int8 "
                                "(groups or channels) and fp8 (tensor, channel or block scales)")
    group_size = weights.get("group_size") if strategy == "group" else None
    if strategy == "group" and (not isinstance(group_size, int) or group_size <= 0 or group_size % 8):
        raise QuantizationError(f"{described}: group_size {group_size!r} must be a positive multiple of 8")
    block = tuple(weights.get("block_structure") or ()) if strategy == "block" else None
    if strategy == "block" and len(block) != 2:
        raise QuantizationError(f"{described}: block_structure {weights.get('block_structure')!r} is not [rows, cols]")
    # A per-tensor scale is a per-channel one repeated (expanded on load).
    return Scheme(kind, bits, "channel" if strategy == "tensor" else strategy, group_size, block)


def parse_config(quantization_config: dict) -> list[Group]:
    """The weight groups (none when only the KV cache is quantized); QuantizationError for what gemma4 cannot run."""
    if quantization_config.get("quant_method") != "compressed-tensors":
        raise QuantizationError(f"quantization_config.quant_method {quantization_config.get('quant_method')!r} "
                                "is not supported; gemma4 loads compressed-tensors checkpoints (FP8, W4A16, W8A16, "
                                "W8A8), or quantizes a bf16 checkpoint on load (quantization='fp8'|'int8'|'int4')")
    groups = []
    for name, group in (quantization_config.get("config_groups") or {}).items():
        fmt = group.get("format") or quantization_config.get("format")
        if fmt not in ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized"):
            raise QuantizationError(f"quantization_config group {name}: format {fmt!r} is not supported")
        if not isinstance(group.get("weights"), dict):
            raise QuantizationError(f"quantization_config group {name} quantizes no weights")
        groups.append(Group(tuple(group.get("targets") or ()), parse_scheme(group["weights"], name), fmt))
    if not groups and kv_cache_strategy(quantization_config) is None:
        raise QuantizationError("quantization_config has no config_groups")
    return groups


def kv_cache_strategy(quantization_config: dict | None) -> str | None:
    """The scale strategy of the checkpoint's `kv_cache_scheme`: "tensor" or "attn_head" (None: no scheme); one
    error naming any other scheme. fp8 e4m3 with static symmetric scales is what vLLM and llm-compressor use."""
    scheme = (quantization_config or {}).get("kv_cache_scheme")
    if scheme is None:
        return None
    kind, bits, strategy = scheme.get("type"), scheme.get("num_bits"), scheme.get("strategy")
    if (kind, bits) != ("float", 8) or strategy not in ("tensor", "attn_head") or scheme.get("dynamic") \
            or not scheme.get("symmetric", True):
        raise QuantizationError(f"kv_cache_scheme {kind}{bits} per {strategy} (dynamic={scheme.get('dynamic')}, "
                                f"symmetric={scheme.get('symmetric', True)}) is not supported; gemma4 runs fp8 KV "
                                "caches with static symmetric scales per tensor or per attention head")
    return strategy


def add_kv_cache_scales_(model: nn.Module, strategy: str, device="meta") -> None:
    """`k_scale` and `v_scale` buffers, shaped as compressed-tensors stores them ([1] per tensor, [Hkv, 1, 1] per KV
    head), on every attention layer that owns K/V (KV-shared layers read their producer's pools)."""
    for module in model.modules():
        if hasattr(module, "k_norm"):
            shape = (1,) if strategy == "tensor" else (module.num_kv_heads, 1, 1)
            for name in ("k_scale", "v_scale"):
                module.register_buffer(name, torch.ones(shape, device=device))


def kv_cache_scales(model: nn.Module) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Layer -> (key scales, value scales), float32 [Hkv] each, of a model holding a checkpoint's calibrated KV cache
    scales ({} for one without)."""
    scales = {}
    for module in model.modules():
        if getattr(module, "k_scale", None) is not None:
            scales[module.layer_idx] = tuple(getattr(module, name).float().reshape(-1).expand(module.num_kv_heads)
                                             for name in ("k_scale", "v_scale"))
    return scales


def group_for(module: str, groups: list[Group]) -> Group:
    """The group that targets `module` (`targeting`), else the first (every module holding quantized tensors is
    quantized by one)."""
    return targeting(module, groups) or groups[0]


def targeting(module: str, groups: list[Group]) -> Group | None:
    """The group whose targets take the Linear `module`: one whose "re:" target matches its name (re.match, as
    compressed-tensors), else one targeting a class (every Linear)."""
    for group in groups:
        if any(t.startswith("re:") and re.match(t[3:], module) for t in group.targets):
            return group
    return next((g for g in groups if any(not t.startswith("re:") for t in g.targets)), None)


def ignored(module: str, ignore: list[str]) -> bool:
    """Whether a quantization_config's `ignore` list keeps `module` dense: its name, or a "re:" pattern matching it."""
    return any(module == entry or (entry.startswith("re:") and re.match(entry[3:], module)) for entry in ignore)


@dataclass
class QuantizedModule:
    """One quantized Linear of a checkpoint, from its header: `tensors` local name -> (key, shape, dtype)."""
    name: str
    group: Group
    tensors: dict[str, tuple[str, tuple[int, ...], str]]

    @property
    def scheme(self) -> Scheme:
        return self.group.scheme

    def values_key(self) -> str:
        local = "weight_packed" if "weight_packed" in self.tensors else "weight"
        if local not in self.tensors:
            raise QuantizationError(f"{self.tensors['weight_scale'][0]} has no quantized weight beside it "
                                    f"({self.name}.weight_packed or .weight)")
        return local

    def shape(self) -> tuple[int, int]:
        """[N, K] of the dense weight, checked against the stored values and scale."""
        local = self.values_key()
        key, stored, dtype = self.tensors[local]
        scheme = self.scheme
        if len(stored) != 2:
            raise QuantizationError(f"{key} has shape {list(stored)}; a quantized Linear weight is 2-D")
        if local == "weight_packed":
            if dtype != "I32":
                raise QuantizationError(f"{key} is {dtype}; packed weights are int32")
            n, k = stored[0], stored[1] * 32 // scheme.bits
            if "weight_shape" in self.tensors and self.tensors["weight_shape"][1] != (2,):
                raise QuantizationError(f"{self.tensors['weight_shape'][0]} should hold [rows, columns]")
        else:
            wanted = {"int": "I8", "float": "F8_E4M3"}[scheme.kind]
            if dtype != wanted or scheme.bits != 8:
                raise QuantizationError(f"{key} is {dtype}; {scheme.name} weights are stored as {wanted}")
            n, k = stored
        if scheme.strategy == "group" and k % scheme.group_size:
            raise QuantizationError(f"{key}: {k} input columns are not a multiple of the group size "
                                    f"{scheme.group_size}")
        scale_key, scale_shape, _ = self.tensors["weight_scale"]
        expected = scheme.scale_shape(n, k)
        if tuple(scale_shape) not in (expected, (1,), (1, 1)) or (tuple(scale_shape) != expected and
                                                                  scheme.strategy != "channel"):
            raise QuantizationError(f"{scale_key} has shape {list(scale_shape)}; {scheme.name} of a [{n}, {k}] "
                                    f"weight needs {list(expected)}")
        return n, k


def plan(headers: dict[str, tuple[tuple[int, ...], str]], groups: list[Group]) -> dict[str, QuantizedModule]:
    """Checkpoint module name -> QuantizedModule, for every module that has a `weight_scale`; checked throughout."""
    modules: dict[str, QuantizedModule] = {}
    by_module: dict[str, dict[str, tuple[str, tuple[int, ...], str]]] = {}
    for key, (shape, dtype) in headers.items():
        module, _, local = key.rpartition(".")
        by_module.setdefault(module, {})[local] = (key, tuple(shape), dtype)
    for module, tensors in by_module.items():
        if "weight_scale" not in tensors:
            if "weight_packed" in tensors:
                raise QuantizationError(f"{module}.weight_packed has no {module}.weight_scale beside it")
            continue
        if "weight_zero_point" in tensors or "weight_g_idx" in tensors:
            raise QuantizationError(f"{module} has zero points or a group index: asymmetric and act-order schemes "
                                    "are not supported")
        if "weight_global_scale" in tensors:
            raise QuantizationError(f"{module}.weight_global_scale: NVFP4 checkpoints are not supported")
        if not groups:
            raise QuantizationError(f"{module}.weight_scale: quantization_config has no config_groups for it")
        entry = QuantizedModule(module, group_for(module, groups), tensors)
        entry.shape()
        modules[module] = entry
    return modules


def stored_values(module: QuantizedModule, tensor: torch.Tensor) -> torch.Tensor:
    """A checkpoint's quantized values as QuantizedLinear's `values` buffer holds them."""
    if tensor.dtype == torch.int32 and module.scheme.bits == 8:  # pack-quantized int8: 4 a word
        return unpack(tensor, 8)
    return stored(tensor)


def stored_scale(module: QuantizedModule, tensor: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """A checkpoint's scale as the buffer holds it: a per-tensor scale repeated per channel. `shape`: [N, K] of the
    part of the weight held (a tensor-parallel rank's), else the whole."""
    n, k = shape or module.shape()
    per_tensor = module.scheme.strategy == "channel" and tensor.numel() == 1
    return tensor.reshape(1, 1).expand(n, 1).contiguous() if per_tensor else \
        tensor.reshape(module.scheme.scale_shape(n, k))


def replace_linear(model: nn.Module, name: str, scheme: Scheme, device="meta") -> QuantizedLinear:
    linear = model.get_submodule(name)
    if not isinstance(linear, nn.Linear) or linear.bias is not None:
        raise QuantizationError(f"{name} is quantized in the checkpoint, but gemma4's model has no bias-free "
                                "Linear there")
    return _replace(model, name, QuantizedLinear(linear.in_features, linear.out_features, scheme, device=device))


def _replace(model: nn.Module, name: str, quantized: QuantizedLinear) -> QuantizedLinear:
    """`quantized` in place of the Linear `name`; a tensor-parallel row-parallel part (distributed/sharding.py)
    stays one."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    dense = getattr(parent, child)
    if getattr(dense, "sums_over_ranks", False):
        from .distributed.sharding import row_parallel_
        row_parallel_(quantized, dense.ranks)
    setattr(parent, child, quantized)
    return quantized


def quantize_experts_module(experts: nn.Module, scheme: Scheme, device="meta") -> None:
    """Experts' 3-D weights replaced by QuantizedLinear holders of [E, 2I, H] and [E, H, I] (one matrix per expert)."""
    e, two_w, h = experts.gate_up_proj.shape
    del experts.gate_up_proj, experts.down_proj  # parameters, replaced by modules
    experts.gate_up_proj = QuantizedLinear(h, two_w, scheme, leading=(e,), device=device)
    experts.down_proj = QuantizedLinear(two_w // 2, h, scheme, leading=(e,), device=device)


# --- quantization on load ---------------------------------------------------------------------------------------

def on_load_scheme(name: str) -> Scheme:
    if name not in ON_LOAD:
        raise QuantizationError(f"quantization={name!r} is not supported; use one of {sorted(ON_LOAD)} (or load a "
                                "compressed-tensors checkpoint as it is)")
    return ON_LOAD[name]


def quantizes_on_load(name: str, module: nn.Module, scheme: Scheme) -> bool:
    """The decoder's Linears (attention, MLP, per-layer inputs) and experts whose input width the group size divides;
    not the router (its scores pick the experts), nor the towers, embeddings or the LM head, which stay in the model
    dtype (a tied head is also quantized, for the logits only: `Gemma4.ready_`)."""
    if ".language_model." not in f".{name}" or ".router." in f"{name}.":
        return False
    if name.endswith(".experts"):
        widths = (module.gate_up_proj.shape[-1], module.down_proj.shape[-1])
    elif isinstance(module, Linear):
        widths = (module.in_features,)
    else:
        return False
    return all(width % (scheme.group_size or 1) == 0 for width in widths)


@torch.no_grad()
def quantize_model_(model: nn.Module, scheme: Scheme) -> nn.Module:
    """Every module `quantizes_on_load` chooses, quantized in place with `scheme` (min-max scales, as llm-compressor's
    default observer); the dense weights are freed one at a time.

    A tensor-parallel rank's model (distributed/sharding.py) is quantized part by part. Where a part holds only some
    of each row's inputs (row-parallel Linears; the experts' down_proj cut by width), per-channel scales take the
    row's maximum over the ranks (a collective: every rank quantizes at once), and groups lie within a part
    (check_shardable): each rank then holds its part of the whole matrix quantized, as one process would."""
    for name, module in list(model.named_modules()):
        if not quantizes_on_load(name, module, scheme):
            continue
        if name.endswith(".experts"):
            gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
            del module.gate_up_proj, module.down_proj  # parameters, replaced by modules
            width_cut = hasattr(module, "ranks") and not module.expert_parallel
            module.gate_up_proj = QuantizedLinear.of_weight(gate_up, scheme)
            module.down_proj = QuantizedLinear.of_weight(down, scheme,
                                                         module.ranks.all_reduce_max if width_cut else None)
        else:
            row_parallel = getattr(module, "sums_over_ranks", False)
            _replace(model, name, QuantizedLinear.of_weight(module.weight.detach(), scheme,
                                                            module.ranks.all_reduce_max if row_parallel else None))
    if hasattr(model, "head_scheme"):  # a tied head is quantized for the logits (Gemma4.ready_)
        model.head_scheme = scheme
    return model


# --- writing the compressed-tensors format ----------------------------------------------------------------------

def _format(scheme: Scheme) -> str:
    """What llm-compressor writes for the scheme: int weights packed in int32 (W4A16, W8A16), fp8 as fp8."""
    return "pack-quantized" if scheme.kind == "int" else "float-quantized"


def _checkpoint_tensors(weight, scheme: Scheme) -> dict[str, torch.Tensor]:
    """One quantized [N, K] matrix as the checkpoint's tensors (the inverse of stored_values / stored_scale)."""
    weight = weight.in_checkpoint_layout()
    values, (n, k) = weight.values, weight.shape
    if scheme.kind == "float":
        return {"weight": values.contiguous(), "weight_scale": weight.scale.contiguous()}
    if scheme.bits == 8:  # pack-quantized int8: 4 a word
        values = pack(values, 8)
    return {"weight_packed": values.contiguous(), "weight_scale": weight.scale.contiguous(),
            "weight_shape": torch.tensor([n, k], dtype=torch.int64)}


def compressed_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The model's tensors named as in a checkpoint (our names), quantized modules in the compressed-tensors format
    with experts split per expert, and the `quantization_config` that describes them (None: nothing quantized)."""
    state = model.state_dict()
    schemes: set[Scheme] = set()
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        del state[name + ".values"], state[name + ".scale"]
        schemes.add(module.scheme)
        weight = module.weight
        if weight.values.dim() == 2:
            state.update({f"{name}.{local}": t for local, t in _checkpoint_tensors(weight, module.scheme).items()})
            continue
        owner, projection = name.rsplit(".", 1)
        for e in range(weight.values.shape[0]):
            matrix = weight[e]
            if projection == "gate_up_proj":
                halves = matrix.shape[0] // 2
                parts = {"gate": _rows(matrix, 0, halves), "up": _rows(matrix, halves, 2 * halves)}
            else:
                parts = {"down": matrix}
            for part, piece in parts.items():
                state.update({f"{owner}.{e}.{part}_proj.{local}": t
                              for local, t in _checkpoint_tensors(piece, module.scheme).items()})
    kv_scales = next((m.k_scale for m in model.modules() if getattr(m, "k_scale", None) is not None), None)
    kv_cache_scheme = None if kv_scales is None else {  # the buffers' shapes say which: [1], or [Hkv, 1, 1]
        "type": "float", "num_bits": 8, "strategy": "tensor" if kv_scales.dim() == 1 else "attn_head",
        "symmetric": True, "dynamic": False}
    if not schemes:
        return state, None if kv_cache_scheme is None else {
            "quant_method": "compressed-tensors", "format": "dense", "quantization_status": "compressed",
            "config_groups": {}, "ignore": [], "kv_cache_scheme": kv_cache_scheme}
    if len(schemes) > 1:
        raise QuantizationError(f"saving several quantization schemes in one checkpoint is not supported: "
                                f"{sorted(s.name for s in schemes)}")
    (scheme,) = schemes
    ignore = sorted(name for name, module in model.named_modules()
                    if isinstance(module, nn.Linear) and not isinstance(module, QuantizedLinear))
    weights = {"type": scheme.kind, "num_bits": scheme.bits, "strategy": scheme.strategy, "symmetric": True,
               "dynamic": False, "group_size": scheme.group_size,
               "block_structure": list(scheme.block) if scheme.block else None}
    config = {"quant_method": "compressed-tensors", "format": _format(scheme), "quantization_status": "compressed",
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                            "output_activations": None, "format": _format(scheme)}},
              "ignore": [*ignore, "lm_head"], "kv_cache_scheme": kv_cache_scheme}
    return state, config


def _rows(weight, start: int, end: int):
    """Rows [start, end) of a quantized matrix: the scale rows follow (block scales: blocks of whole rows)."""
    from .model.quantized import QuantizedWeight
    rows = weight.scheme.block[0] if weight.scheme.strategy == "block" else 1
    if start % rows:
        raise QuantizationError(f"cannot split {weight.scheme.name} scales at row {start}")
    return QuantizedWeight(weight.values[start:end], weight.scale[start // rows:-(-end // rows)], weight.scheme)
