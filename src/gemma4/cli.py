"""The `gemma4` command line. Each subcommand lives in a small function; errors print one line, not a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import sys
import time


def cmd_init(args) -> None:
    from .loading import DTYPES
    from .random_init import write_random_checkpoint

    if args.assistant:
        from .assistant_checkpoint import DRAFTER_LAYERS, write_random_assistant

        if args.quantization or args.text_only or args.tokenizer:
            raise SystemExit("gemma4 init --assistant takes no --quantization, --text-only or --tokenizer")
        out = write_random_assistant(args.preset, args.out, num_layers=args.num_layers or DRAFTER_LAYERS,
                                     dtype=DTYPES[args.dtype], seed=args.seed, device=args.device)
        print(f"wrote a RANDOM-WEIGHT drafter (gemma4_assistant) for {args.preset} to {out}")
        return
    out = write_random_checkpoint(args.preset, args.out, num_layers=args.num_layers, text_only=args.text_only,
                                  dtype=DTYPES[args.dtype], tokenizer=args.tokenizer, seed=args.seed,
                                  device=args.device, quantization=args.quantization)
    kind = f"{args.quantization}-quantized " if args.quantization else ""
    print(f"wrote a RANDOM-WEIGHT {kind}{args.preset} checkpoint to {out}")


def _load_llm(args):
    """The LLM of the model arguments, and the SamplingParams of the sampling ones (unset: the checkpoint's)."""
    from .llm import LLM

    llm = LLM(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer,
              quantization=args.quantization, max_model_len=args.max_model_len,
              gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_dtype=args.kv_cache_dtype)
    values = {"max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "seed": args.seed}
    return llm, llm._params({k: v for k, v in values.items() if v is not None})


def cmd_generate(args) -> None:
    llm, params = _load_llm(args)
    prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    usage: dict = {}
    start = time.perf_counter()
    first = None
    for delta in llm.stream(prompt, params, usage=usage):
        first = first or time.perf_counter()
        print(delta, end="", flush=True)
    end = time.perf_counter()
    new = usage["completion_tokens"]
    # Decode speed over the tokens after the first (the first one's time is the prompt's prefill).
    rate = (new - 1) / (end - first) if first and new > 1 and end > first else float("nan")
    print(f"\n[{usage['prompt_tokens']} prompt tokens, {new} new tokens in {end - start:.2f}s, "
          f"{rate:.1f} tok/s after the first]", file=sys.stderr)


def cmd_chat(args) -> None:
    from .processing.stream_parse import ContentDelta, ReasoningDelta, StreamParser

    llm, params = _load_llm(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    dim, reset = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
    print("gemma4 chat — /reset clears the history, /exit quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        prompt = llm.chat_prompt(history, enable_thinking=args.think)
        parser, answer = StreamParser(prefix=llm.tokenizer.decode(prompt, skip_special_tokens=False)), []
        deltas = llm.stream(prompt, params, skip_special_tokens=False)
        for delta in itertools.chain(deltas, [None]):  # None: the stream is over, the parser hands what it held
            for event in parser.feed(delta) if delta is not None else parser.finish():
                if isinstance(event, ReasoningDelta):
                    print(f"{dim}{event.text}{reset}", end="", flush=True)
                elif isinstance(event, ContentDelta):
                    answer.append(event.text)
                    print(event.text, end="", flush=True)
        print()
        # Thoughts stay out of the history, as the chat template intends.
        history.append({"role": "assistant", "content": "".join(answer)})


def cmd_demo(args) -> None:
    """Random weights of an official size through the whole stack: template, tokenizer, model, sampler, parser. On
    the CPU in int4 (the on-device path: the CPU's int4 kernels, the per-layer table memory-mapped), from a random
    checkpoint written once to the cache; on a GPU in bf16, drawn there in seconds."""
    import os

    import torch

    from .engine.memory import summary
    from .llm import LLM
    from .loading import resolve_device
    from .options import options
    from .random_init import cached_random_checkpoint, random_config, random_model

    tokenizer = args.tokenizer or options().tokenizer_dir or "../shared/tokenizer"
    if not os.path.isfile(os.path.join(tokenizer, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer}; pass --tokenizer DIR")
    device = resolve_device(args.device)
    quantization = {"auto": "int4" if device.type == "cpu" else None, "none": None}.get(args.quantization,
                                                                                      args.quantization)
    described = f"{args.preset}{f' ({args.num_layers} layers)' if args.num_layers else ''}, " \
                f"{quantization or 'bf16'}, RANDOM WEIGHTS"
    start = time.perf_counter()
    if device.type == "cpu":
        print(f"{described}: a checkpoint in {options().cache_dir} (written on the first run: a minute or so "
              "for E2B)...", file=sys.stderr, flush=True)
        path, written = cached_random_checkpoint(args.preset, args.num_layers, quantization)
        print(f"{'wrote' if written else 'reusing'} {path} ({time.perf_counter() - start:.0f}s)", file=sys.stderr)
        start = time.perf_counter()
        llm = LLM(path, device=device, quantization=quantization, tokenizer=tokenizer,
                  max_model_len=args.max_model_len)
    else:
        model = random_model(random_config(args.preset, args.num_layers, text_only=True), torch.bfloat16,
                             device=device, quantization=quantization)
        print(f"built {described} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
        start = time.perf_counter()
        llm = LLM(model, tokenizer=tokenizer, max_model_len=args.max_model_len)
    print(f"engine: {summary(llm.engine, time.perf_counter() - start)}", file=sys.stderr)
    start = time.perf_counter()
    reply = llm.chat([{"role": "user", "content": args.prompt}], params={"max_tokens": args.max_new_tokens, "seed": 0})
    elapsed = time.perf_counter() - start
    print(f"user: {args.prompt}")
    print(f"model (random weights, so this is noise): {reply['content']!r}")
    usage = reply["usage"]
    print(f"[{usage['prompt_tokens']} prompt + {usage['completion_tokens']} new tokens in {elapsed:.1f}s, "
          f"finish_reason={reply['finish_reason']}]", file=sys.stderr)


def cmd_bench(args) -> None:
    import json

    import torch

    from .bench import BenchSpec, bench, table
    if args.device == "auto":  # a GPU; without one, the CPU only when asked (official sizes take hours there)
        args.device = "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA GPU here: gemma4 bench measures on a GPU (--device cpu runs a tiny smoke test)")
    if args.compare == "transformers":
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ValueError("--compare transformers needs transformers==5.24.0 installed") from None
    spec = BenchSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchSpec)})
    mine, theirs = bench(spec, args.compare, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(table(spec, mine, theirs))
    if args.out:
        rows = [{"metric": m, "shape": s, "gemma4": v, "transformers": (theirs or {}).get((m, s))}
                for (m, s), v in mine.items()]
        with open(args.out, "w") as f:
            json.dump({"spec": spec.__dict__, "rows": rows}, f, indent=2)


DEVICE_HELP = "cuda, cpu, or auto: CUDA when present, else the CPU"
QUANTIZATIONS = ["fp8", "int8", "int4"]  # model.quantized.ON_LOAD (not imported here: the CLI starts without torch)
QUANTIZATION_HELP = ("quantize a bf16 checkpoint's decoder weights on load: fp8 or int8 per channel, int4 in groups of "
                     "32 (a compressed-tensors checkpoint loads quantized without it)")
KV_CACHE_DTYPES = ["auto", "fp8"]  # model.paged_cache.KV_CACHE_DTYPES (not imported here, as above)
KV_CACHE_DTYPE_HELP = ("KV cache element type: auto (the model's dtype) or fp8 (e4m3 with a scale per KV head: half "
                       "the bytes, so about twice the context fits)")


def _add_model_arguments(p) -> None:
    p.add_argument("model", help="checkpoint directory or hub id")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16, or auto: the checkpoint's")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS, help=QUANTIZATION_HELP)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (None: the checkpoint's)")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion (None: what fits)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of the GPU's memory for weights, activations and KV cache")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help=KV_CACHE_DTYPE_HELP)
    # Sampling: None takes the checkpoint's generation_config.json.
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="gemma4", description="Run Gemma 4 models: generate, chat, serve, bench.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # --help shows each option's default (every option has a help string, which the formatter extends).
    add = functools.partial(sub.add_parser, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    p = add("init", help="write a random-weight checkpoint of an official size (no download)")
    p.add_argument("--preset", required=True, help="E2B, E4B, 26B-A4B or 31B")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-layers", type=int, default=None, help="fewer layers than the official model")
    p.add_argument("--text-only", action="store_true", help="text decoder only, in the Gemma4ForCausalLM layout")
    p.add_argument("--assistant", action="store_true",
                   help="a drafter for speculative decoding (gemma4_assistant) that fits the preset, instead")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "bfloat16", "fp32", "float32", "fp16", "float16"],
                   help="dtype of the weights written")
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="write the weights quantized, as a compressed-tensors checkpoint")
    p.add_argument("--tokenizer", default=None, help="directory whose tokenizer files are copied in")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (values differ between devices)")
    p.add_argument("--device", default="auto", help="where the weights are drawn: " + DEVICE_HELP)
    p.set_defaults(run=cmd_init)

    p = add("generate", help="stream a completion of a prompt")
    _add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="the text to complete")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    p.set_defaults(run=cmd_generate)

    p = add("chat", help="interactive chat in the terminal")
    _add_model_arguments(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--think", action="store_true", help="enable thinking; thoughts are shown dimmed")
    p.set_defaults(run=cmd_chat)

    p = add("demo", help="random weights of an official size, run through the whole stack")
    p.add_argument("--preset", default="E2B", help="E2B, E4B, 26B-A4B or 31B")
    p.add_argument("--num-layers", type=int, default=None, help="fewer layers than the official model")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (None: $GEMMA4_TOKENIZER_DIR, else ../shared/tokenizer)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--max-model-len", type=int, default=4096, help="context of the engine")
    p.add_argument("--prompt", default="Why is the sky blue?", help="the user's message")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate")
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "int4", "int8", "fp8"],
                   help="weights of the decoder; auto: int4 on the CPU, bf16 (none) on a GPU")
    p.set_defaults(run=cmd_demo)

    from .bench import BenchSpec

    spec = BenchSpec()  # the defaults live there
    p = add("bench", help="speed of an official size with random weights, optionally vs transformers")
    p.add_argument("--preset", default=spec.preset, help="E2B, E4B, 26B-A4B or 31B")
    p.add_argument("--batch", type=int, nargs="*", default=spec.batches, dest="batches", metavar="BATCH",
                   help="decode batch sizes")
    p.add_argument("--context", type=int, default=spec.context, help="prompt tokens before the timed decode steps")
    p.add_argument("--steps", type=int, default=spec.steps, help="timed decode steps")
    p.add_argument("--repeat", type=int, default=spec.repeat, help="best of this many timings")
    p.add_argument("--concurrency", type=int, default=spec.concurrency, help="serving requests at once (0 skips)")
    p.add_argument("--serve-in", type=int, default=spec.serve_in, help="prompt tokens of each serving request")
    p.add_argument("--serve-out", type=int, default=spec.serve_out, help="new tokens of each serving request")
    p.add_argument("--prefill", type=int, nargs="*", default=spec.prefill, help="prompt lengths")
    p.add_argument("--prefill-chunk", type=int, default=spec.prefill_chunk,
                   help="prefill in chunks of this many tokens")
    p.add_argument("--num-layers", type=int, default=spec.num_layers, help="fewer layers than the official model")
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="gemma4's weights quantized on load (the transformers comparison stays bf16)")
    p.add_argument("--kv-cache-dtype", default=spec.kv_cache_dtype, choices=KV_CACHE_DTYPES,
                   help=KV_CACHE_DTYPE_HELP + " (the transformers comparison keeps its own)")
    p.add_argument("--compare", choices=["transformers"], default=None, help="also measure this implementation")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto: CUDA (without a GPU, an error: the CPU "
                   "only when asked)")
    p.add_argument("--speculative", type=int, nargs="?", const=4, default=0, metavar="K",
                   help="measure speculative decoding instead, with K draft tokens (4 when K is left out) from a "
                   "random drafter of the preset's shape")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    p.set_defaults(run=cmd_bench)

    from .server.cli import add_serve_arguments, run_serve

    p = add("serve", help="OpenAI-compatible HTTP server")
    add_serve_arguments(p)
    p.set_defaults(run=run_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .engine.sequence import GenerationError

    try:
        args.run(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, NotImplementedError, OSError, GenerationError) as e:
        print(f"gemma4 {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
