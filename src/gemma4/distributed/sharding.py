"""Tensor and expert parallelism applied to a built model (gpt-fast style): the model code stays single-process, and
`shard_model_` swaps a few modules for their parallel twins below and cuts their weights to this rank's part.

What each rank holds, for N ranks (rank r):
- attention: query heads [r H/N, (r+1) H/N) (q_proj rows, o_proj columns); their KV heads: Hkv/N of them when N
  divides Hkv, else (N a multiple of Hkv) the one KV head those query heads read, replicated on N/Hkv ranks. o_proj
  is row parallel: each rank's product is a partial sum, all-reduced before the residual norms.
- dense MLPs: gate/up column parallel, down_proj row parallel (one all-reduce per MLP).
- MoE experts: `expert_parallel` E/N whole experts per rank (a token's choices held elsewhere weigh 0 here), else
  every expert's intermediate width cut by N (as a dense MLP); either way one all-reduce of the experts' sum. The
  router is replicated: every rank routes every token alike.
- embeddings: vocabulary parallel (V/N rows per rank: ids outside them give zero rows, all-reduced), the main table
  and the per-layer-embedding table alike; the tied LM head's logits are gathered over the vocabulary before the
  softcap (Gemma4.logits).
- everything else (norms, router, PLE projections, vision and audio towers) is replicated.
- a speculative-decoding drafter (model/assistant.py, `assistant_cut_specs`): its layers as the target's (their query
  heads with the KV heads this rank holds: they read the target's K/V from this rank's pools), a dense head
  vocabulary parallel, the clustered head whole.

Weights are cut on `meta` before loading (`loading.load_model(shard=...)` then reads only this rank's slices from
safetensors) or in place on a loaded model: one plan (`ShardPlan.specs`) serves both.

Quantized weights (model/quantized.py) are cut as their dense weight [..., N, K] would be (`quantized_spec`): a cut of
the output rows N cuts the values' and the scales' rows; a cut of the inputs K (row parallel) cuts the values at
K/N (int4 words hold 8 inputs: K/N a multiple of 8) and group scales at K/N / group (K/N a multiple of the group
size), while a per-channel scale, of the whole row, is replicated. `check_shardable` refuses a size that would split a
word, a group or a block, from config.json alone. Quantized on load (`quantization=`), each rank quantizes its part of
the dense weights: per-channel scales of a row-parallel part take the row's maximum over the ranks
(quantization.quantize_model_), so every rank holds its part of the whole matrix quantized, as one process would.

Numerics: a row-parallel product sums N partial sums of K/N terms each, then the all-reduce adds them in its own
order; against one process this reorders the sums, which moves fp32 logits (of magnitude ~2 on the tiny test models)
by 2e-6 to 1.1e-5 (tests/test_tensor_parallel.py asserts 1e-4). Vocabulary gathers and zero-row all-reduces are
exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import Config, TextConfig
from ..model.assistant import AssistantConfig
from ..model.fused import Linear, QuantizedLinear, linear, product, stored
from ..model.quantized import Scheme
from ..model.text import Experts, ScaledEmbedding
from .. import quantization as quantization_module

Spec = tuple[int, list[tuple[int, int]]]  # (dim, [(start, stop), ...]): ranges along dim, concatenated in order


class ShardingError(ValueError):
    """This model cannot be split over that many ranks (raised before any weight is read)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks that hold one model, and the group whose collectives join them."""
    rank: int
    size: int
    group: object = None  # a torch.distributed ProcessGroup (None: the default group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum over the ranks (in fp32, which holds any 16-bit float exactly; gloo has no bf16)."""
        wide = x.float()
        dist.all_reduce(wide, op=dist.ReduceOp.MAX, group=self.group)
        return wide.to(x.dtype)

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Each rank's x [..., n] side by side: [..., N n], rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def check_shardable(config: Config, size: int, expert_parallel: bool = False, quantization: str | None = None) -> None:
    """ShardingError naming the first size that `size` ranks cannot split evenly, or the first quantized weight whose
    cut would split a packed word, a scale group or a block: that of a compressed-tensors checkpoint (its
    quantization_config), or made on load with `quantization` ("fp8", "int8", "int4")."""
    if size < 1:
        raise ShardingError(f"tensor_parallel_size must be at least 1, got {size}")
    if size == 1:
        return
    text = config.text_config
    problems = _decoder_problems(text, size) + _undivided(size, text.vocab_size, "vocab_size")
    if text.hidden_size_per_layer_input:
        problems += _undivided(size, text.vocab_size_per_layer_input, "vocab_size_per_layer_input")
    if text.enable_moe_block:
        if expert_parallel:
            problems += _undivided(size, text.num_experts, "num_experts")
        else:
            problems += _undivided(size, text.moe_intermediate_size, "moe_intermediate_size (tensor-parallel "
                                   "experts; --enable-expert-parallel splits whole experts instead)")
    _refuse(problems, size, "this model")
    if config.quantization_config is None and quantization is None:
        return
    quantized = _quantized_weights(config, quantization)
    for rank in range(size):
        for name, spec in cut_specs(config, Ranks(rank, size), expert_parallel).items():
            if (found := quantized(name, spec, size)) is None:
                continue
            scheme, per_column = found
            ndim = 3 if ".experts." in f"{name}." else 2
            try:
                for kind in ("values", "scale"):
                    quantized_spec(spec, ndim, scheme, kind, per_column, name.removesuffix(".weight"))
            except ShardingError as e:
                hint = " (--enable-expert-parallel keeps whole experts)" if ".experts." in name + "." else ""
                raise ShardingError(f"tensor_parallel_size={size}: {e}{hint}") from None


