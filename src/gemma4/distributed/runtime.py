"""Running one model over N ranks: rank 0 holds the engine (scheduler, block manager, sampler) and its shard of the
model; ranks 1..N-1 hold only their shards and run every forward rank 0 runs, with the same inputs, so that the
collectives inside the model meet.

Rank 0's model forward is wrapped (`ParallelRuntime.mirror`): before each forward it sends the call's arguments to
the other ranks on a gloo control group: tensors as CPU copies, a paged cache as its block tables and ring slots
(each rank keeps its own KV pools, of its own KV heads, mirroring rank 0's: created, freed and ring-copied with
them; the sliding rings' positions travel with each step). The engine code is unchanged: only the forward knows.
Speculative decoding's drafter is loaded by every rank, cut as the target (`load_drafter`), and its drafting steps
are mirrored as the forward is (`mirror_drafts`): each rank reads the target's K/V from its own pools.

Faults: a rank whose process ends, or a forward that raises on any rank (the ranks' collectives may then be out of
step), makes rank 0's forward raise `RankFailed` (a torch.AcceleratorError: the engine stops, as on a sticky device
error, and the server reports unhealthy and exits); a rank that hangs does so after the collectives' timeout, or,
while it loads the drafter, after the runtime's `timeout` (the control group itself never times out: it waits for
the next step as long as the server idles). `on_failure` is also called from a watchdog thread when a spawned rank
ends while rank 0 is idle."""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import signal
import threading
import traceback
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import SLIDING, Config
from ..engine.speculative import DraftStep, TargetKV
from ..model.assistant import AssistantConfig
from ..model.gemma4 import check_token_ids
from ..model.paged_cache import KVPools, PagedCacheView
from ..quantization import kv_cache_scales
from ..threads import available_cores
from .groups import DEFAULT_TIMEOUT, IDLE_TIMEOUT, destroy_groups, free_port, init_groups, rank_device
from .sharding import Ranks, ShardPlan, check_assistant_shardable, check_shardable

logger = logging.getLogger(__name__)

_current: ParallelRuntime | None = None  # one per process: torch.distributed has one default group


class RankFailed(torch.AcceleratorError):
    """A rank of a tensor-parallel model ended or stopped answering: like a sticky device error, the model cannot
    go on (the engine stops rather than failing request after request)."""


def load_parallel(path, tensor_parallel_size: int, enable_expert_parallel: bool = False, dtype=None, device="auto",
                  quantization: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT,
                  speculative_model=None):
    """Rank 0's shard of the checkpoint at `path` (a `gemma4.Model`), with N-1 worker processes spawned on this host
    holding the others; `quantization` ("fp8", "int8", "int4") quantizes each rank's part on load. Size errors
    (heads, experts, vocabulary, quantization groups not divisible; those of `speculative_model`, a drafter
    checkpoint the engine will load with `load_drafter`) are raised before anything starts."""
    from ..loading import resolve_checkpoint, resolve_device

    directory = resolve_checkpoint(path)
    check_shardable(Config.from_file(directory), tensor_parallel_size, enable_expert_parallel, quantization)
    if isinstance(speculative_model, (str, os.PathLike)):
        check_assistant_shardable(AssistantConfig.from_file(resolve_checkpoint(speculative_model)),
                                  tensor_parallel_size)
    device = resolve_device(device)
    if device.type == "cuda" and torch.cuda.device_count() < tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs as many GPUs on this host; "
                         f"{torch.cuda.device_count()} are visible")
    if _current is not None and _current.model is None:  # its model is gone (e.g. the LLM around it failed)
        _current.shutdown()
    if _current is not None:
        raise RuntimeError("a tensor-parallel model already runs in this process; gemma4.distributed.shutdown() it "
                           "first")
    return ParallelRuntime.spawn(directory, tensor_parallel_size, enable_expert_parallel, dtype, device, quantization,
                                 timeout)


def shutdown() -> None:
    """Stop this process's tensor-parallel runtime (its worker processes, its process groups), if any."""
    if _current is not None:
        _current.shutdown()


def current() -> ParallelRuntime | None:
    return _current


