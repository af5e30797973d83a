"""The `gemma4` command line. Each subcommand lives in a small function; errors print one line, not a traceback."""

from __future__ import annotations

import argparse
import sys


def cmd_init(args) -> None:
    import torch

    from .random_init import write_random_checkpoint

    dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16}[args.dtype]
    out = write_random_checkpoint(args.preset, args.out, num_layers=args.num_layers, text_only=args.text_only,
                                  dtype=dtype, tokenizer=args.tokenizer, seed=args.seed)
    print(f"wrote a RANDOM-WEIGHT {args.preset} checkpoint to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma4", description="Run Gemma 4 models: generate, chat, serve, bench.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a random-weight checkpoint of an official size (no download)")
    p.add_argument("--preset", required=True, help="E2B, E4B, 26B-A4B or 31B")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-layers", type=int, default=None, help="fewer layers than the official model")
    p.add_argument("--text-only", action="store_true", help="text decoder only, in the Gemma4ForCausalLM layout")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "bfloat16", "fp32", "float32", "fp16", "float16"])
    p.add_argument("--tokenizer", default=None, help="directory whose tokenizer files are copied in")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_init)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, NotImplementedError, OSError) as e:
        print(f"gemma4 {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