def check_assistant_shardable(config: AssistantConfig, size: int) -> None:
    """ShardingError naming the sizes of a drafter (model/assistant.py) that `size` ranks cannot split as
    `assistant_cut_specs` cuts it: its query heads, the target KV heads they read, its MLP width and, for a dense
    head, the vocabulary."""
    if size == 1:
        return
    problems = _decoder_problems(config.text_config, size)
    if not config.use_ordered_embeddings:
        problems += _undivided(size, config.text_config.vocab_size, "vocab_size")
    _refuse(problems, size, "the drafter (--speculative-model)")


def _decoder_problems(text: TextConfig, size: int) -> list[str]:
    """What `size` ranks cannot split of a decoder's attention and dense MLPs (`_layer_specs`)."""
    problems = _undivided(size, text.num_attention_heads, "num_attention_heads")
    for kv in sorted(set(text.layer_num_kv_heads)):
        if kv % size and size % kv:
            problems.append(f"the {kv} KV heads of some layers (neither divisible by {size} nor dividing it)")
    for width in sorted({text.mlp_width(i) for i in range(text.num_hidden_layers)}):
        problems += _undivided(size, width, "the MLP width")
    return problems


def _undivided(size: int, value: int, what: str) -> list[str]:
    """["what (value)"] when `size` does not divide `value`, else []."""
    return [f"{what} ({value})"] if value % size else []


def _refuse(problems: list[str], size: int, whose: str) -> None:
    if problems:
        raise ShardingError(f"tensor_parallel_size={size} does not divide " + ", ".join(problems)
                            + f" of {whose}; use a size that does (1, 2, 4, ...)")


def _quantized_weights(config: Config, quantization: str | None):
    """A function (dense weight name, its cut, size) -> (Scheme, values per stored input column) of the weights that
    are stored quantized (compressed-tensors: the config group whose targets match, unless ignored) or quantized on
    load (quantization.quantizes_on_load's choice: every decoder projection whose K the group size divides), or None.
    Only the Linears' weights and the experts' matrices are: not embeddings, nor a calibrated KV cache's scales."""
    from ..loading import checkpoint_key

    checkpoint_scheme = config.quantization_config
    groups = quantization_module.parse_config(checkpoint_scheme) if checkpoint_scheme is not None else []
    ignore = (checkpoint_scheme or {}).get("ignore") or []
    on_load = quantization_module.on_load_scheme(quantization) if quantization else None

    def find(name: str, spec: Spec, size: int):
        if "embed_tokens" in name or not (name.endswith(".weight") or ".experts." in f"{name}."):
            return None
        module = name.removesuffix(".weight")
        if on_load is not None and ".language_model." in f".{module}":
            dim, ranges = spec
            experts = ".experts." in f"{module}."
            # The widths that quantizes_on_load needs the group size to divide (one process keeps the weight dense
            # otherwise, and so does each rank): the whole K of a cut along K (every rank's part is as long), and
            # the hidden size, the experts' other K.
            widths = ([sum(b - a for a, b in ranges) * size] if dim == (2 if experts else 1) else []) + \
                ([config.text_config.hidden_size] if experts else [])
            if all(width % (on_load.group_size or 1) == 0 for width in widths):
                return on_load, 8 if on_load.packed else 1
        if groups:
            owner, _, projection = module.rpartition(".")
            if owner.endswith(".experts"):  # stored per expert (llm-compressor's layout): expert 0 stands for all
                module = f"{owner}.0.{'down' if projection == 'down_proj' else 'gate'}_proj"
            key = checkpoint_key(module, config.layout)
            group = quantization_module.targeting(key, groups)
            if group is not None and not quantization_module.ignored(key, ignore):
                return group.scheme, 32 // group.scheme.bits if group.format == "pack-quantized" else 1
        return None

    return find


