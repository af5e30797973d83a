"""The Gemma 4 text decoder: one module for E2B, E4B, 26B-A4B and 31B, the variants being config switches.

Parameter names equal the checkpoint keys under `model.language_model.` (see loading.py for the one exception).
The products and residual norms go through fused.py, where each op's plain PyTorch twin and its CUDA kernels sit
behind one dispatch.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..config import FULL, SLIDING, TextConfig
from ..options import options
from .attention import ForwardContext, MaskRule
from .common import RMSNorm, activation, apply_rope
from .fused import (Beside, DeferredRouterInput, Linear, QuantizedLinear, add_normed_branches, add_normed_linear,
                    defers, dense, gated, gated_linear, linear, product, takes_gemv)
from .quantized import CPU_KERNEL_MAX_ROWS, NATIVE_INT4_INPUTS, QuantizedWeight, native_int4_reads


def rope_inverse_frequencies(head_dim: int, rope: dict) -> torch.Tensor:
    """Inverse frequencies, one per rotated pair (head_dim / 2 of them).

    "proportional" RoPE (global layers) rotates only the first `partial_rotary_factor` share of the pairs, but with
    the frequencies a full-width RoPE would give them (exponents over head_dim); the other pairs get frequency 0,
    i.e. they are not rotated at all."""
    theta = rope["rope_theta"]
    proportional = rope.get("rope_type", "default") == "proportional"
    rotated_pairs = int(rope.get("partial_rotary_factor", 1.0) * head_dim // 2) if proportional else head_dim // 2
    # Explicitly on the CPU: models are built under `torch.device("meta")`, and this table is derived, not loaded.
    exponents = torch.arange(0, 2 * rotated_pairs, 2, dtype=torch.float, device="cpu") / head_dim
    inv_freq = torch.zeros(head_dim // 2, device="cpu")
    inv_freq[:rotated_pairs] = 1.0 / theta**exponents
    return inv_freq / rope.get("factor", 1.0)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin [B, L, 1, head_dim] for rotate-half RoPE (pair i is dims i and i + head_dim/2)."""
    if kernels.enabled(positions):
        from ..kernels.step_inputs import rope_cos_sin as rope_kernel
        return rope_kernel(positions, inv_freq, dtype)
    angles = positions[..., None].float() * inv_freq  # [B, L, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.head_dim = config.layer_head_dims[layer_idx]
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.layer_num_kv_heads[layer_idx]
        self.is_kv_shared = config.is_kv_shared(layer_idx)
        self.kv_source = config.kv_source_layer[layer_idx]
        self.stores_shared_kv = config.kv_sharing_modes[layer_idx] == "store"
        hidden, bias, eps = config.hidden_size, config.attention_bias, config.rms_norm_eps
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, eps)
        if not self.is_kv_shared:  # KV-shared layers read their producer's K/V and own no K/V weights
            self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
            self.v_proj = (Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
                           if config.has_v_proj(layer_idx) else None)
            self.k_norm = RMSNorm(self.head_dim, eps)
            self.v_norm = RMSNorm(self.head_dim, eps, with_scale=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.register_buffer("qkv_weight", None, persistent=False)  # see fuse_projections_

    def fuse_projections_(self) -> None:
        """q, k and v in one matmul (k alone on K=V layers; nothing to fuse on KV-shared layers)."""
        if not self.is_kv_shared and self.q_proj.bias is None:
            projections = [self.q_proj, self.k_proj] + ([self.v_proj] if self.v_proj else [])
            set_fused(self, "qkv_weight", fuse_linears(projections))

    def project(self, x: torch.Tensor):
        """(q, k, v) of x: k and v None on KV-shared layers, v None on K=V layers."""
        if self.qkv_weight is not None:
            sizes = [p.out_features for p in (self.q_proj, self.k_proj, self.v_proj) if p is not None]
            q, k, *v = linear(x, self.qkv_weight).split(sizes, dim=-1)
            return q, k, v[0] if v else None
        if self.is_kv_shared:
            return self.q_proj(x), None, None
        return self.q_proj(x), self.k_proj(x), self.v_proj(x) if self.v_proj is not None else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext):
        batch, length, _ = x.shape
        cos, sin = rope
        q, k, v = self.project(x)
        if self.is_kv_shared:
            query = norm_rope(q.view(batch, length, -1, self.head_dim), self.q_norm, cos, sin)
            key, value, mask = ctx.shared_kv[self.kv_source]
        elif ctx.decode_kernel:  # one launch: the three norms, RoPE, and the new K/V written into the cache
            from ..kernels.norm import qkv_norm_rope_store
            key, value, slots = ctx.cache.write_target(self.layer_idx)  # then read in place, through `key_slots`
            query = qkv_norm_rope_store(q, k, v, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, cos, sin,
                                        key, value, slots)
            mask = None
        else:
            query = norm_rope(q.view(batch, length, -1, self.head_dim), self.q_norm, cos, sin)
            raw_key = k.view(batch, length, -1, self.head_dim)
            # K=V (global layers of 26B/31B): values are the raw key projection, before k_norm and RoPE.
            raw_value = v.view(batch, length, -1, self.head_dim) if v is not None else raw_key
            key = norm_rope(raw_key, self.k_norm, cos, sin)  # [B, Hkv, L, D]
            value = norm_rope(raw_value, self.v_norm)
            key, value, mask = ctx.keys_and_values(self.layer_idx, self.layer_type, key, value)
        if self.stores_shared_kv:
            ctx.shared_kv[self.layer_idx] = key, value, mask
        return ctx.attend(self.layer_type, query, key, value, mask)  # [B, L, H * D]: o_proj is the caller's


