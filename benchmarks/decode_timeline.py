"""The engine's captured decode step (batch 1 unless --batch) as a timeline: every kernel of one CUDA-graph replay in
launch order, with the time each one adds to the step (its end minus the previous kernel's end: with programmatic
dependent launch the next kernel starts before the previous one ends, so durations overlap and only these increments
sum to the step).

    python benchmarks/decode_timeline.py --preset E2B [--batch 1] [--context 1024] [--layers 0,20]
        [--kv-cache-dtype fp8]

Prints the step time and the bandwidth it reaches (the bytes the step must read over the replay time), the
increments summed per kernel name (count, us, share), then the kernels before the first decoder layer, of the listed
layers, and after the last one. Also times the generation loop's token rate against
the replay alone: the difference is what the host adds between steps.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from gemma4.engine.generate import engine_for
from gemma4.config import SLIDING
from gemma4.engine.sampling import SamplingParams
from gemma4.model.fused import QuantizedLinear
from gemma4.model.paged_cache import KV_CACHE_DTYPES
from gemma4.random_init import random_config, random_model


def replay_ms(graph, replays: int = 60) -> float:
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[10:])


def replay_kernels(graph) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of the kernels of one replay, in start order (the middle of three replays)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    kernels = sorted(((e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in e.name),
                     key=lambda k: k[1])
    per_replay = len(kernels) // 3
    return kernels[per_replay:2 * per_replay]


def bytes_per_step(model, engine, written: int, batch: int = 1) -> int:
    """The fewest bytes one decode step must read: every weight except the embedding tables (one row each; the
    tied LM head reads the main table whole) and the experts no token chose, each row's sliding ring whole and the
    first `written` positions of its global layers (what the decode kernel reads)."""
    text = model.text
    total = sum(nbytes(p) for p in model.parameters()) + sum(
        nbytes(m) for m in model.modules() if isinstance(m, QuantizedLinear))
    if text.ple_dim:
        table = text.embed_tokens_per_layer.weight
        total -= table.numel() * table.element_size()
    cfg = model.config.text_config
    if cfg.enable_moe_block:
        # Experts some token of the batch chose, expected under uniform routing (random weights route near it):
        # k/E of them at batch 1, 1 - (1 - k/E)^B at batch B (26B-A4B: 6% at b1, 40% at b8, 98% at b64).
        chosen = 1 - (1 - cfg.top_k_experts / cfg.num_experts) ** batch
        for layer in text.layers:
            for p in (layer.experts.gate_up_proj, layer.experts.down_proj):
                total -= nbytes(p) * (1 - chosen)
    blocks = engine.blocks
    for i, keys in blocks.keys.items():
        slots = blocks.window if blocks.layer_types[i] == SLIDING else written
        total += 2 * keys[:, :1].numel() * keys.element_size() * slots * batch  # K and V
    return int(total)


def show_between(engine, ids, params, graph_names: list[str]) -> None:
    """Profile the generation loop and print, for a few steps in its middle, the GPU work outside the graph's replay
    (kernels and copies, in order) and the idle time before each: what the host adds to a step, on the GPU's side."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        seq_ids = [engine.add_request(row.tolist(), params) for row in ids]
        for _ in engine.run(seq_ids):
            pass
        torch.cuda.synchronize()
    events = sorted(((e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e[1])
    count, i, steps = len(graph_names), 0, []  # steps: each replay's (start, end)
    while i < len(events):
        if [name for name, _, _ in events[i:i + count]] == graph_names:
            steps.append((events[i][1], max(end for _, _, end in events[i:i + count])))
            i += count
        else:
            i += 1
    middle = steps[len(steps) // 2:len(steps) // 2 + 3]
    print(f"between replays: {len(steps)} replays found; three from the middle of the loop")
    for (start, end), (next_start, _) in zip(middle, steps[len(steps) // 2 + 1:]):
        print(f"  replay {end - start:8.1f} us, then {next_start - end:6.1f} us to the next replay:")
        previous = end
        for name, begin, finish in [e for e in events if end <= e[1] < next_start]:
            print(f"    idle {begin - previous:6.1f}  runs {finish - begin:6.1f}  {short(name)}")
            previous = max(previous, finish)
        print(f"    idle {next_start - previous:6.1f}  (the next replay)")


def nbytes(weight) -> int:
    """A parameter's bytes, or a QuantizedLinear's (values and scales)."""
    if isinstance(weight, QuantizedLinear):
        return sum(t.numel() * t.element_size() for t in (weight.values, weight.scale))
    return weight.numel() * weight.element_size()


def short(name: str) -> str:
    return name.split("(")[0].split("<")[0].removeprefix("void ")[:48]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="E2B")
    parser.add_argument("--batch", type=int, default=1, help="rows of the step (replayed in the graph of its bucket)")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--layers", default="0,-2", help="decoder layers to list kernel by kernel")
    parser.add_argument("--quantization", choices=["fp8", "int8", "int4"], default=None,
                        help="the weights quantized on load")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    parser.add_argument("--ops", action="store_true",
                        help="also list the PyTorch ops of an eager step that launch kernels")
    parser.add_argument("--between", action="store_true",
                        help="also list what the GPU runs between replays of the generation loop, and its idle gaps")
    args = parser.parse_args()

    model = random_model(random_config(args.preset, text_only=True), torch.bfloat16, device="cuda",
                         quantization=args.quantization)
    vocab = model.config.text_config.vocab_size
    batch = args.batch
    ids = torch.randint(10, min(200_000, vocab), (batch, args.context), device="cuda")
    steps = 64
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    engine = engine_for(model, batch, args.context + steps, kv_cache_dtype=args.kv_cache_dtype)
    for _ in range(2):  # the first run captures the graph
        seq_ids = [engine.add_request(row.tolist(), params) for row in ids]
        times = [time.perf_counter() for out in engine.run(seq_ids)
                 if out.token is not None and out.seq_id == seq_ids[0]]
    graphs = engine.runner.graphs
    size = next(s for s in graphs.sizes if s >= batch)  # the bucket the engine replays `batch` rows in
    graph = graphs.graphs[size][0]
    loop_ms = (times[-1] - times[1]) / (len(times) - 2) * 1e3
    step_ms = replay_ms(graph)
    print(f"{args.preset} b{batch} ctx{args.context}: replay {step_ms * 1e3:.1f} us/step; generation loop "
          f"{loop_ms * 1e3:.1f} us/token ({1 / loop_ms * 1e3:.1f} tok/s): the host adds "
          f"{(loop_ms - step_ms) * 1e3:.1f} us")
    need = bytes_per_step(model, engine, args.context, batch)
    print(f"the step must read {need / 1e9:.3f} GB: {need / step_ms / 1e6:.0f} GB/s during the replay")

    if args.ops:  # the PyTorch ops of one eager step that launch kernels, in order, with their kernels
        graphs._step(size)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            graphs._step(size)  # the captured step's code, run eagerly
            torch.cuda.synchronize()
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CPU and event.kernels and event.name.startswith("aten"):
                print(f"  op {event.name:32} -> {', '.join(short(k.name) for k in event.kernels)}")
    kernels = replay_kernels(graph)
    if args.between:
        show_between(engine, ids, params, [name for name, _, _ in kernels])
    origin = kernels[0][1]
    rows, previous_end = [], origin
    for name, begin, end in kernels:
        rows.append((short(name), begin - origin, end - begin, max(0.0, end - max(begin, previous_end))))
        previous_end = max(previous_end, end)
    total = previous_end - origin
    print(f"one replay under the profiler: {len(rows)} kernels, {total:.1f} us from first start to last end")
    summed = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for name, _, duration, added in rows:
        summed[name][0] += 1
        summed[name][1] += added
        summed[name][2] += duration
    print(f"{'kernel':48} {'count':>5} {'adds us':>8} {'share':>6} {'runs us':>8}")
    for name, (count, added, duration) in sorted(summed.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:48} {count:5d} {added:8.1f} {added / total:6.1%} {duration:8.1f}")

    # Each layer runs one attention kernel, two launches after its first (q/k/v GEMV, norm + RoPE).
    layer_start = [max(0, i - 2) for i, row in enumerate(rows) if row[0] == "_split_kernel"]
    if not layer_start:
        return

    def show(title, selected):
        print(title)
        for name, begin, duration, added in selected:
            print(f"  {name:48} start {begin:8.1f} runs {duration:6.1f} adds {added:6.1f}")

    show("before the first layer:", rows[:layer_start[0]])
    for spec in args.layers.split(","):
        i = int(spec) % len(layer_start)
        if i + 1 < len(layer_start):
            show(f"layer {i}:", rows[layer_start[i]:layer_start[i + 1]])
    show("the last layer and after it:", rows[layer_start[-1]:])


if __name__ == "__main__":
    main()