def quantized_spec(spec: Spec, ndim: int, scheme: Scheme, kind: str, per_column: int = 1,
                   name: str = "") -> Spec | None:
    """The part of a quantized matrix's `kind` tensor ("values" [..., N, K / per_column], or "scale"
    [..., *scheme.scale_shape(N, K)]) that holds the part `spec` of its dense weight [..., N, K] (`ndim` dims; leading
    ones: experts). None: the whole tensor (a per-channel scale of a cut along K: the row's, replicated). A
    ShardingError naming `name` where the cut would split a packed word, a scale group or a block."""
    dim, ranges = spec
    axis = dim - ndim  # -1: the inputs K, -2: the output rows N
    if axis == -1:
        if kind == "values":
            step, unit = per_column, f"word of {per_column} packed inputs"
        elif scheme.strategy == "channel":
            return None
        elif scheme.strategy == "group":
            step, unit = scheme.group_size, f"group of {scheme.group_size} inputs"
        else:
            step, unit = scheme.block[1], f"block of {scheme.block[1]} inputs"
    elif axis == -2 and kind == "scale" and scheme.strategy == "block":
        step, unit = scheme.block[0], f"block of {scheme.block[0]} rows"
    else:
        step = 1
    if cut := next((x for a, b in ranges for x in (a, b) if x % step), None):
        where = "input column" if axis == -1 else "row"
        raise ShardingError(f"the cut of {name} ({scheme.name}) at {where} {cut} splits a {unit}")
    return dim, [(a // step, b // step) for a, b in ranges]


def cut_specs(config: Config, ranks: Ranks, expert_parallel: bool) -> dict[str, Spec]:
    """Which part of each weight rank `ranks.rank` holds: dense parameter name -> (dim, [(start, stop), ...]), the
    ranges along `dim` concatenated in order (gate then up of a fused expert). A quantized weight is cut as its dense
    weight would be (`quantized_spec`)."""
    text = config.text_config
    specs = {}
    prefix = "model.language_model."
    per_head_kv_scales = quantization_module.kv_cache_strategy(config.quantization_config) == "attn_head"
    vocab = (0, [_share(text.vocab_size, ranks)])
    specs[prefix + "embed_tokens.weight"] = vocab
    if not text.tie_word_embeddings:
        specs["lm_head.weight"] = vocab
    if text.hidden_size_per_layer_input:
        specs[prefix + "embed_tokens_per_layer.weight"] = (0, [_share(text.vocab_size_per_layer_input, ranks)])
    for i in range(text.num_hidden_layers):
        layer = f"{prefix}layers.{i}."
        specs.update(_layer_specs(text, i, layer, ranks))
        if per_head_kv_scales and not text.is_kv_shared(i):  # a calibrated fp8 KV cache's scales of its heads
            specs[layer + "self_attn.k_scale"] = specs[layer + "self_attn.v_scale"] = \
                (0, [_kv_heads(text.layer_num_kv_heads[i], ranks)])  # [Hkv, 1, 1]
        if text.enable_moe_block:
            if expert_parallel:
                experts = (0, [_share(text.num_experts, ranks)])
                specs[layer + "experts.gate_up_proj"] = specs[layer + "experts.down_proj"] = experts
            else:
                w = text.moe_intermediate_size
                a, b = _share(w, ranks)
                specs[layer + "experts.gate_up_proj"] = (1, [(a, b), (w + a, w + b)])  # gate rows, up rows
                specs[layer + "experts.down_proj"] = (2, [(a, b)])
    return specs


def assistant_cut_specs(config: AssistantConfig, ranks: Ranks) -> dict[str, Spec]:
    """Which part of each weight of a drafter (model/assistant.py) rank `ranks.rank` holds, as `cut_specs` says for
    the target. Its layers read the target's K/V from this rank's pools, so each takes the target's rule: its query
    heads with the KV heads this rank holds; its MLPs column then row parallel. A dense head (31B, 26B-A4B
    drafters) is vocabulary parallel, as the target's tied head: it is the drafter's largest product. The clustered
    head (E2B, E4B) stays whole on every rank: it scores only the rows of the clusters it picks, which may lie
    anywhere in the vocabulary. Pre/post projections and norms are replicated."""
    text = config.text_config
    specs = {}
    for i in range(text.num_hidden_layers):
        specs.update(_layer_specs(text, i, f"model.layers.{i}.", ranks))
    if not config.use_ordered_embeddings:
        head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        specs[head] = (0, [_share(text.vocab_size, ranks)])
    return specs


def _share(total: int, ranks: Ranks) -> tuple[int, int]:
    """This rank's even share of `total`."""
    n = total // ranks.size
    return ranks.rank * n, (ranks.rank + 1) * n


def _kv_heads(num_kv_heads: int, ranks: Ranks) -> tuple[int, int]:
    """The KV heads this rank's query heads read: an even share, or the one head they share (replicated)."""
    if num_kv_heads % ranks.size == 0:
        return _share(num_kv_heads, ranks)
    head = ranks.rank // (ranks.size // num_kv_heads)
    return head, head + 1


def _layer_specs(text: TextConfig, i: int, layer: str, ranks: Ranks) -> dict[str, Spec]:
    """Decoder layer i's attention and dense MLP (parameters named `layer` + ...): the query heads of this rank
    (q_proj rows, o_proj columns), the KV heads they read where the layer computes its own, the MLP's columns."""
    dim = text.layer_head_dims[i]
    q0, q1 = _share(text.num_attention_heads, ranks)
    specs = {layer + "self_attn.q_proj.weight": (0, [(q0 * dim, q1 * dim)]),
             layer + "self_attn.o_proj.weight": (1, [(q0 * dim, q1 * dim)])}
    if not text.is_kv_shared(i):
        k0, k1 = _kv_heads(text.layer_num_kv_heads[i], ranks)
        specs[layer + "self_attn.k_proj.weight"] = (0, [(k0 * dim, k1 * dim)])
        if text.has_v_proj(i):
            specs[layer + "self_attn.v_proj.weight"] = (0, [(k0 * dim, k1 * dim)])
    columns = (0, [_share(text.mlp_width(i), ranks)])
    specs[layer + "mlp.gate_proj.weight"] = specs[layer + "mlp.up_proj.weight"] = columns
    specs[layer + "mlp.down_proj.weight"] = (1, columns[1])
    return specs


class ShardPlan:
    """Which part of each weight rank `ranks.rank` holds (`specs`), checked (`check_shardable`) when made."""

    def __init__(self, config: Config, ranks: Ranks, expert_parallel: bool = False):
        check_shardable(config, ranks.size, expert_parallel)
        self.config, self.ranks, self.expert_parallel = config, ranks, expert_parallel

    def specs(self) -> dict[str, Spec]:
        return cut_specs(self.config, self.ranks, self.expert_parallel)

    def local_config(self) -> Config:
        """The config as this rank's modules see it: its query and KV heads (KV pools are sized from it)."""
        config = copy.deepcopy(self.config)
        _local_heads_(config.text_config, self.ranks.size)
        return config


def _local_heads_(text: TextConfig, size: int) -> None:
    """`text` made as one rank's attention sees it: its query heads and KV heads (KV pools are sized from it)."""
    text.layer_num_kv_heads = [max(kv // size, 1) for kv in text.layer_num_kv_heads]
    text.num_attention_heads //= size
    text.num_key_value_heads = max(text.num_key_value_heads // size, 1)
    if text.num_global_key_value_heads:
        text.num_global_key_value_heads = max(text.num_global_key_value_heads // size, 1)


def take(tensor: torch.Tensor, spec: Spec) -> torch.Tensor:
    """The ranges of `spec` cut out of a whole tensor (meta tensors too: only the shape then)."""
    dim, ranges = spec
    parts = [tensor.narrow(dim, a, b - a) for a, b in ranges]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim)).contiguous()


def read_slice(piece, spec: tuple[int, list[tuple[int, int]]]) -> torch.Tensor:
    """The ranges of `spec` read from a safetensors slice (`safe_open(...).get_slice(key)`), in memory of their own:
    safetensors hands out views into the memory-mapped file, of which only the pages the copy touches are read (the
    rows of a row slice; a column slice touches each row's part)."""
    dim, ranges = spec
    parts = [piece[(slice(None),) * dim + (slice(a, b),)] for a, b in ranges]
    if len(parts) > 1:
        return torch.cat(parts, dim)
    return parts[0].clone(memory_format=torch.contiguous_format)


class RowParallel:
    """A Linear (dense or quantized) holding a slice of its input columns: each rank's product is a partial sum,
    all-reduced here. `sums_over_ranks` tells fused.add_normed_linear to take this forward (not a fused product +
    norms), and quantization.quantize_model_ that each row's scale is the whole row's."""
    sums_over_ranks = True
    ranks: Ranks

    def forward(self, x) -> torch.Tensor:
        y = linear(x, self.weight)
        self.ranks.all_reduce(y)
        return y if self.bias is None else y + self.bias  # the bias once, after the sum


class RowParallelLinear(RowParallel, Linear):
    pass


class RowParallelQuantizedLinear(RowParallel, QuantizedLinear):
    pass


def row_parallel_(module: Linear | QuantizedLinear, ranks: Ranks) -> RowParallel:
    """`module`, holding a slice of its input columns, made the row-parallel twin of its class."""
    module.__class__ = RowParallelQuantizedLinear if isinstance(module, QuantizedLinear) else RowParallelLinear
    module.ranks = ranks
    return module


class VocabParallelEmbedding(ScaledEmbedding):
    """A ScaledEmbedding holding rows [vocab_start, vocab_start + num_embeddings) of the table: other ids give zero
    rows here, and the all-reduce adds the one rank's row to zeros (exact)."""
    whole_vocabulary = False
    ranks: Ranks
    vocab_start: int

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < self.num_embeddings)
        rows = F.embedding(torch.where(inside, local, 0), self.weight)
        rows = rows * torch.tensor(self.scale, dtype=self.weight.dtype)
        return self.ranks.all_reduce(rows.masked_fill(~inside[..., None], 0))


class ParallelExperts(Experts):
    """Experts split over the ranks: whole experts [expert_start, expert_start + E/N) (`expert_parallel`), or every
    expert's intermediate width cut by N. Returns the all-reduced sum over the token's choices (never the unsummed
    pairs of the fused MoE tail, which must see the whole sum)."""
    ranks: Ranks
    expert_start: int = 0
    expert_parallel: bool = False

    @property
    def num_held(self) -> int:
        """The experts held here: E/N with expert parallelism, else all of them (dense or quantized)."""
        return self.weights()[0].shape[0]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, combine: bool = True):
        if self.expert_parallel:
            local = experts - self.expert_start
            here = (local >= 0) & (local < self.num_held)
            if x.device.type == "cpu" and self.path in ("auto", "loop"):
                y = self._local_loop(x, weights, local, here)
            else:  # choices held elsewhere run this rank's first expert with weight 0 (fixed shapes for the kernels)
                y = super().forward(x, weights.masked_fill(~here, 0), torch.where(here, local, 0))
        else:
            y = super().forward(x, weights, experts)
        return self.ranks.all_reduce(y)

    def _local_loop(self, x, weights, local, here):
        """forward_loop over the experts held here that some token chose."""
        out = torch.zeros_like(x)
        gate_up, down = self.weights()
        for expert in local[here].unique().tolist():
            token, choice = torch.where(local == expert)
            gate, up = product(x[token], gate_up[expert]).chunk(2, dim=-1)
            y = product(self.act(gate) * up, down[expert]) * weights[token, choice, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def shard_model_(model: nn.Module, plan: ShardPlan) -> nn.Module:
    """Cut `model` (a Gemma4, on `meta` or loaded, dense or quantized) to this rank's part in place and swap in the
    parallel modules; its config becomes the local one. Quantized weights are left in the checkpoint's layout (a
    loaded model's `ready_()` repacks them for the CPU again). With one rank, nothing changes."""
    ranks = plan.ranks
    if ranks.size == 1:
        return model
    text = model.model.language_model
    refuse = [name for name, module in model.named_modules() if getattr(module, "qkv_weight", None) is not None
              or getattr(module, "gate_up_weight", None) is not None]
    if refuse:  # the fused weight's row blocks are views of the per-projection weights being replaced
        raise ShardingError(f"shard the model before fuse_projections_ ({refuse[0]} is fused)")
    _cut_weights_(model, plan.specs())
    for table in [text.embed_tokens] + ([text.embed_tokens_per_layer] if text.ple_dim else []):
        table.__class__ = VocabParallelEmbedding
        table.ranks, table.vocab_start = ranks, ranks.rank * table.weight.shape[0]
    for layer in text.layers:
        if layer.enable_moe_block:
            layer.experts.__class__ = ParallelExperts
            layer.experts.ranks, layer.experts.expert_parallel = ranks, plan.expert_parallel
            layer.experts.expert_start = ranks.rank * layer.experts.num_held if plan.expert_parallel else 0
    local = plan.local_config()
    _parallel_layers_(text, local.text_config, ranks)
    model.config = local
    model.gather_vocabulary = ranks.all_gather_last  # Gemma4.logits: each rank's vocabulary rows, before the softcap
    model.quantized_head = None  # the whole vocabulary's: `ready_` quantizes this rank's rows again
    model.ranks = ranks
    return model


def shard_assistant_(drafter: nn.Module, ranks: Ranks) -> nn.Module:
    """Cut a drafter (model/assistant.py's Assistant, on `meta` or loaded) to this rank's part in place
    (`assistant_cut_specs`), as `shard_model_` cuts the target; its config becomes the local one. With one rank,
    nothing changes."""
    if ranks.size == 1:
        return drafter
    config = drafter.config
    check_assistant_shardable(config, ranks.size)
    _cut_weights_(drafter, assistant_cut_specs(config, ranks))
    local = copy.deepcopy(config)
    _local_heads_(local.text_config, ranks.size)
    _parallel_layers_(drafter.model, local.text_config, ranks)
    drafter.config = local
    if not config.use_ordered_embeddings:  # Assistant.forward: each rank's vocabulary rows of the dense head
        drafter.gather_vocabulary = ranks.all_gather_last
    return drafter


def _cut_weights_(model: nn.Module, specs: dict[str, Spec]) -> None:
    """Each weight named in `specs` cut to its part (dense, quantized, or a buffer), and the Linears' and
    Embeddings' sizes made to follow (Attention.project reads them)."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for name, spec in specs.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, QuantizedLinear):  # a Linear's weight, held quantized
            _cut_quantized_(module, spec, name)
        elif isinstance(getattr(module, attr), QuantizedLinear):  # the experts' gate_up_proj or down_proj
            _cut_quantized_(getattr(module, attr), spec, name)
        elif name in buffers:  # calibrated KV cache scales
            setattr(module, attr, take(buffers[name], spec))
        else:
            setattr(module, attr, nn.Parameter(take(params[name].detach(), spec), requires_grad=False))
    for module in model.modules():
        if isinstance(module, (nn.Linear, QuantizedLinear)):
            module.out_features, module.in_features = module.weight.shape[-2:]
        elif isinstance(module, nn.Embedding):
            module.num_embeddings = module.weight.shape[0]


def _parallel_layers_(text: nn.Module, local: TextConfig, ranks: Ranks) -> None:
    """A cut TextModel's layers made parallel: o_proj and down_proj sum over the ranks, each attention takes this
    rank's heads (`local`: the local text config, which the TextModel then holds)."""
    for module in _row_parallel(text):
        row_parallel_(module, ranks)
    for i, layer in enumerate(text.layers):
        layer.self_attn.num_heads = local.num_attention_heads
        layer.self_attn.num_kv_heads = local.layer_num_kv_heads[i]
    text.config = local


def _cut_quantized_(layer: QuantizedLinear, spec: Spec, name: str) -> None:
    """A quantized Linear (or the experts' holder) cut to the part `spec` of its dense weight, in the checkpoint's
    layout."""
    weight = layer.weight.in_checkpoint_layout()
    ndim = weight.values.dim()
    values_spec = quantized_spec(spec, ndim, weight.scheme, "values", 8 if weight.scheme.packed else 1, name)
    scale_spec = quantized_spec(spec, ndim, weight.scheme, "scale", name=name)
    layer.assign(take(stored(weight.values), values_spec),
                 weight.scale if scale_spec is None else take(weight.scale, scale_spec))


def _row_parallel(text: nn.Module) -> list[Linear | QuantizedLinear]:
    """The projections whose input columns are split: o_proj and the MLPs' down_proj."""
    return [m for layer in text.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