class ParallelRuntime:
    """Rank 0's side: the worker processes, the groups, and the mirror of every forward."""

    def __init__(self, ranks: Ranks, control, processes: list, model=None,
                 timeout: datetime.timedelta = DEFAULT_TIMEOUT):
        self.ranks, self.control, self.processes = ranks, control, processes
        self.timeout = timeout  # how long rank 0 waits for the others to load a drafter
        self._model = lambda: None  # a weak reference: the model holds this runtime, not the other way round
        self.failed: str | None = None
        self.threads_before: int | None = None  # PyTorch's CPU threads here before share_cores
        self.on_failure = lambda: None
        # id -> rank 0's KVPools or drafter, whose twins the other ranks hold (and drop once it is gone)
        self._twins: dict[int, weakref.ref] = {}
        self._copies: list[tuple[int, int, int]] = []  # (pools id, source ring, target ring) not sent yet
        self._next_id = 0
        self._stopped = threading.Event()
        if processes:
            threading.Thread(target=self._watch, name="gemma4-tp-watchdog", daemon=True).start()
        if model is not None:
            self.mirror(model)
            if model.device.type == "cuda":
                _eager_steps()

    @classmethod
    def spawn(cls, directory: Path, size: int, expert_parallel: bool, dtype, device: torch.device,
              quantization: str | None, timeout: datetime.timedelta):
        """Rank 0's model, the other ranks started and loaded; the runtime is `current()`."""
        global _current
        import torch.multiprocessing as mp

        from ..loading import load_model
        from ..pretrained import Model

        threads = share_cores(size) if device.type == "cpu" else None
        init_method = f"tcp://127.0.0.1:{free_port()}"
        context = mp.get_context("spawn")
        ready = context.Queue()
        args = (str(directory), size, expert_parallel, dtype, device.type, quantization, init_method, timeout)
        processes = [context.Process(target=_worker_main, args=(rank, *args, ready), name=f"gemma4-tp-rank{rank}",
                                     daemon=True) for rank in range(1, size)]
        for process in processes:
            process.start()
        try:
            _wait_for(ready, processes, "started", timeout)  # a rank that cannot start fails now, not at init's timeout
            ranks, control = init_groups(0, size, rank_device(device, 0), init_method, timeout)
            model = load_model(directory, dtype=dtype, device=rank_device(device, 0), model_class=Model,
                               quantization=quantization,
                               shard=ShardPlan(Config.from_file(directory), ranks, expert_parallel))
            _wait_for(ready, processes, "loaded", timeout)
        except BaseException:
            for process in processes:
                process.kill()
            destroy_groups()
            if threads is not None:
                torch.set_num_threads(threads)
            raise
        runtime = _current = cls(ranks, control, processes, model, timeout)
        runtime.threads_before = threads
        atexit.register(runtime.shutdown)
        return model

    def mirror(self, model) -> None:
        """Make `model`'s forward send its inputs to the other ranks first."""
        self._model = weakref.ref(model)
        model.parallel_runtime = self

        def check(input_ids, *args, **kwargs):
            if not getattr(kwargs.get("cache"), "prechecked", False):  # a call by hand: its ids, before any rank runs
                check_token_ids(model.config, input_ids)

        model.forward = self._mirrored(None, model.forward, check)

    def mirror_drafts(self, step: DraftStep) -> None:
        """Make the drafting steps of `step` (engine/speculative.py; its drafter from `load_drafter`) run on every
        rank, each on its twin of the drafter and its own pools, as `mirror` does the model's forward."""
        step.forward = self._mirrored(step.drafter.parallel_id, step.forward)

    def load_drafter(self, path):
        """Every rank's part of the drafter checkpoint at `path` (`sharding.assistant_cut_specs`: its query heads with
        the KV heads that rank's pools hold, its MLPs and a dense head cut as the target's), each rank reading only
        its slices; rank 0's is returned. A size that cannot cut it is a ShardingError before any rank reads it; a
        rank that fails to load its part, a RuntimeError with that rank's traceback; one that has not loaded it
        `timeout` after rank 0 has, RankFailed naming it (the runtime has failed)."""
        from ..loading import resolve_checkpoint

        directory = resolve_checkpoint(path)
        check_assistant_shardable(AssistantConfig.from_file(directory), self.ranks.size)
        self.check()
        drafter_id = self._next_id
        self._next_id += 1
        try:
            dist.broadcast_object_list([{"drafter": (drafter_id, str(directory))}], src=0, group=self.control)
            drafter, errors = _load_drafter(self.model, directory, self.control, self.timeout)
        except Exception as e:  # noqa: BLE001  (whatever gloo raises when a peer is gone or late)
            raise self._failure(e, "loading the drafter") from e
        if failed := next(((rank, error) for rank, error in enumerate(errors) if error is not None), None):
            raise RuntimeError(f"tensor parallelism: rank {failed[0]} failed to load its part of the drafter:\n"
                               f"{failed[1]}")
        drafter.parallel_id = drafter_id
        self._twins[drafter_id] = weakref.ref(drafter)
        return drafter

    @property
    def model(self):
        """Rank 0's model, None once it is gone."""
        return self._model()

    def check(self) -> None:
        if self.failed is None and (dead := self._dead_rank()) is not None:
            self.failed = dead
        if self.failed is not None:
            raise RankFailed(f"tensor parallelism: {self.failed}")

    def shutdown(self) -> None:
        global _current
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.failed is None:
            try:
                dist.broadcast_object_list([None], src=0, group=self.control)
            except Exception:  # noqa: BLE001  (a rank already gone)
                pass
        for process in self.processes:  # after a failure a rank may wait in a collective: no need to wait long
            process.join(timeout=10 if self.failed is None else 1)
            if process.is_alive():
                process.kill()
        destroy_groups()
        if self.threads_before is not None:
            torch.set_num_threads(self.threads_before)
        if _current is self:
            _current = None

    # ---- internals

    def _mirrored(self, call: int | None, forward, check=None):
        """`forward`, sending its arguments to the other ranks first, where they call their twin of it (`call`: None
        for the model's forward, else a drafter's id)."""

        def mirrored(*args, **kwargs):
            self.check()
            if check is not None:
                check(*args, **kwargs)
            try:
                dist.broadcast_object_list([self._message(call, args, kwargs)], src=0, group=self.control)
            except Exception as e:  # noqa: BLE001  (whatever gloo raises when a peer is gone)
                raise self._failure(e) from e
            try:
                return forward(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                # Fatal, whatever it is (out of memory, say): the other ranks may have gone on to a collective this
                # rank never reaches, and the next forward's collectives would pair with theirs.
                raise self._failure(e) from e

        return mirrored

    def _dead_rank(self) -> str | None:
        for rank, process in enumerate(self.processes, start=1):
            if process.exitcode is not None:
                return f"rank {rank} ended (exit code {process.exitcode})"
        return None

    def _failure(self, error: BaseException, during: str = "a forward") -> RankFailed:
        self.failed = self._dead_rank() or f"{during} failed: {type(error).__name__}: {error}"
        return RankFailed(f"tensor parallelism: {self.failed}")

    def _watch(self) -> None:
        while not self._stopped.wait(1.0):
            if (dead := self._dead_rank()) is not None:
                if self.failed is None:
                    self.failed = dead
                    logger.error("tensor parallelism: %s", dead)
                    self.on_failure()
                return

    def _message(self, call: int | None, args, kwargs) -> dict:
        freed = [pid for pid, ref in self._twins.items() if ref() is None]
        for pid in freed:
            del self._twins[pid]
        message = {"call": call, "freed": freed, "new_pools": []}
        message["args"] = [self._outgoing(value, message) for value in args]
        message["kwargs"] = {name: self._outgoing(value, message) for name, value in kwargs.items()}
        message["copies"], self._copies = self._copies, []
        return message

    def _outgoing(self, value, message: dict):
        """An argument as it travels: tensors as CPU copies, a paged cache as its tables (`_CacheInputs`), a
        drafting round's target K/V as the view its ranks read their own pools through (`_TargetKVInputs`)."""
        if isinstance(value, PagedCacheView):
            return self._cache(value, message)
        if isinstance(value, TargetKV):
            if getattr(value, "parallel_id", None) is None:  # the round's first step: the ranks read it anew
                value.parallel_id = self._next_id
                self._next_id += 1
            return _TargetKVInputs(value.parallel_id, self._cache(value.view, message), value.paged)
        if value is not None and hasattr(value, "pools"):
            raise NotImplementedError("tensor parallelism runs the engine's paged cache, not KVCache "
                                      "(use Model.generate or LLM)")
        return _to_host(value)

    def _cache(self, view: PagedCacheView, message: dict) -> _CacheInputs:
        pools = view.pools
        pid = getattr(pools, "parallel_id", None)
        if pid is None:
            pid = pools.parallel_id = self._next_id
            self._next_id += 1
            self._twins[pid] = weakref.ref(pools)
            message["new_pools"].append((pid, _pools_spec(pools)))
            if hasattr(pools, "_copy_ring"):  # BlockManager: the prefix cache copies K/V between rings
                copy_ring = pools._copy_ring

                def mirrored_copy_ring(src: int, dst: int, pid=pid):
                    copy_ring(src, dst)
                    self._copies.append((pid, src, dst))

                pools._copy_ring = mirrored_copy_ring
        rings = view.ring_slots.cpu()
        return _CacheInputs(pid, view.block_tables.cpu(), rings, view.num_cached.cpu(), view.max_cached,
                            _ring_table(pools)[rings].cpu())


class _CacheInputs:
    """A PagedCacheView as it travels: its tables, and the positions its rows' rings hold on rank 0 (which the host
    edits between forwards: an admission empties a ring, a prefix-cache hit copies one); each rank views its own
    pools with them. A forward reads and writes only its rows' rings."""

    def __init__(self, pools_id, block_tables, ring_slots, num_cached, max_cached, ring_positions):
        self.pools_id, self.block_tables, self.ring_slots = pools_id, block_tables, ring_slots
        self.num_cached, self.max_cached, self.ring_positions = num_cached, max_cached, ring_positions

    def view(self, pools: KVPools, device) -> PagedCacheView:
        _ring_table(pools)[self.ring_slots.to(device)] = self.ring_positions.to(device)
        return PagedCacheView(pools, self.block_tables.to(device), self.ring_slots.to(device),
                              self.num_cached.to(device), max_cached=self.max_cached)


class _TargetKVInputs:
    """A drafting round's TargetKV as it travels: its id (the steps of one round send the same one: each rank reads
    its pools once per round), its view, and whether the drafter reads it in place."""

    def __init__(self, kv_id: int, cache: _CacheInputs, paged: bool):
        self.kv_id, self.cache, self.paged = kv_id, cache, paged


def _ring_table(pools: KVPools) -> torch.Tensor:
    """pools.ring_positions as [rings, ring size] (without the trash slot): a view, written through."""
    size = getattr(pools, "ring_size", pools.window)
    return pools.ring_positions[:pools.num_rings * size].view(pools.num_rings, size)


def _pools_spec(pools: KVPools) -> dict:
    spec = dict(num_blocks=pools.num_blocks, block_size=pools.block_size, max_num_seqs=pools.max_num_seqs,
                kv_cache_dtype=pools.kv_cache_dtype, num_rings=pools.num_rings)
    extra = getattr(pools, "ring_size", pools.window) - pools.window
    if extra:
        spec["ring_extra"] = extra
    return spec


def _to_host(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_host(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    return value


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _copy_ring(pools: KVPools, src: int, dst: int) -> None:
    """BlockManager._copy_ring's K/V part on this rank's pools (positions come with each step)."""
    w = getattr(pools, "ring_size", pools.window)
    for i in pools.keys:
        if pools.layer_types[i] == SLIDING:
            for tensors in (pools.keys, pools.values):
                tensors[i][:, dst * w:(dst + 1) * w] = tensors[i][:, src * w:(src + 1) * w]


def _wait_for(ready, processes: list, stage: str, timeout: datetime.timedelta) -> None:
    """Until every worker reports `stage` ("started", "loaded"); RuntimeError with its traceback when one fails, or
    when one ends first."""
    import queue

    waiting = set(range(1, len(processes) + 1))
    deadline = timeout.total_seconds() * 10  # loading a shard takes longer than a collective
    waited = 0.0
    while waiting:
        try:
            rank, reached, error = ready.get(timeout=0.5)
        except queue.Empty:
            waited += 0.5
            for rank, process in enumerate(processes, start=1):
                if rank in waiting and process.exitcode is not None:
                    hint = (" (a script that makes a tensor-parallel LLM needs `if __name__ == \"__main__\":`: each "
                            "rank is a fresh interpreter that imports it)" if stage == "started" else "")
                    raise RuntimeError(f"tensor parallelism: rank {rank} ended before it {stage} (exit code "
                                       f"{process.exitcode}){hint}") from None
            if waited > deadline:
                raise RuntimeError(f"tensor parallelism: ranks {sorted(waiting)} not {stage} within "
                                   f"{deadline:.0f} s") from None
            continue
        if error is not None:
            raise RuntimeError(f"tensor parallelism: rank {rank} failed to load its shard:\n{error}")
        if reached == stage:
            waiting.discard(rank)


def share_cores(size: int) -> int:
    """CPU ranks: each its share of the cores for PyTorch's threads (this process's too, until shutdown; returns its
    count before). N ranks of the default thread count would oversubscribe them, and the threads that spin-wait after
    each op would stall the collectives of the ranks waiting for a core."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, available_cores() // size))
    return before


def _eager_steps() -> None:
    """Decode steps without CUDA graphs in this process: rank 0's forward sends its inputs from the host, which a
    graph replay would skip."""
    import dataclasses

    from .. import options as options_module
    options_module.current = dataclasses.replace(options_module.current, cuda_graphs=False)


def _worker_main(rank: int, directory: str, size: int, expert_parallel: bool, dtype, device_type: str,
                 quantization: str | None, init_method: str, timeout: datetime.timedelta, ready) -> None:
    """A spawned rank: load this rank's shard, report, then run rank 0's forwards until told to stop."""
    from ..loading import load_model

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 decides (drains)
    device = rank_device(torch.device(device_type), rank)
    if device.type == "cpu":
        share_cores(size)
    ready.put((rank, "started", None))
    try:
        ranks, control = init_groups(rank, size, device, init_method, timeout)
        model = load_model(directory, dtype=dtype, device=device, quantization=quantization,
                           shard=ShardPlan(Config.from_file(directory), ranks, expert_parallel))
    except BaseException:
        ready.put((rank, "failed", traceback.format_exc()))
        raise
    ready.put((rank, "loaded", None))
    try:
        serve_forwards(model, control)
    finally:
        destroy_groups()


def _load_drafter(model, directory, control, timeout: datetime.timedelta) -> tuple[object | None, list[str | None]]:
    """Every rank at once: (this rank's part of the drafter at `directory`, or None where it failed to load; each
    rank's traceback or None, gathered on the control group). Rank 0 waits `timeout` at most for the others to
    finish (a RuntimeError naming the first late rank); the others wait for rank 0 as long as it takes."""
    from ..assistant_checkpoint import load_assistant

    drafter, error = None, None
    try:
        drafter = load_assistant(directory, dtype=model.dtype, device=model.device, ranks=model.ranks)
    except Exception:  # noqa: BLE001  (reported by rank 0, for every rank)
        error = traceback.format_exc()
    # The control group has no timeout (it waits for the next step while the server idles): a rank that hangs here
    # would keep rank 0 waiting in the gather for ever. monitored_barrier times out on rank 0 alone.
    dist.monitored_barrier(control, timeout)
    errors = [None] * dist.get_world_size(control)
    dist.all_gather_object(errors, error, group=control)
    return drafter, errors


@torch.no_grad()
def serve_forwards(model, control) -> None:
    """Ranks 1..N-1: run each forward and drafting step rank 0 sends, on this rank's shard and KV pools, until it
    sends None. A forward that raises ends the loop (and the rank)."""
    pools: dict[int, KVPools] = {}
    drafts: dict[int, DraftStep] = {}  # rank 0's drafter id -> this rank's drafting step
    rounds: dict[int, TargetKV] = {}  # the target K/V of the drafting round in progress, by id
    device = model.device

    def incoming(value):
        if isinstance(value, _CacheInputs):
            return value.view(pools[value.pools_id], device)
        if isinstance(value, _TargetKVInputs):
            if value.kv_id not in rounds:
                rounds[value.kv_id] = TargetKV(incoming(value.cache), value.paged)
            return rounds[value.kv_id]
        return _to_device(value, device)

    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        message = box[0]
        if message is None:
            return
        if "drafter" in message:
            drafter_id, directory = message["drafter"]
            drafter, errors = _load_drafter(model, directory, control, IDLE_TIMEOUT)
            if not any(errors):
                drafts[drafter_id] = DraftStep(model, drafter)
            continue
        for pid in message["freed"]:
            pools.pop(pid, None)
            drafts.pop(pid, None)
        for pid, spec in message["new_pools"]:
            pools[pid] = KVPools(model.config.text_config, dtype=model.dtype, device=device, **spec)
            pools[pid].load_scales_(kv_cache_scales(model))
        for pid, src, dst in message["copies"]:
            _copy_ring(pools[pid], src, dst)
        # A drafting round's target K/V is kept while its steps come: any other call ends the round.
        kept = {value.kv_id for value in [*message["args"], *message["kwargs"].values()]
                if isinstance(value, _TargetKVInputs)}
        rounds = {kv_id: kv for kv_id, kv in rounds.items() if kv_id in kept}
        args = [incoming(value) for value in message["args"]]
        kwargs = {name: incoming(value) for name, value in message["kwargs"].items()}
        call = model if message["call"] is None else drafts[message["call"]]
        try:
            call(*args, **kwargs)
        except Exception:
            # This rank may now be out of step with the others' collectives: it ends, which rank 0 reports.
            logger.exception("rank %d: a forward failed; this rank ends", dist.get_rank())
            raise
