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

Weights are cut on `meta` before loading (`loading.load_model(shard=...)` then reads only this rank's slices from
safetensors) or in place on a loaded model: one plan (`ShardPlan.specs`) serves both.

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

from ..config import Config
from ..model.fused import Linear, QuantizedLinear, linear, product
from ..model.text import Experts, ScaledEmbedding


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

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Each rank's x [..., n] side by side: [..., N n], rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def check_shardable(config: Config, size: int, expert_parallel: bool = False) -> None:
    """ShardingError naming the first size that `size` ranks cannot split evenly."""
    if size < 1:
        raise ShardingError(f"tensor_parallel_size must be at least 1, got {size}")
    if size == 1:
        return
    text = config.text_config
    problems = []

    def need(value: int, what: str) -> None:
        if value % size:
            problems.append(f"{what} ({value})")

    need(text.num_attention_heads, "num_attention_heads")
    for kv in sorted(set(text.layer_num_kv_heads)):
        if kv % size and size % kv:
            problems.append(f"the {kv} KV heads of some layers (neither divisible by {size} nor dividing it)")
    for width in sorted({text.mlp_width(i) for i in range(text.num_hidden_layers)}):
        need(width, "the MLP width")
    need(text.vocab_size, "vocab_size")
    if text.hidden_size_per_layer_input:
        need(text.vocab_size_per_layer_input, "vocab_size_per_layer_input")
    if text.enable_moe_block:
        if expert_parallel:
            need(text.num_experts, "num_experts")
        else:
            need(text.moe_intermediate_size, "moe_intermediate_size (tensor-parallel experts; "
                                             "--enable-expert-parallel splits whole experts instead)")
    if problems:
        raise ShardingError(f"tensor_parallel_size={size} does not divide " + ", ".join(problems)
                            + f" of this model; use a size that does (1, 2, 4, ...)")
    if config.quantization_config is not None:
        raise ShardingError("tensor parallelism does not take quantized checkpoints yet")


