"""How much KV cache an engine gets, as vLLM sizes it: the bytes one block and one sequence's sliding rings take, the
memory the device leaves for them, and the sizes that follow (blocks, longest context); and the start-up summary.

The budget, unless given in bytes (`kv_cache_memory`) or replaced by an explicit block count (`--num-kv-blocks`):
* CUDA: utilization x the GPU's total memory, less what is in use once the weights are loaded (weights, CUDA context,
  other processes: total - free), less the activation peak of the engine's largest prefill step, measured by running
  one (`profile_prefill`). What the utilization leaves over (10% by default) absorbs the decode and prefill graphs'
  pools, the sampler's work buffers and the media towers.
* CPU: 4 GiB (vLLM's CPU default too), at most half the free RAM. The pool is zeroed, so it is resident at once.

The pools' layout: model/paged_cache.py (KVPools); an fp8 cache (`kv_cache_dtype="fp8"`) takes 1 byte per element,
so the same budget holds twice the blocks of a bf16 one."""

from __future__ import annotations

import gc
import os

import torch

from ..config import TextConfig
from ..model.paged_cache import KVPools

GiB = 2**30
CPU_KV_BYTES = 4 * GiB
HINT = ("lower --max-model-len or --max-num-seqs, or raise --gpu-memory-utilization (LLM: max_model_len, "
        "max_batch_size, gpu_memory_utilization)")


def kv_bytes(config: TextConfig, dtype: torch.dtype, block_size: int, kv_cache_dtype: str = "auto",
             ring_extra: int = 0) -> tuple[int, int]:
    """(bytes of one block across every global layer, bytes of one sequence's rings across every sliding layer),
    read off pools built on the meta device: the layout is KVPools' own."""
    def pools(num_blocks: int, max_num_seqs: int) -> int:
        return KVPools(config, num_blocks, block_size, max_num_seqs, dtype, "meta", kv_cache_dtype,
                       ring_extra=ring_extra).nbytes

    empty = pools(0, 0)
    return pools(1, 0) - empty, pools(0, 1) - empty


def free_ram() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        return None


def kv_budget(model, utilization: float, prefill_tokens: int) -> int:
    """Bytes the KV pools may take on `model`'s device (see the module's docstring)."""
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    device = model.device
    if device.type != "cuda":
        ram = free_ram()
        return CPU_KV_BYTES if ram is None else min(CPU_KV_BYTES, ram // 2)
    activation = profile_prefill(model, prefill_tokens)
    free, total = torch.cuda.mem_get_info(device)
    return int(utilization * total) - (total - free) - activation


def profile_prefill(model, tokens: int) -> int:
    """Peak bytes that one prefill step of `tokens` tokens allocates on the GPU beyond what is held before it: a
    throwaway engine with room for that one sequence runs it (this also compiles the prefill kernels). Measured once
    per model and size: it resets the GPU's peak-memory statistics (torch.cuda.max_memory_allocated)."""
    from .engine import LLMEngine
    from .sampling import SamplingParams

    device = model.device
    tokens = max(1, min(tokens, model.config.text_config.max_position_embeddings - 2))
    measured = model.__dict__.setdefault("_prefill_peaks", {})
    if tokens in measured:
        return measured[tokens]
    probe = LLMEngine(model, max_num_seqs=1, max_model_len=tokens + 1, num_blocks=1, max_num_batched_tokens=tokens)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    held = torch.cuda.memory_allocated(device)
    probe.generate([[0] * tokens], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - held
    del probe
    gc.collect()
    torch.cuda.empty_cache()  # so that mem_get_info sees the probe's memory free again
    measured[tokens] = peak
    return peak


def plan_kv(config: TextConfig, dtype: torch.dtype, max_num_seqs: int, block_size: int,
            max_model_len: int | None = None, num_blocks: int | None = None, budget: int | None = None,
            kv_cache_dtype: str = "auto", extra_rings: int = 0, ring_extra: int = 0) -> tuple[int, int]:
    """(max_model_len, num_blocks). `num_blocks` given: that many (at least one sequence of max_model_len; None:
    the longest they hold). Otherwise from `budget` bytes: the rings of max_num_seqs sequences (and `extra_rings`, the
    prefix cache's), then as many blocks as
    fit, never more than every sequence at max_model_len uses; max_model_len None: the longest one sequence fits.
    Never longer than max_position_embeddings. ValueError when one sequence of max_model_len does not fit."""
    limit = config.max_position_embeddings
    blocks_for = lambda length: -(-(length + 1) // block_size)  # noqa: E731  (+1: the next token's slot)
    if num_blocks is not None:
        length = min(max_model_len, limit) if max_model_len else min(limit, max(num_blocks, 1) * block_size - 1)
        return length, max(num_blocks, blocks_for(length))
    per_block, per_ring = kv_bytes(config, dtype, block_size, kv_cache_dtype, ring_extra)
    rings = (max_num_seqs + extra_rings + 1) * per_ring  # + the trash slot (a whole ring, to round up)
    fit = (budget - rings) // per_block - 1 if per_block else 1 << 40  # - the trash block
    if fit < 1:
        raise ValueError(f"no room for the KV cache: {budget / GiB:.2f} GiB for it, of which the sliding-window rings "
                         f"of {max_num_seqs} sequences (and {extra_rings} for the prefix cache) take "
                         f"{rings / GiB:.2f} GiB; {HINT}")
    longest = fit * block_size - 1  # one sequence alone
    length = min(max_model_len or limit, limit)
    if max_model_len is None:  # the default: as long as one sequence fits
        length = min(length, longest)
    elif length > longest:
        raise ValueError(f"a context of {length} tokens does not fit: one sequence needs "
                         f"{blocks_for(length) * per_block / GiB:.2f} GiB of KV cache, {fit * per_block / GiB:.2f} GiB "
                         f"are left for it (at most {longest} tokens); {HINT}")
    return length, min(fit, blocks_for(length) * max_num_seqs)


def summary(engine, seconds: float) -> str:
    """One line on what an engine holds: device, dtype, context, sequences, KV pool (and its dtype), decode and prefill
    graphs, time to ready."""
    model, blocks, graphs = engine.runner.model, engine.blocks, engine.runner.graphs
    decode = graphs.describe() if graphs is not None else "eager decode"
    if engine.runner.prefill_graphs is not None:
        decode += f", {engine.runner.prefill_graphs.describe()}"
    kv_dtype = "fp8 e4m3" if blocks.kv_cache_dtype == "fp8" else str(blocks.pool_dtype).removeprefix("torch.")
    return (f"device {model.device}, dtype {str(model.dtype).removeprefix('torch.')}, context {engine.max_model_len} "
            f"tokens, {engine.max_num_seqs} sequences at most, KV cache {blocks.num_blocks} blocks of "
            f"{blocks.block_size} tokens ({blocks.nbytes / GiB:.2f} GiB in {kv_dtype}), {decode}; ready in "
            f"{seconds:.1f}s")