def norm_rope(x: torch.Tensor, norm: RMSNorm, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None):
    """Per-head RMSNorm then RoPE (when cos/sin are given): [B, L, heads, D] -> [B, heads, L, D]."""
    if kernels.enabled(x):
        from ..kernels.norm import qk_norm_rope
        return qk_norm_rope(x, norm.weight, norm.eps, cos, sin)
    if kernels.cpu_enabled(x) and x.is_contiguous():
        from ..kernels.cpu import norm_rope as norm_rope_kernel
        return norm_rope_kernel(x, norm.weight, norm.eps, cos, sin)
    x = norm(x)
    return (apply_rope(x, cos, sin) if cos is not None else x).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, hidden: int, width: int, act: str):
        super().__init__()
        self.gate_proj = Linear(hidden, width, bias=False)
        self.up_proj = Linear(hidden, width, bias=False)
        self.down_proj = Linear(width, hidden, bias=False)
        activation(act)  # an unknown name fails when the model is built, not at its first forward
        self.activation = act
        self.register_buffer("gate_up_weight", None, persistent=False)  # see fuse_projections_

    def fuse_projections_(self) -> None:
        """gate and up in one matmul."""
        set_fused(self, "gate_up_weight", fuse_linears([self.gate_proj, self.up_proj]))

    def forward(self, x):
        return self.down_proj(self.hidden(x))

    def hidden(self, x):
        """act(gate_proj(x)) * up_proj(x): the down projection's input."""
        if self.gate_up_weight is not None:
            return gated_linear(x, self.gate_up_weight, self.activation)
        return gated(self.gate_proj(x), self.up_proj(x), self.activation)


def set_fused(module: nn.Module, name: str, weight) -> None:
    """A fused weight into its slot: a tensor as the non-persistent buffer, a QuantizedWeight (not a tensor) as a
    plain attribute in its place."""
    if isinstance(weight, QuantizedWeight):
        module._buffers.pop(name, None)
    setattr(module, name, weight)


def fuse_linears(linears: list[nn.Linear]) -> torch.Tensor:
    """One [sum of outputs, inputs] weight whose row blocks become the linears' weights (views, no second copy):
    one matmul then serves them all, and each parameter keeps its name (its checkpoint key) and its values."""
    if any(isinstance(layer, QuantizedLinear) for layer in linears):  # all alike (one scheme), or not fused
        same = all(isinstance(layer, QuantizedLinear) and layer.scheme == linears[0].scheme for layer in linears)
        return QuantizedLinear.fuse(linears) if same else None
    fused = torch.cat([layer.weight.detach() for layer in linears])
    for layer, block in zip(linears, fused.split([layer.out_features for layer in linears])):
        layer.weight = nn.Parameter(block, requires_grad=False)
    return fused


