"""`gemma4 serve MODEL`: arguments and entry point (cli.py adds the subcommand)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time


from ..cli import KV_CACHE_DTYPE_HELP, KV_CACHE_DTYPES, QUANTIZATIONS, QUANTIZATION_HELP

# Tokens per engine step by default: long prompts prefill in few chunks, and an image of up to 1120 soft tokens fits.
STEP_TOKENS = {"cuda": 8192, "cpu": 2048}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    # Every option has a help string, so that --help (ArgumentDefaultsHelpFormatter) shows its default.
    parser.add_argument("model", help="checkpoint directory (with tokenizer files)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--dtype", default="auto", help="bf16, fp16, fp32, or auto: the checkpoint's")
    parser.add_argument("--device", default="auto", help="cuda, cpu, or auto: CUDA when present, else the CPU")
    parser.add_argument("--quantization", default=None, choices=QUANTIZATIONS, help=QUANTIZATION_HELP)
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + completion, in tokens (None: the longest that fits, at most the "
                             "model's max_position_embeddings)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="token budget of one engine step: the prefill chunk, at least one image's soft tokens "
                             f"(None: {STEP_TOKENS['cuda']} on a GPU, as vLLM's, {STEP_TOKENS['cpu']} on the CPU)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="share of the GPU's memory for weights, activations and KV cache: the KV cache gets "
                             "what the weights and the largest prefill step leave (on the CPU: 4 GiB at most)")
    parser.add_argument("--num-kv-blocks", type=int, default=None,
                        help="KV blocks of 16 tokens for global layers (None: sized from the memory)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help=KV_CACHE_DTYPE_HELP)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the KV cache of prompt prefixes computed before (on by default)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--served-model-name", default=None, help="model id clients use (None: the path)")
    parser.add_argument("--default-enable-thinking", action="store_true", help="think unless a request says not to")
    parser.add_argument("--allowed-media-domains", default="", help="comma-separated hosts media URLs may use")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (None: the model's)")
    parser.add_argument("--allowed-origins", default="*", help="comma-separated CORS origins ('*': any, as vLLM)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds SIGTERM lets requests finish")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="split the model over this many processes of this host, one GPU each (or CPU "
                             "processes); several hosts: torchrun (docs/distributed.md)")
    parser.add_argument("--speculative-model", default=None,
                        help="a drafter checkpoint (gemma4_assistant) that proposes tokens the model verifies "
                             "(speculative decoding: the same outputs, faster at small batches)")
    parser.add_argument("--num-speculative-tokens", type=int, default=None,
                        help="tokens the drafter proposes per decode step (default 4)")
    parser.add_argument("--enable-expert-parallel", action="store_true",
                        help="with --tensor-parallel-size: whole MoE experts per rank instead of every expert split")


def build_app_from_args(args, model=None):
    """The app of `gemma4 serve`, its engine warmed up; prints the start-up summary (stderr). `model`: already loaded
    (a torchrun rank 0's shard: gemma4.distributed.launch), else loaded from args.model."""
    from ..engine.memory import summary
    from ..pretrained import Model
    from ..processing.processor import Processor
    from .app import create_app
    from .state import build_state

    start = time.perf_counter()
    parallel = getattr(args, "tensor_parallel_size", 1)
    if model is not None:
        pass
    elif parallel != 1:
        from ..distributed import load_parallel
        model = load_parallel(args.model, parallel, args.enable_expert_parallel, dtype=args.dtype, device=args.device,
                              quantization=args.quantization)
    else:
        model = Model.from_pretrained(args.model, dtype=args.dtype, device=args.device, quantization=args.quantization)
    processor = Processor.from_pretrained(args.tokenizer or args.model)  # tokenizer + processor_config.json
    step_tokens = args.max_num_batched_tokens or STEP_TOKENS.get(model.device.type, STEP_TOKENS["cpu"])
    state = build_state(model, processor.tokenizer, args.served_model_name or args.model, processor=processor,
                        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=step_tokens, num_blocks=args.num_kv_blocks,
                        kv_cache_dtype=args.kv_cache_dtype, enable_prefix_caching=args.enable_prefix_caching,
                        speculative_model=getattr(args, "speculative_model", None),
                        num_speculative_tokens=getattr(args, "num_speculative_tokens", None),
                        gpu_memory_utilization=args.gpu_memory_utilization, api_key=args.api_key,
                        default_enable_thinking=args.default_enable_thinking,
                        allowed_media_domains=[d.strip() for d in args.allowed_media_domains.lower().split(",")
                                               if d.strip()],
                        allowed_origins=[o.strip() for o in args.allowed_origins.split(",") if o.strip()])
    print(f"gemma4 serve: {summary(state.engine.engine, time.perf_counter() - start)}", file=sys.stderr, flush=True)
    if (runtime := getattr(model, "parallel_runtime", None)) is not None:  # a rank that ends while the engine idles
        from ..distributed import RankFailed
        runtime.on_failure = lambda: state.engine.fail(RankFailed(f"tensor parallelism: {runtime.failed}"))
    return create_app(state)


def run_serve(args, model=None) -> None:
    """Serve until SIGTERM or Ctrl-C, which drain the requests in flight (docs/serving.md) and return; if the engine
    dies (a device error, a rank of a tensor-parallel model gone), exit with status 1, for a supervisor to start a
    fresh process."""
    import uvicorn

    app = build_app_from_args(args, model)
    engine = app.state.server.engine
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    engine.on_fatal = lambda: setattr(server, "should_exit", True)
    # uvicorn drains on SIGTERM, then raises it again for the handler that was there before it: a no-op one lets this
    # function return (status 0) instead of the process dying by the signal.
    main = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None) if main else None
    try:
        server.run()
    finally:
        engine.shutdown()
        from ..distributed import shutdown as stop_ranks
        stop_ranks()  # a tensor-parallel model's other processes, if any
        if main:
            signal.signal(signal.SIGTERM, previous)
    if engine.error is not None:
        raise SystemExit(f"gemma4 serve: the engine stopped ({engine.error!r}); exiting with status 1")
