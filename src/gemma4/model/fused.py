"""How the decoder's products and residual norms run: each function here is one op's single dispatch point, its plain
PyTorch twin and, on CUDA, the Triton kernel that fuses it (kernels/).

At batch 1 a projection that feeds a residual add runs in one GEMV kernel with the norms after it
(`add_normed_linear`), or leaves them to the next GEMV, which applies them to its own input (`DeferredNorms`): the
next layer's input norm is computed by this layer's last kernel (`next_norm`).
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels import counters
from ..options import options
from .common import RMSNorm, activation
from .pages import page_out
from .quantized import (CPU_KERNEL_MAX_ROWS, QuantizedWeight, Scheme, cpu_int4_chunk, cpu_int4_supported, cpu_linear,
                        fp8_activations_reads, native_int4, quantize, scaled_linear, to_chunks, to_cpu_int4)

if TYPE_CHECKING:
    from .text import Router


def takes_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight.T runs in the Triton GEMV kernels (kernels/gemv.py): one row on CUDA (a batch-1 decode step),
    and a weight where they beat cuBLAS (benchmarks/gemv.py): every projection of E2B, E4B and 26B-A4B and the LM heads
    with K <= 4096; cuBLAS reads 31B's matrices of over 64M elements, and its LM head (K = 5376), faster. Quantized
    weights of every size and format the kernels read (`kernels.gemv.quantized_supported`): the alternative is the
    dequantizing twin."""
    if isinstance(weight, QuantizedWeight):
        if not (x.numel() == x.shape[-1] and kernels.enabled(x)):
            return False
        from ..kernels.gemv import quantized_supported
        return quantized_supported(weight) is None
    n_out, k_in = weight.shape
    return (x.numel() == x.shape[-1] and (k_in <= 4096 or n_out * k_in <= 64 * 2**20) and weight.stride(-1) == 1
            and kernels.enabled(x))