class Router(nn.Module):
    """Chooses top-k experts per token: weightless RMSNorm, learned scale, fp32 softmax, top-k, renormalize,
    then a learned per-expert scale on the chosen weights."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.top_k = config.top_k_experts
        self.root_size = config.hidden_size**-0.5
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)
        self.proj = Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.route(self.scaled_input(x))

    def scaled_input(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.enabled(x):  # one launch (decode is launch-bound)
            from ..kernels.router import router_input
            return router_input(x, self.scale, self.root_size, self.norm.eps)
        return self.norm(x) * self.scale * self.root_size

    def routes_deferred(self, y: torch.Tensor) -> bool:
        """Whether `route` takes a DeferredRouterInput of the product y: the batch-1 routing GEMV, over rows it
        normalizes itself."""
        from ..kernels.gemv import NORMED_MAX_K
        return takes_gemv(y, self.proj.weight) and y.shape[-1] <= NORMED_MAX_K

    def route(self, scaled_input) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights fp32, experts) [T, k] from scaled_input(x) [..., H] (T rows), or a DeferredRouterInput
        (`routes_deferred`)."""
        if isinstance(scaled_input, DeferredRouterInput):
            from ..kernels.router import project_and_route
            y = scaled_input.y
            return project_and_route(y.reshape(-1, y.shape[-1]), self.proj.weight, self.per_expert_scale, self.top_k,
                                     attention_tail=scaled_input.kernel_args(self))
        scaled_input = scaled_input.reshape(-1, scaled_input.shape[-1])
        if takes_gemv(scaled_input, self.proj.weight):  # batch 1: the projection's GEMV kernel routes too
            from ..kernels.router import project_and_route
            return project_and_route(scaled_input, self.proj.weight, self.per_expert_scale, self.top_k)
        scores = self.proj(scaled_input)
        if kernels.enabled(scores):  # softmax, top-k, renormalization and per-expert scale in one launch
            from ..kernels.router import route
            return route(scores, self.per_expert_scale, self.top_k)
        probs = scores.softmax(dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[experts], experts  # [T, k] each


class Experts(nn.Module):
    """Expert weights as 3-D tensors: gate and up projections fused in `gate_up_proj`. A quantized model holds them
    as QuantizedLinear modules of one matrix per expert (quantization.py); `weights` gives either kind."""

    def __init__(self, config: TextConfig):
        super().__init__()
        e, h, w = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * w, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, w))
        self.activation = config.hidden_activation
        self.act = activation(config.hidden_activation)

    # "auto": on accelerators, for small batches (decode steps) the Triton kernel (else the gathered path), for
    # serving-sized batches the sorted-pairs kernels, and the grouped GEMM for large ones (prefill); the loop on the
    # CPU. "loop" / "gathered" / "grouped" / "kernel" / "sorted" force one (tests).
    path = "auto"
    GATHER_MAX_PAIRS = 64  # token x choice pairs: batch 8 x top-8
    # The decode kernels up to batch 7 x top-8, the sorted kernels up to batch 512: the crossovers that
    # benchmarks/moe_decode.py finds on 26B-A4B.
    KERNEL_MAX_PAIRS, SORTED_MAX_PAIRS = 56, 4096

    def weights(self) -> tuple[torch.Tensor | QuantizedWeight, torch.Tensor | QuantizedWeight]:
        """(gate_up_proj [E, 2W, H], down_proj [E, H, W]): tensors, or QuantizedWeights of a quantized model."""
        return tuple(w.weight if isinstance(w, QuantizedLinear) else w for w in (self.gate_up_proj, self.down_proj))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, combine: bool = True):
        """x [T, H]; weights, experts [T, k] -> [T, H]. `combine` False: the sorted and grouped kernel paths return
        the experts' rows per (token, choice) pair unsummed (kernels.moe.ExpertPairs), for the fused MoE tail."""
        path = self.path
        if path == "auto":
            pairs = experts.numel()
            if kernels.enabled(x) and pairs <= self.SORTED_MAX_PAIRS and self.kernels_read_weights():
                path = "kernel" if pairs <= self.KERNEL_MAX_PAIRS else "sorted"
            elif x.device.type == "cpu":
                path = "loop"
            elif pairs <= self.GATHER_MAX_PAIRS:
                path = "gathered"
            else:
                path = "grouped" if hasattr(torch, "_grouped_mm") else "loop"
        forward = getattr(self, f"forward_{path}")
        return forward(x, weights, experts, combine) if path in ("sorted", "grouped") else forward(x, weights, experts)

    def kernels_read_weights(self) -> bool:
        """Whether the Triton kernels take these weights (kernels.moe.experts_supported): dense, 8-bit with a scale
        per channel, or int4 in groups."""
        from ..kernels.moe import experts_supported
        return all(experts_supported(weight) is None for weight in self.weights())

    def forward_kernel(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Small batches on CUDA: a Triton kernel reads each chosen expert's weights in place, once."""
        from ..kernels.moe import moe_experts
        return moe_experts(x, weights, experts, *self.weights(), self.activation)

    def forward_sorted(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, combine: bool = True):
        """Serving-sized batches on CUDA: the pairs sorted by expert, each expert's weights read once for all its
        pairs (Triton; no host sync)."""
        from ..kernels.moe import sorted_experts
        return sorted_experts(x, weights, experts, *self.weights(), self.activation, combine)

    def forward_grouped(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, combine: bool = True):
        """Large batches: sort the (token, choice) pairs by expert, then one grouped GEMM per projection runs every
        expert on its own rows (each expert's weights read once; no host sync)."""
        k = experts.shape[1]
        chosen = experts.reshape(-1)
        order = chosen.argsort(stable=True)  # pairs grouped by expert
        token = order // k
        gate_up, down = (dense(w, x.dtype) for w in self.weights())
        # Pairs per expert, counted without bincount (whose output size needs a host sync: no CUDA graphs).
        counts = torch.zeros(gate_up.shape[0], dtype=torch.int32, device=x.device)
        ends = counts.index_add_(0, chosen, torch.ones_like(chosen, dtype=torch.int32)).cumsum(0, dtype=torch.int32)

        def grouped(rows, weight):  # rows [P, in] @ weight[e].T for each expert's slice of rows
            return torch._grouped_mm(rows, weight.transpose(1, 2), offs=ends)

        gate, up = grouped(x[token], gate_up).chunk(2, dim=-1)
        y = grouped(gated(gate, up, self.activation), down)  # [T*k, H], pairs in expert order
        if kernels.enabled(x):  # the weighting, the reordering and the sum below in one kernel
            from ..kernels.moe import combine_pairs
            return combine_pairs(y, order, weights, combine)
        y = (y * weights.reshape(-1)[order, None]).to(x.dtype)
        # Back to token-major order (pair t*k + j), then each token's k outputs summed: a scatter without atomics
        # (index_add_ into the model dtype was slow and summed in a nondeterministic order).
        pairs = torch.empty_like(y).index_copy_(0, order, y)
        return pairs.view(-1, k, x.shape[-1]).sum(dim=1)

    def forward_gathered(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """No host syncs and fixed shapes (CUDA-graph friendly): gather each (token, choice)'s expert weights and
        run them as a batch of matrix-vector products. Costs T*k expert copies, so only for small T."""
        tokens, k = experts.shape
        chosen = experts.reshape(-1)  # token-major, as weights.reshape(-1)
        inputs = x.repeat_interleave(k, dim=0)[:, :, None]  # [T*k, H, 1]
        gate_up, down = self.weights()
        gate, up = torch.bmm(dense(gate_up[chosen], x.dtype), inputs)[..., 0].chunk(2, dim=-1)
        y = torch.bmm(dense(down[chosen], x.dtype), (self.act(gate) * up)[:, :, None])[..., 0]  # [T*k, H]
        y = y * weights.reshape(-1, 1)
        return y.view(tokens, k, -1).sum(dim=1).to(x.dtype)

    def forward_loop(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Reference path: loop over the experts that were chosen (one host sync for the list of experts)."""
        out = torch.zeros_like(x)
        gate_up, down = self.weights()
        for expert in experts.unique().tolist():
            token, choice = torch.where(experts == expert)
            gate, up = product(x[token], gate_up[expert]).chunk(2, dim=-1)
            y = product(self.act(gate) * up, down[expert]) * weights[token, choice, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(hidden, config.mlp_width(layer_idx), config.hidden_activation)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)
        self.register_buffer("layer_scalar", torch.ones(1))
        self.enable_moe_block = config.enable_moe_block
        if self.enable_moe_block:  # 26B-A4B: a 128-expert MoE beside the dense MLP, in every layer
            self.router = Router(config)
            self.experts = Experts(config)
            self.pre_feedforward_layernorm_2 = RMSNorm(hidden, eps)
            self.post_feedforward_layernorm_1 = RMSNorm(hidden, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(hidden, eps)
        self.has_per_layer_input = bool(config.hidden_size_per_layer_input)
        if self.has_per_layer_input:  # E2B/E4B: a gated residual from this layer's slice of the PLE
            ple = config.hidden_size_per_layer_input
            self.activation = config.hidden_activation
            self.per_layer_input_gate = Linear(hidden, ple, bias=False)
            self.per_layer_projection = Linear(ple, hidden, bias=False)
            self.post_per_layer_input_norm = RMSNorm(hidden, eps)

    def forward(self, x, h, rope, ctx: ForwardContext, per_layer_input: torch.Tensor | None = None,
                next_norm: RMSNorm | None = None, defer_next: bool = False):
        """x: the residual stream, h: input_layernorm(x). Returns the new residual stream and `next_norm` of it (the
        next layer's input norm, or the final norm; None without one), computed by this layer's last kernel on CUDA.
        At batch 1 each projection that feeds a residual add runs in one kernel with the norms after it, or leaves
        them to the GEMV that reads them (DeferredNorms: inside the layer; at its end if `defer_next`, and h is then
        that)."""
        attn = self.self_attn(h, rope, ctx)
        # Without PLE the feed-forward's residual add ends the layer: it applies the layer scalar and next_norm.
        tail = {} if self.has_per_layer_input else dict(scalar=self.layer_scalar, next_norm=next_norm)
        if self.enable_moe_block:
            x, h = self.moe_feedforward(x, attn, **tail)
        else:
            # x += post_attention_layernorm(o_proj(attn)); h = pre_feedforward_layernorm(x)
            x, h = add_normed_linear(x, attn, self.self_attn.o_proj, self.post_attention_layernorm,
                                     next_norm=self.pre_feedforward_layernorm, defer=defers("o_proj"))
            # x += post_feedforward_layernorm(mlp(h))  [then * layer_scalar and next_norm, without PLE]
            x, h = add_normed_linear(x, self.mlp.hidden(h), self.mlp.down_proj, self.post_feedforward_layernorm,
                                     **tail, defer=defers("down_proj") and (self.has_per_layer_input or defer_next))
        if not self.has_per_layer_input:
            return x, h
        # E2B/E4B: x = (x + post_per_layer_input_norm(per_layer_projection(act(per_layer_input_gate(x)) *
        # per_layer_input))) * layer_scalar. h is None here, or x deferred to the gate's GEMV (no norm after the add).
        ple = gated_linear(h if h is not None else x, self.per_layer_input_gate.weight, self.activation,
                           per_layer_input)
        return add_normed_linear(x, ple, self.per_layer_projection, self.post_per_layer_input_norm,
                                 scalar=self.layer_scalar, next_norm=next_norm,
                                 defer=defers("per_layer_projection") and defer_next)

    def cpu_decode_operands(self, next_norm: RMSNorm) -> tuple | None:
        """(kernels.cpu.DecodeLayer, the tensors it points to) for a CPU decode step, or None where the C layer does
        not compute this one as `forward` does: experts, weights not int4 in the native kernel's layout (q/k/v and
        gate/up fused), a tensor-parallel shard, another activation, norms of other dtypes or epsilons."""
        from ..kernels import cpu
        attn, mlp, ple = self.self_attn, self.mlp, self.has_per_layer_input
        products = {"qkv": attn.q_proj.weight if attn.is_kv_shared else attn.qkv_weight, "o": attn.o_proj.weight,
                    "gate_up": mlp.gate_up_weight, "down": mlp.down_proj.weight}
        norms = {"q_norm": attn.q_norm, "post_attention_norm": self.post_attention_layernorm,
                 "pre_feedforward_norm": self.pre_feedforward_layernorm,
                 "post_feedforward_norm": self.post_feedforward_layernorm, "next_norm": next_norm}
        if not attn.is_kv_shared:
            norms["k_norm"] = attn.k_norm
        if ple:
            products.update(ple_gate=self.per_layer_input_gate.weight, ple_projection=self.per_layer_projection.weight)
            norms["post_ple_norm"] = self.post_per_layer_input_norm
        operands = {name: cpu.int4_operands(w.values, w.scale, w.scheme.group_size, w.chunk)
                    if isinstance(w, QuantizedWeight) and native_int4_reads(w) else None
                    for name, w in products.items()}
        weights = [norm.weight for norm in norms.values()] + [self.layer_scalar]
        if (self.enable_moe_block or None in operands.values()
                or {mlp.activation, self.activation if ple else mlp.activation} != {"gelu_pytorch_tanh"}
                or len({norm.eps for norm in norms.values()}) != 1 or len({w.dtype for w in weights}) != 1
                or weights[0].dtype not in cpu.DTYPES or not all(w.is_contiguous() for w in weights)
                or any(getattr(m, "sums_over_ranks", False) for m in (attn.o_proj, mlp.down_proj))):
            return None
        layer = cpu.DecodeLayer(
            **operands, **{name: norm.weight.data_ptr() for name, norm in norms.items()},
            scalar=self.layer_scalar.data_ptr(), norm_dtype=cpu.DTYPES[weights[0].dtype], eps=attn.q_norm.eps,
            index=attn.layer_idx, kv_source=attn.kv_source, full=int(attn.layer_type != SLIDING),
            heads=attn.num_heads, kv_heads=attn.num_kv_heads, head_dim=attn.head_dim, width=mlp.down_proj.in_features,
            ple_dim=self.per_layer_projection.in_features if ple else 0, writes_kv=int(not attn.is_kv_shared),
            has_value=int(not attn.is_kv_shared and attn.v_proj is not None), has_ple=int(ple))
        return layer, (*products.values(), *weights)

    def moe_feedforward(self, x, attn, scalar: torch.Tensor | None = None, next_norm: RMSNorm | None = None):
        """26B-A4B: the attention's residual add, then the dense MLP and the experts side by side, their branch norms
        summed into the second residual add. The router and the experts read the residual stream, not the dense
        MLP's input norm. With o_proj's norms deferred (batch 1), no kernel of their own: the dense MLP's first GEMV
        writes the new residual stream, the routing GEMV the experts' input."""
        x, h, expert_input, router_input = add_normed_linear(
            x, attn, self.self_attn.o_proj, self.post_attention_layernorm, next_norm=self.pre_feedforward_layernorm,
            moe=(self.pre_feedforward_layernorm_2, self.router), defer=defers("o_proj"))
        # The dense MLP on a stream of its own, beside the router and the experts (not for a tensor-parallel shard:
        # every rank must run its all-reduces in one order), joined before the fused tail.
        with Beside(x, enabled=not getattr(self.mlp.down_proj, "sums_over_ranks", False)) as dense_branch:
            dense = self.mlp(h)
        hidden = x.shape[-1]
        weights, experts = self.router.route(router_input)
        sparse = self.experts(expert_input.reshape(-1, hidden), weights, experts, combine=False)  # summed in the tail
        if isinstance(sparse, torch.Tensor):
            sparse = sparse.reshape(x.shape)
        dense_branch.join()
        return add_normed_branches(x, dense, sparse, self.post_feedforward_layernorm_1,
                                   self.post_feedforward_layernorm_2, self.post_feedforward_layernorm, scalar,
                                   next_norm)


class ScaledEmbedding(nn.Embedding):
    """Embedding multiplied by sqrt(width). The factor is rounded to the weight dtype first, as in the reference
    (in bf16, sqrt(1536) = 39.19 becomes 39.25)."""
    whole_vocabulary = True  # False: a tensor-parallel shard of the rows (distributed/), which the kernels cannot read

    def __init__(self, num: int, dim: int, scale: float):
        super().__init__(num, dim)
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if kernels.enabled(self.weight) and self.whole_vocabulary:
            from ..kernels.step_inputs import scaled_embedding
            return scaled_embedding(ids, self.weight, self.rounded_scale())
        return super().forward(ids) * torch.tensor(self.scale, dtype=self.weight.dtype)

    def rounded_scale(self) -> float:
        """The factor forward multiplies by: sqrt(width) as a value of the weight dtype."""
        return float(torch.tensor(self.scale, dtype=self.weight.dtype))


class TextModel(nn.Module):
    """Embeddings, decoder layers and final norm; `Model` adds the tied LM head and the logit softcap."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = ScaledEmbedding(config.vocab_size, config.hidden_size, config.hidden_size**0.5)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ple_dim = config.hidden_size_per_layer_input
        if self.ple_dim:
            # Per-Layer Embeddings: one packed table holding a `ple_dim` slice for every layer.
            layers_x_ple = config.num_hidden_layers * self.ple_dim
            self.embed_tokens_per_layer = ScaledEmbedding(config.vocab_size_per_layer_input, layers_x_ple,
                                                          self.ple_dim**0.5)
            self.per_layer_model_projection = Linear(config.hidden_size, layers_x_ple, bias=False)
            self.per_layer_projection_norm = RMSNorm(self.ple_dim, config.rms_norm_eps)
        self.inv_freq = {layer_type: rope_inverse_frequencies(
            config.layer_head_dims[config.layer_types.index(layer_type)], config.rope_parameters[layer_type])
            for layer_type in set(config.layer_types)}
        self._cpu_decode_layers = None  # (DecodeLayer array, the tensors it points to), built on first use

    def _apply(self, fn, recurse=True):  # .to(), .half(), ...: the C layers' addresses are stale
        self._cpu_decode_layers = None
        return super()._apply(fn, recurse)

    def cpu_decode_layers(self):
        """Every layer's kernels.cpu.DecodeLayer as an array, or None where a layer is not taken. Built on first use
        (it holds the weights' addresses, and the tensors): Gemma4.ready_ and moves or casts (`_apply`) drop it."""
        if self._cpu_decode_layers is None:
            next_norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
            layers = [layer.cpu_decode_operands(next_norm) for layer, next_norm in zip(self.layers, next_norms)]
            array = None
            if all(layer is not None for layer in layers):
                from ..kernels import cpu
                array = (cpu.DecodeLayer * len(layers))(*(layer for layer, _ in layers))
            self._cpu_decode_layers = (array, [tensors for _, tensors in filter(None, layers)])
        return self._cpu_decode_layers[0]

    def decodes_on_cpu(self, embeds: torch.Tensor, cache) -> bool:
        """Whether this forward, one token per row of `embeds` over `cache`, runs as one C call (`decode_on_cpu`)."""
        rows, length, _ = embeds.shape
        return (options().cpu_decode_layers and cache is not None and length == 1 and rows <= CPU_KERNEL_MAX_ROWS
                and embeds.dtype in NATIVE_INT4_INPUTS and kernels.cpu_enabled(embeds)
                and cache.pools.pool_dtype == embeds.dtype and self.cpu_decode_layers() is not None)

    def per_layer_inputs(self, ple_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """[B, L, layers, ple_dim]: the token's own PLE slice plus a projection of its main embedding.

        Both halves are RMS-scale quantities; their sum is scaled by 1/sqrt(2) to keep that scale."""
        batch, length = ple_ids.shape
        table, norm = self.embed_tokens_per_layer, self.per_layer_projection_norm
        if kernels.enabled(embeds) and table.whole_vocabulary:  # the gather, the scales, the norm, the sum: one launch
            from ..kernels.step_inputs import per_layer_inputs
            return per_layer_inputs(self.per_layer_model_projection(embeds), ple_ids, table.weight, norm.weight,
                                    norm.eps, self.config.hidden_size**-0.5, table.rounded_scale())
        token_part = table(ple_ids).view(batch, length, -1, self.ple_dim)
        context_part = self.per_layer_model_projection(embeds) * self.config.hidden_size**-0.5
        context_part = norm(context_part.view(batch, length, -1, self.ple_dim))
        return (context_part + token_part) * 2.0**-0.5

    def forward(self, embeds: torch.Tensor, ctx: ForwardContext, ple_ids: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """embeds [B, L, H] (already scaled; images merged in) -> final hidden states [B, L, H].

        `ple_ids`: the token ids used for the per-layer embedding lookup (multimodal positions hold the pad id).
        `last_only`: return only the last position; KV-shared layers then run on that position alone, since no later
        layer reads their keys."""
        per_layer = self.per_layer_inputs(ple_ids, embeds) if self.ple_dim else None
        if next(iter(self.inv_freq.values())).device != embeds.device:  # once per device, not per forward
            self.inv_freq = {t: f.to(embeds.device) for t, f in self.inv_freq.items()}
        ropes = {t: rope_cos_sin(ctx.positions, f, embeds.dtype) for t, f in self.inv_freq.items()}
        if ctx.cpu_decode:
            return self.decode_on_cpu(embeds, ctx, per_layer, ropes)
        first_shared = self.config.num_hidden_layers - self.config.num_kv_shared_layers
        # Each layer also returns the next one's input norm of its output (the last one: the final norm).
        x, h = embeds, self.layers[0].input_layernorm(embeds)
        next_norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        for i, (layer, next_norm) in enumerate(zip(self.layers, next_norms)):
            if last_only and i == first_shared and x.shape[1] > 1:
                x, h, ropes, per_layer, ctx = _last_position_only(x, h, ropes, per_layer, ctx)
            layer_input = per_layer[:, :, i] if per_layer is not None else None
            # the final norm's reader is the LM head: too many programs to each normalize the row
            x, h = layer(x, h, ropes[layer.self_attn.layer_type], ctx, layer_input, next_norm,
                         defer_next=next_norm is not self.norm)
        return h[:, -1:] if last_only else h

    def decode_on_cpu(self, embeds: torch.Tensor, ctx: ForwardContext, per_layer: torch.Tensor | None,
                      ropes: dict) -> torch.Tensor:
        """`forward` of a decode step as one C call (kernels.cpu.decode_layers): the layers write their new K/V into
        the cache's pools and attend there in place (the cache's in-place plan, begun so by Gemma4.forward)."""
        from ..kernels import cpu
        cache, rows = ctx.cache, embeds.shape[0]
        x = embeds.reshape(rows, -1).clone()
        h = self.layers[0].input_layernorm(x)
        if per_layer is not None:
            per_layer = per_layer.reshape(rows, *per_layer.shape[2:]).contiguous()

        def kind(layer_type: str) -> int:  # the C side's layer type: 0 sliding, 1 global
            return int(layer_type != SLIDING)

        def int64(t: torch.Tensor) -> torch.Tensor:
            return t.to(torch.int64).contiguous()

        steps = {kind(t): (int64(cache.write_target(self.config.layer_types.index(t))[2]), int64(cache.key_slots(t)),
                           int64(cache.key_positions(t))) for t in self.inv_freq}
        rope_rows = {kind(t): tuple(c.reshape(rows, -1).contiguous() for c in cos_sin) for t, cos_sin in ropes.items()}
        pools = cache.pools
        layers = range(self.config.num_hidden_layers)
        cpu.decode_layers(self.cpu_decode_layers(), x, h, per_layer, rope_rows, steps,
                          ([pools.keys.get(i) for i in layers], [pools.values.get(i) for i in layers]),
                          int64(torch.where(ctx.valid, ctx.positions, -1)[:, 0]), int64(cache.num_keys(FULL)),
                          self.config.sliding_window)
        return h.view_as(embeds)


def _last_position_only(x, h, ropes, per_layer, ctx: ForwardContext):
    """Cut a forward down to its last position before the KV-shared layers (their K/V come from earlier layers)."""
    ctx.positions, ctx.valid = ctx.positions[:, -1:], ctx.valid[:, -1:]
    ctx.masks = {}
    ctx.shared_kv = {i: (k, v, m.last_query_only() if isinstance(m, MaskRule) else m[:, :, -1:])
                     for i, (k, v, m) in ctx.shared_kv.items()}
    ropes = {t: (cos[:, -1:], sin[:, -1:]) for t, (cos, sin) in ropes.items()}
    per_layer = per_layer[:, -1:] if per_layer is not None else None
    return x[:, -1:], h[:, -1:], ropes, per_layer, ctx

