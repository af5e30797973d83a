"""Tensor and expert parallelism over torch.distributed: one model over several GPUs (NCCL) or CPU processes (gloo).

- `sharding.py`: what each rank holds, applied to a built model (`shard_model_`) or while loading (`ShardPlan`).
- `groups.py`: the process groups.
- `runtime.py`: rank 0 drives the engine and sends each forward's inputs to the other ranks (`load_parallel`).

docs/distributed.md describes the layout, the launch on one host and through torchrun, and the faults."""

from .runtime import RankFailed, current, load_parallel, shutdown
from .sharding import Ranks, ShardingError, ShardPlan, check_shardable, shard_model_

__all__ = ["RankFailed", "Ranks", "ShardPlan", "ShardingError", "check_shardable", "current", "load_parallel",
           "shard_model_", "shutdown"]