def linear(x, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias, through the GEMV kernel where `takes_gemv`. x: a tensor or DeferredNorms."""
    row, norms = gemv_operands(x)
    if takes_gemv(row, weight):
        from ..kernels.gemv import gemv
        return gemv(row, weight, norms=norms)
    return product(materialized(x), weight)


def product(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), or a QuantizedWeight's product (quantized linears have no bias): on CUDA, for up to
    a few hundred rows (serving steps), a kernel that dequantizes the weight's tiles in registers; on the CPU, for a
    few rows (decode steps), PyTorch's weight-only int8 / int4 kernels (model/quantized.py `cpu_linear`); else
    (prefill, other formats) the dequantized weight and F.linear."""
    if not isinstance(weight, QuantizedWeight):
        return F.linear(x, weight, bias)
    if options().fp8_activations and x.numel() > x.shape[-1] and fp8_activations_reads(weight):
        if kernels.enabled(x):
            from ..kernels.quantized_matmul import fp8_rows
            return scaled_linear(x, weight, fp8_rows)
        return scaled_linear(x, weight)
    if kernels.enabled(x):
        from ..kernels.quantized_matmul import max_rows, quantized_matmul, quantized_matmul_supported
        if x.numel() // x.shape[-1] <= max_rows(x.device, weight) and quantized_matmul_supported(weight) is None:
            return quantized_matmul(x, weight)
    elif x.device.type == "cpu" and options().kernels and x.numel() // x.shape[-1] <= CPU_KERNEL_MAX_ROWS:
        out = cpu_linear(x, weight)
        if out is not None:
            return out
    return F.linear(x, dense(weight, x.dtype))


def dense(weight, dtype: torch.dtype) -> torch.Tensor:
    """A weight as a tensor of `dtype`: a QuantizedWeight dequantized (on CUDA in one kernel pass where it reads the
    format: kernels/quantized_matmul.py `dequantize`, the same bits), a tensor as it is."""
    if not isinstance(weight, QuantizedWeight):
        return weight
    if kernels.enabled(weight.values):
        from ..kernels.quantized_matmul import dequantize, dequantize_supported
        if dequantize_supported(weight) is None:
            return dequantize(weight, dtype)
    return weight.dequantize(dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint keys) whose bias-free products go through `linear`."""

    def forward(self, x) -> torch.Tensor:
        return linear(x, self.weight) if self.bias is None else super().forward(materialized(x))


class QuantizedLinear(nn.Module):
    """A bias-free Linear holding its weight quantized (model/quantized.py): buffers `values` (int32 words of int4,
    int8, or fp8 bits as uint8, so that a dtype cast of the model leaves them alone) and `scale`; `weight` is the
    QuantizedWeight that the dispatch points take. With `leading` (experts: (E,)) it holds one matrix per expert and
    is not called itself."""
    bias = None

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, scale_dtype=torch.bfloat16,
                 leading: tuple[int, ...] = (), device=None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        width = in_features // 8 if scheme.packed else in_features
        dtype = torch.int32 if scheme.packed else torch.int8 if scheme.kind == "int" else torch.uint8
        self.register_buffer("values", torch.empty(*leading, out_features, width, dtype=dtype, device=device))
        self.register_buffer("scale", torch.empty(*leading, *scheme.scale_shape(out_features, in_features),
                                                  dtype=scale_dtype, device=device))
        # to_cpu_int4's (scale, 0) pairs once `for_cpu_` repacked the values: derived, not a checkpoint tensor
        self.register_buffer("cpu_scales_and_zeros", None, persistent=False)
        self.chunk = 0  # > 0 once `for_cpu_` stored the values chunk by chunk (QuantizedWeight.chunk)

    @classmethod
    def of_weight(cls, weight: torch.Tensor, scheme: Scheme, whole_rows=None) -> QuantizedLinear:
        """A dense weight [..., N, K] quantized with `scheme` (quantize-on-load); `whole_rows`: see `quantize`."""
        quantized = quantize(weight, scheme, whole_rows=whole_rows)
        *leading, n, k = weight.shape
        return cls(k, n, scheme, leading=tuple(leading), device="meta").assign(stored(quantized.values),
                                                                               quantized.scale)

    @property
    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(as_values(self.values, self.scheme), self.scale, self.scheme, self.cpu_scales_and_zeros,
                               self.chunk)

    def for_cpu_(self) -> QuantizedLinear:
        """int4 values repacked for the CPU's int4 kernels, in place of the checkpoint's layout (no second copy):
        PyTorch's layout where the native kernel is not built, else, for a wide K, stored chunk by chunk."""
        weight = self.weight
        if self.cpu_scales_and_zeros is not None or self.chunk or weight.values.device.type != "cpu":
            return self
        if cpu_int4_supported(weight):
            repacked = to_cpu_int4(weight)
            self.values, self.scale, self.cpu_scales_and_zeros = (repacked.values, repacked.scale,
                                                                  repacked.cpu_scales_and_zeros)
        elif native_int4(self.scheme) and cpu_int4_chunk(weight):
            self.chunk = cpu_int4_chunk(weight)
            self.values = to_chunks(weight.values, self.chunk)
        else:
            return self
        page_out(weight.values)  # the checkpoint's words, where they are a memory-mapped file's pages
        return self

    def forward(self, x) -> torch.Tensor:
        return linear(x, self.weight)

    @staticmethod
    def fuse(layers: list[QuantizedLinear]) -> QuantizedWeight | None:
        """fuse_linears for quantized layers: values and scales concatenated by rows, each layer's buffers views of
        its rows. None (not fused) where block scales would straddle two layers."""
        rows = [layer.out_features for layer in layers]
        scale_rows = [layer.scale.shape[0] for layer in layers]
        if layers[0].scheme.strategy == "block" and any(n % layers[0].scheme.block[0] for n in rows):
            return None
        fused = QuantizedWeight.cat([layer.weight.in_checkpoint_layout() for layer in layers])
        for layer, values, scale in zip(layers, stored(fused.values).split(rows), fused.scale.split(scale_rows)):
            page_out(layer.values)  # where the old buffers are a memory-mapped checkpoint's pages
            page_out(layer.scale)
            layer.assign(values, scale)
        return fused

    def assign(self, values: torch.Tensor, scale: torch.Tensor) -> QuantizedLinear:
        """Values and scale in the checkpoint's layout."""
        self.values, self.scale, self.cpu_scales_and_zeros, self.chunk = values, scale, None, 0
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.name}"


def stored(values: torch.Tensor) -> torch.Tensor:
    """Quantized values as QuantizedLinear's buffer holds them: fp8 as its bits (uint8)."""
    return values.view(torch.uint8) if values.dtype == torch.float8_e4m3fn else values