class ShardPlan:
    """Which part of each weight rank `ranks.rank` holds: `specs(model)` maps a parameter name to
    (dim, [(start, stop), ...]), the ranges along `dim` concatenated in order (gate then up of a fused expert)."""

    def __init__(self, config: Config, ranks: Ranks, expert_parallel: bool = False):
        check_shardable(config, ranks.size, expert_parallel)
        self.config, self.ranks, self.expert_parallel = config, ranks, expert_parallel

    def part(self, total: int) -> tuple[int, int]:
        """This rank's even share of `total`."""
        n = total // self.ranks.size
        return self.ranks.rank * n, (self.ranks.rank + 1) * n

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """The KV heads this rank's query heads read: an even share, or the one head they share (replicated)."""
        size, rank = self.ranks.size, self.ranks.rank
        if num_kv_heads % size == 0:
            return self.part(num_kv_heads)
        head = rank // (size // num_kv_heads)
        return head, head + 1

    def specs(self, model: nn.Module) -> dict[str, tuple[int, list[tuple[int, int]]]]:
        text = self.config.text_config
        specs = {}
        prefix = "model.language_model."
        vocab = (0, [self.part(text.vocab_size)])
        specs[prefix + "embed_tokens.weight"] = vocab
        if getattr(model, "lm_head", None) is not None:
            specs["lm_head.weight"] = vocab
        if text.hidden_size_per_layer_input:
            specs[prefix + "embed_tokens_per_layer.weight"] = (0, [self.part(text.vocab_size_per_layer_input)])
        for i in range(text.num_hidden_layers):
            layer = f"{prefix}layers.{i}."
            dim = text.layer_head_dims[i]
            q0, q1 = self.part(text.num_attention_heads)
            specs[layer + "self_attn.q_proj.weight"] = (0, [(q0 * dim, q1 * dim)])
            specs[layer + "self_attn.o_proj.weight"] = (1, [(q0 * dim, q1 * dim)])
            if not text.is_kv_shared(i):
                k0, k1 = self.kv_heads(text.layer_num_kv_heads[i])
                specs[layer + "self_attn.k_proj.weight"] = (0, [(k0 * dim, k1 * dim)])
                if text.has_v_proj(i):
                    specs[layer + "self_attn.v_proj.weight"] = (0, [(k0 * dim, k1 * dim)])
            columns = (0, [self.part(text.mlp_width(i))])
            specs[layer + "mlp.gate_proj.weight"] = specs[layer + "mlp.up_proj.weight"] = columns
            specs[layer + "mlp.down_proj.weight"] = (1, columns[1])
            if text.enable_moe_block:
                if self.expert_parallel:
                    experts = (0, [self.part(text.num_experts)])
                    specs[layer + "experts.gate_up_proj"] = specs[layer + "experts.down_proj"] = experts
                else:
                    w = text.moe_intermediate_size
                    a, b = self.part(w)
                    specs[layer + "experts.gate_up_proj"] = (1, [(a, b), (w + a, w + b)])  # gate rows, up rows
                    specs[layer + "experts.down_proj"] = (2, [(a, b)])
        return specs

    def local_config(self) -> Config:
        """The config as this rank's modules see it: its query and KV heads (KV pools are sized from it)."""
        config = copy.deepcopy(self.config)
        text = config.text_config
        size = self.ranks.size
        text.layer_num_kv_heads = [max(kv // size, 1) for kv in text.layer_num_kv_heads]
        text.num_attention_heads //= size
        text.num_key_value_heads = max(text.num_key_value_heads // size, 1)
        if text.num_global_key_value_heads:
            text.num_global_key_value_heads = max(text.num_global_key_value_heads // size, 1)
        return config


def take(tensor: torch.Tensor, spec: tuple[int, list[tuple[int, int]]]) -> torch.Tensor:
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


class RowParallelLinear(Linear):
    """A Linear holding a slice of its input columns: each rank's product is a partial sum, all-reduced here.
    `sums_over_ranks` tells fused.add_normed_linear to take this forward (not a fused product + norms)."""
    sums_over_ranks = True
    ranks: Ranks

    def forward(self, x) -> torch.Tensor:
        y = linear(x, self.weight)
        self.ranks.all_reduce(y)
        return y if self.bias is None else y + self.bias  # the bias once, after the sum


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

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, combine: bool = True):
        if self.expert_parallel:
            local = experts - self.expert_start
            here = (local >= 0) & (local < self.gate_up_proj.shape[0])
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
    """Cut `model` (a Gemma4, on `meta` or loaded) to this rank's part in place and swap in the parallel modules;
    its config becomes the local one. With one rank, nothing changes."""
    ranks = plan.ranks
    if ranks.size == 1:
        return model
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ShardingError("tensor parallelism does not take quantized weights yet")
    text = model.model.language_model
    refuse = [name for name, module in model.named_modules() if getattr(module, "qkv_weight", None) is not None
              or getattr(module, "gate_up_weight", None) is not None]
    if refuse:  # the fused weight's row blocks are views of the per-projection weights being replaced
        raise ShardingError(f"shard the model before fuse_projections_ ({refuse[0]} is fused)")
    params = dict(model.named_parameters())
    for name, spec in plan.specs(model).items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        whole = params[name]
        setattr(module, attr, nn.Parameter(take(whole.detach(), spec), requires_grad=False))
    for module in _row_parallel(text):
        module.__class__ = RowParallelLinear
        module.ranks = ranks
    for table in [text.embed_tokens] + ([text.embed_tokens_per_layer] if text.ple_dim else []):
        table.__class__ = VocabParallelEmbedding
        table.ranks, table.vocab_start = ranks, ranks.rank * table.weight.shape[0]
    for layer in text.layers:
        if layer.enable_moe_block:
            layer.experts.__class__ = ParallelExperts
            layer.experts.ranks, layer.experts.expert_parallel = ranks, plan.expert_parallel
            layer.experts.expert_start = ranks.rank * layer.experts.gate_up_proj.shape[0] if plan.expert_parallel else 0
    for module in model.modules():  # nn.Linear's sizes follow the cut weights (Attention.project reads them)
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Embedding):
            module.num_embeddings = module.weight.shape[0]
    local = plan.local_config()
    for i, layer in enumerate(text.layers):
        layer.self_attn.num_heads = local.text_config.num_attention_heads
        layer.self_attn.num_kv_heads = local.text_config.layer_num_kv_heads[i]
    model.config = local
    text.config = local.text_config
    model.gather_vocabulary = ranks.all_gather_last  # Gemma4.logits: each rank's vocabulary rows, before the softcap
    model.ranks = ranks
    return model


def _row_parallel(text: nn.Module) -> list[Linear]:
    """The projections whose input columns are split: o_proj and the MLPs' down_proj."""
    return [m for layer in text.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
