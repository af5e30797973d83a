"""Decode/prefill speed of gemma4 (its decode modes) vs transformers 5.23: same weights, same device, same run.

Writes a random-weight checkpoint of an official preset (bf16), loads it with both, and times greedy generation:
decode tok/s = batch x steps / (time of generate(prompt, steps+1) - time of generate(prompt, 1)), best of --repeat.

    python benchmarks/decode_baseline.py --preset E2B --batch 1 8 --context 1024 --steps 64 \\
        --engines dynamic graph transformers --profile

Engines: "dynamic" (the eager reference path), "static" (static cache, eager), "graph" (CUDA graphs + batched
device sampling), "compile" (graph, with the step compiled by torch.compile first), "transformers".
--profile adds, per gemma4 graph engine and batch: the replay time of the captured step alone (CUDA events, median
of 50) with the bytes it must read (weights read per token + the KV cache) and the bandwidth that implies, and
the kernel count and top kernels of one eager static step (torch.profiler).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from gemma4 import Model
from gemma4.loading import checkpoint_key
from gemma4.bench import profile_decode as profile, timed
from gemma4.random_init import random_config, random_model, write_random_checkpoint


DEVICE = "cuda"


def measure(generate, batch: int, context: int, steps: int, repeat: int) -> dict:
    ids = torch.randint(10, 200_000, (batch, context), device=DEVICE)
    generate(ids, steps + 1)  # warm-up (captures / compiles the decode step for this batch)
    first = timed(lambda: generate(ids, 1), DEVICE, repeat)
    full = timed(lambda: generate(ids, steps + 1), DEVICE, repeat)
    return {"prefill_tok_s": batch * context / first, "ttft_s": first,
            "decode_tok_s": batch * steps / (full - first), "step_ms": (full - first) / steps * 1e3}


def reference_sharing_weights(ours):
    """transformers' Gemma4ForCausalLM built on the device, then given our tensors (copied in by key)."""
    import transformers

    config = transformers.Gemma4TextConfig(**ours.config.text_config.to_dict())
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            reference = transformers.Gemma4ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    reference.config._attn_implementation = "sdpa"
    state = {checkpoint_key(name, "text"): tensor for name, tensor in ours.state_dict().items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not line up: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return reference.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="E2B")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=["graph", "transformers"],
                        choices=["dynamic", "static", "graph", "compile", "transformers"])
    parser.add_argument("--compare", choices=["transformers"], default=None, help="same as adding the engine")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--out", default=None, help="write results as JSON here")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script, not a benchmark")
    parser.add_argument("--in-memory", action="store_true",
                        help="draw the random weights on the device and hand transformers the same tensors, instead "
                             "of writing and loading a checkpoint (for 26B/31B: no 50-60 GB of disk traffic)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    cuda = DEVICE == "cuda"
    engines = args.engines + (["transformers"] if args.compare and "transformers" not in args.engines else [])

    start = time.perf_counter()
    if args.in_memory:
        directory = None
        ours = random_model(random_config(args.preset, args.num_layers, text_only=True), torch.bfloat16,
                            device=DEVICE)
        print(f"drew random {args.preset} on {DEVICE} in {time.perf_counter() - start:.0f}s", flush=True)
    else:
        directory = tempfile.mkdtemp()
        write_random_checkpoint(args.preset, directory, num_layers=args.num_layers, text_only=True,
                                dtype=torch.bfloat16)
        print(f"wrote random {args.preset} in {time.perf_counter() - start:.0f}s", flush=True)
        ours = Model.from_pretrained(directory, dtype=torch.bfloat16, device=DEVICE)
    rows, profiles = [], {}
    load_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    for engine in engines:  # in the order given: put slow or risky ones (compile) last
        start = time.perf_counter()
        if engine == "transformers":
            import transformers

            if directory is None:
                reference = reference_sharing_weights(ours)
            else:
                reference = transformers.Gemma4ForCausalLM.from_pretrained(
                    directory, dtype=torch.bfloat16, **({"device_map": DEVICE} if cuda else {})).eval()

            def reference_generate(ids, n):
                return reference.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)

            for batch in args.batch:
                rows.append({"engine": f"transformers-{transformers.__version__}", "batch": batch,
                             **measure(reference_generate, batch, args.context, args.steps, 1)})
                print(rows[-1], flush=True)
            del reference
            if cuda:
                torch.cuda.empty_cache()
            continue
        os.environ["GEMMA4_COMPILE"] = "1" if engine == "compile" else "0"
        mode = "graph" if engine == "compile" else engine

        def ours_generate(ids, n, mode=mode):
            return ours.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, decode=mode)

        for batch in args.batch:
            start = time.perf_counter()
            repeat = 1 if engine == "dynamic" else args.repeat
            rows.append({"engine": f"gemma4-{engine}", "batch": batch,
                         **measure(ours_generate, batch, args.context, args.steps, repeat),
                         "wall_s": time.perf_counter() - start})
            print(rows[-1], flush=True)
            if args.profile and cuda and engine in ("graph", "compile"):
                profiles[f"{engine} b{batch}"] = profile(ours, batch, args.context, args.steps)
                print(profiles[f"{engine} b{batch}"], flush=True)
        ours.__dict__.pop("_decode_runners", None)
        if cuda:
            torch.cuda.empty_cache()
    peak = max(load_peak, torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"\n{args.preset} bf16 on {name}, torch {torch.__version__}, context "
          f"{args.context}, {args.steps} steps; peak GPU memory of the run {peak:.1f} GiB")
    for name, p in profiles.items():
        print(f"profile {name}: replay {p['replay_ms']:.3f} ms/step, needs {p['bytes_per_step_GB']:.2f} GB/step -> "
              f"{p['replay_GB_s']:.0f} GB/s; eager step: {p['kernels_per_step']} kernels, "
              f"{p['eager_kernel_ms']:.2f} ms of kernel time")
    print(f"{'engine':<22}{'batch':>6}{'decode tok/s':>14}{'ms/step':>9}{'prefill tok/s':>15}{'TTFT s':>9}")
    for row in rows:
        print(f"{row['engine']:<22}{row['batch']:>6}{row['decode_tok_s']:>14.1f}{row['step_ms']:>9.2f}"
              f"{row['prefill_tok_s']:>15.0f}{row['ttft_s']:>9.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"preset": args.preset, "device": name, "torch": torch.__version__,
                       "rows": rows, "profiles": profiles}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
