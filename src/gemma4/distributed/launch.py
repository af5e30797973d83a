"""`torchrun ... -m gemma4.distributed serve MODEL --tensor-parallel-size N ...`: one rank per process, on one host
or several (docs/distributed.md). torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; every rank
loads its own shard (on its GPU, cuda:LOCAL_RANK), rank 0 serves HTTP and drives the engine, the others run its
forwards. N must equal torchrun's world size."""

from __future__ import annotations

import argparse
import os

from ..config import Config
from ..server.cli import add_serve_arguments, run_serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gemma4.distributed",
                                     description="a tensor-parallel `gemma4 serve` under torchrun")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(commands.add_parser("serve", help="serve MODEL over torchrun's ranks"))
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("start it with torchrun (RANK / WORLD_SIZE unset); on one host `gemma4 serve "
                     "--tensor-parallel-size N` starts the ranks itself")
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.tensor_parallel_size != size:
        parser.error(f"--tensor-parallel-size {args.tensor_parallel_size} but torchrun started {size} ranks")
    model, control = load_rank(args, rank, size, int(os.environ.get("LOCAL_RANK", 0)))
    if rank == 0:
        from . import runtime
        runtime._current = runtime.ParallelRuntime(model.ranks, control, [], model)
        run_serve(args, model)
    else:
        from .groups import destroy_groups
        from .runtime import serve_forwards
        try:
            serve_forwards(model, control)
        finally:
            destroy_groups()


def load_rank(args, rank: int, size: int, local_rank: int):
    """(this rank's shard of args.model, the control group): size errors (the drafter's too) before anything is
    read."""
    from ..loading import load_model, resolve_checkpoint, resolve_device
    from ..pretrained import Model
    from .groups import init_groups, rank_device
    from ..model.assistant import AssistantConfig
    from .sharding import ShardPlan, check_assistant_shardable, check_shardable

    directory = resolve_checkpoint(args.model)
    config = Config.from_file(directory)
    check_shardable(config, size, args.enable_expert_parallel, args.quantization)
    if args.speculative_model is not None:  # loaded by every rank with the engine (runtime.load_drafter)
        check_assistant_shardable(AssistantConfig.from_file(resolve_checkpoint(args.speculative_model)), size)
    device = rank_device(resolve_device(args.device), local_rank)
    if device.type == "cpu":
        from .runtime import share_cores
        share_cores(int(os.environ.get("LOCAL_WORLD_SIZE", size)))
    ranks, control = init_groups(rank, size, device)
    model = load_model(directory, dtype=args.dtype, device=device, model_class=Model, quantization=args.quantization,
                       shard=ShardPlan(config, ranks, args.enable_expert_parallel))
    return model, control