def as_values(buffer: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """The inverse of `stored`."""
    return buffer.view(torch.float8_e4m3fn) if scheme.kind == "float" else buffer


@dataclass
class DeferredNorms:
    """add_normed(residual, y, norm, scalar, next_norm) not computed yet (batch-1 decode): the GEMV that reads it
    applies it to its own input, each of its programs to a copy of the row (`kernels.gemv`), saving the norms' own
    kernel. The value is next_norm(new), or new without next_norm; `new`, the residual stream, is written by that
    GEMV (or by `materialize`): read it only after."""
    residual: torch.Tensor
    y: torch.Tensor
    norm: RMSNorm
    scalar: torch.Tensor | None
    next_norm: RMSNorm | None
    new: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.y.shape

    def kernel_args(self) -> tuple:
        return (self.residual, self.norm.weight, self.norm.eps, self.scalar, *weight_eps(self.next_norm), self.new)

    def materialize(self) -> torch.Tensor:
        """The value as a tensor, for a consumer that is not a GEMV (it also fills `new`)."""
        from ..kernels.norm import residual_rms_norm
        new, h = residual_rms_norm(self.residual, self.y, self.norm.weight, self.norm.eps, self.scalar,
                                   *weight_eps(self.next_norm), out=self.new)
        return h if h is not None else new


@dataclass
class DeferredRouterInput:
    """The router's input of a MoE layer's attention tail (add_normed_linear's `moe`) not computed yet (batch-1
    decode): the routing GEMV computes it in each of its programs from the attention's product y and the residual
    stream (`kernels.router.project_and_route`'s attention_tail) and writes the experts' input, `experts_in`, with
    it: read that only after the routing."""
    residual: torch.Tensor
    y: torch.Tensor
    norm: RMSNorm
    experts_norm: RMSNorm
    experts_in: torch.Tensor

    def kernel_args(self, router: Router) -> tuple:
        return (self.residual, self.norm.weight, self.norm.eps, self.experts_norm.weight, router.scale,
                router.root_size, self.experts_in)


def materialized(x) -> torch.Tensor:
    return x.materialize() if isinstance(x, DeferredNorms) else x


def gemv_operands(x) -> tuple[torch.Tensor, tuple | None]:
    """(the row a GEMV kernel reads, its `norms` argument): a DeferredNorms' product and norms, or x and None."""
    return (x.y, x.kernel_args()) if isinstance(x, DeferredNorms) else (x, None)


def defers(site: str) -> bool:
    """Whether the residual norms after product `site` (one of options.DEFERRABLE) are left to the next GEMV: the
    `defer_norms` option, all of them by default."""
    return site in options().defer_norms


def gated(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up, each rounded to the dtype as eager ops do: one kernel on CUDA (strided halves read in place)."""
    if kernels.enabled(gate):
        from ..kernels.activation import gated_activation
        return gated_activation(gate, up, act)
    # 16-bit only: the C tanh is within a few ulps of PyTorch's, which a 16-bit result's rounding absorbs
    if (act == "gelu_pytorch_tanh" and gate.dtype != torch.float32 and kernels.cpu_enabled(gate)
            and up.dtype == gate.dtype and up.shape == gate.shape):
        from ..kernels.cpu import gelu_gated
        out = gelu_gated(gate, up)
        if out is not None:
            return out
    return activation(act)(gate) * up


def gated_linear(x, weight: torch.Tensor, act: str, up: torch.Tensor | None = None) -> torch.Tensor:
    """gated(gate, up, act) with [gate; up] = linear(x, weight) (up None), or gate = linear(x, weight): the product and
    the activation in one kernel where `takes_gemv`. x: a tensor or DeferredNorms."""
    row, norms = gemv_operands(x)
    if takes_gemv(row, weight):
        from ..kernels.gemv import gemv_gated
        return gemv_gated(row, weight, act, up, norms=norms)
    x = materialized(x)
    if up is None:
        gate, up = product(x, weight).chunk(2, dim=-1)
    else:
        gate = product(x, weight)
    return gated(gate, up, act)


def weight_eps(norm: RMSNorm | None) -> tuple[torch.Tensor | None, float | None]:
    return (norm.weight, norm.eps) if norm is not None else (None, None)


def add_normed_linear(residual: torch.Tensor, x: torch.Tensor, projection: nn.Linear, norm: RMSNorm,
                      scalar: torch.Tensor | None = None, next_norm: RMSNorm | None = None,
                      moe: tuple[RMSNorm, Router] | None = None, defer: bool = False) -> tuple:
    """add_normed(residual, projection(x), norm, scalar, next_norm); with moe = (experts' norm, router) also that norm
    and the router's scaled input of the new residual stream (four results, else two): the product, then the norms
    in one kernel; or where `takes_gemv` with `defer` the product alone and (new, DeferredNorms) for the GEMV that
    reads it (without next_norm too: then its value is new); with moe also (experts' input, DeferredRouterInput),
    where the router's GEMV takes it (`Router.routes_deferred`), the experts' input filled by the routing.
    A tensor-parallel shard (`sums_over_ranks`, distributed/sharding.py) sums the ranks' partial products in its
    forward, before any norm."""
    if getattr(projection, "sums_over_ranks", False):
        y = projection(x)
    elif projection.bias is None and takes_gemv(x, projection.weight):
        from ..kernels.gemv import gemv
        y = gemv(x, projection.weight)
        if defer and (moe is None or moe[1].routes_deferred(y)):
            new = torch.empty_like(residual)
            deferred = DeferredNorms(residual, y, norm, scalar, next_norm, new)
            if moe is None:
                return new, deferred
            # the dense MLP's GEMV applies the norms (and writes new), the routing GEMV the router's (and writes the
            # experts' input): two kernels that run side by side, with no norms kernel before them
            experts_in = torch.empty_like(residual)
            return new, deferred, experts_in, DeferredRouterInput(residual, y, norm, moe[0], experts_in)
    else:
        y = product(x, projection.weight, projection.bias)
    if moe is None:
        return add_normed(residual, y, norm, scalar, next_norm)
    if kernels.enabled(y):  # the residual add and all three norms of it in one launch
        from ..kernels.norm import residual_moe_norms
        return residual_moe_norms(residual, y, norm.weight, norm.eps, next_norm.weight, moe[0].weight, moe[1].scale,
                                  moe[1].root_size)
    new, h = add_normed(residual, y, norm, scalar, next_norm)
    return new, h, moe[0](new), moe[1].scaled_input(new)


def add_normed(residual: torch.Tensor, x: torch.Tensor, norm: RMSNorm, scalar: torch.Tensor | None = None,
               next_norm: RMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(residual + norm(x)) [* scalar], and `next_norm` of that (None without one): one fused kernel on CUDA.

    In the model's dtype each step rounds, as in the reference: norm(x) is rounded before the add."""
    if kernels.enabled(x):
        from ..kernels.norm import residual_rms_norm
        return residual_rms_norm(residual, x, norm.weight, norm.eps, scalar, *weight_eps(next_norm))
    if kernels.cpu_enabled(x) and x.dtype == residual.dtype and x.is_contiguous() and residual.is_contiguous():
        from ..kernels.cpu import add_rms_norm
        return add_rms_norm(residual, x, norm.weight, norm.eps, scalar, *weight_eps(next_norm))
    out = residual + norm(x)
    if scalar is not None:
        out = out * scalar
    return out, next_norm(out) if next_norm is not None else None


class Beside:
    """`with Beside(x):` queues its block's kernels on a second CUDA stream of x's device, after everything queued so
    far, so that they run at the same time as the kernels the caller queues next on its own stream (a CUDA graph
    captures the two as parallel branches); `join()` makes the caller's stream wait for them. At batch 1 a kernel of a
    few microseconds leaves most of the GPU idle while it ramps up and drains: two independent chains fill it better
    than one. Where the kernels are off or not on CUDA, or `enabled` is False, the block runs in line and join does
    nothing. A tensor of the block that the caller uses must be used only after `join()`. The block's kernels take
    finished-programs counters of their own (kernels/counters.py)."""
    _streams: dict[torch.device, torch.cuda.Stream] = {}

    def __init__(self, x: torch.Tensor, enabled: bool = True):
        self.stream = None
        if enabled and x.is_cuda and kernels.enabled(x):
            if x.device not in self._streams:
                self._streams[x.device] = torch.cuda.Stream(x.device)
            self.stream, self.caller = self._streams[x.device], torch.cuda.current_stream(x.device)

    def __enter__(self) -> Beside:
        if self.stream is not None:
            self.stream.wait_stream(self.caller)
            self._contexts = contextlib.ExitStack()
            self._contexts.enter_context(torch.cuda.stream(self.stream))
            self._contexts.enter_context(counters.beside())
        return self

    def __exit__(self, *exc) -> None:
        if self.stream is not None:
            self._contexts.close()

    def join(self) -> None:
        if self.stream is not None:
            self.caller.wait_stream(self.stream)


def add_normed_branches(residual: torch.Tensor, dense: torch.Tensor, sparse: torch.Tensor, dense_norm: RMSNorm,
                        sparse_norm: RMSNorm, norm: RMSNorm, scalar: torch.Tensor | None = None,
                        next_norm: RMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """add_normed(residual, dense_norm(dense) + sparse_norm(sparse), norm, scalar, next_norm): the end of 26B-A4B's
    feed-forward (dense MLP and experts side by side); the three norms and two adds in one launch on CUDA, which also
    sums the experts' outputs when `sparse` comes as their unsummed ExpertPairs (only on the kernel path)."""
    if kernels.enabled(residual):
        from ..kernels.moe import moe_residual_norm
        return moe_residual_norm(residual, dense, sparse, dense_norm.weight, sparse_norm.weight, norm.weight, norm.eps,
                                 scalar, *weight_eps(next_norm))
    return add_normed(residual, dense_norm(dense) + sparse_norm(sparse), norm, scalar, next_norm)
