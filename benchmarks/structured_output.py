"""What a structured output's token mask costs per engine step at batch B: the same model and requests with and without
a JSON schema (a free-text string field, the mask llguidance spends most on; random weights almost never close it),
engine steps back to back at steady decode, ms per step; then the mask's two parts alone, medians: llguidance
filling the rows' masks on the host (`structured.fill_masks`) and the samplers' -inf fill on the device
(`sampling.apply_token_masks`). A constrained row is read in the step that sampled it (no run-ahead), which the
step times include.

    python benchmarks/structured_output.py --preset E2B --batch 1 64 --tokenizer ../shared/tokenizer   # a GPU
    python benchmarks/structured_output.py --tiny --batch 1 64 --steps 10                              # a CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gemma4.config import Config
from gemma4.engine.engine import LLMEngine
from gemma4.engine.sampling import SamplingParams, apply_token_masks
from gemma4.engine.structured import StructuredOutputsParams, fill_masks
from gemma4.options import options
from gemma4.processing.tokenizer import Tokenizer
from gemma4.random_init import random_config, random_model

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


def tiny_model(device: str):
    """Gemma's vocabulary on a two-layer model of hidden size 16: the mask's cost, vocabulary-sized, is the same
    as on any size; the forward is nearly free."""
    text = {**Config.preset("31B").text_config.to_dict(), "hidden_size": 16, "intermediate_size": 32,
            "num_attention_heads": 2, "num_key_value_heads": 1, "num_global_key_value_heads": 1, "head_dim": 8,
            "global_head_dim": 16, "num_hidden_layers": 2, "sliding_window": 8, "per_layer_config": None,
            "layer_types": ["sliding_attention", "full_attention"]}
    config = Config.from_dict({"model_type": "gemma4", "text_config": text, "vision_config": None,
                               "audio_config": None})
    return random_model(config, torch.float32, device=device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: torch.device, repeat: int = 20) -> float:
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[2:])


def step_ms(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, steps: int) -> tuple[float, int]:
    """ms per engine step at steady decode, and how many sequences still ran at the end."""
    device = engine.runner.device
    ids = [engine.add_request(p, params) for p in prompts]
    while any(seq.num_cached < len(seq.prompt_ids) for seq in engine.seqs.values()):
        engine.step()  # prefill
    for _ in range(3):
        engine.step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    elapsed = (time.perf_counter() - start) * 1e3 / steps
    running = sum(seq_id in engine.seqs for seq_id in ids)
    for seq_id in ids:
        engine.abort(seq_id, output=False)
    while engine.has_unfinished():
        engine.step()
    return elapsed, running


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="E2B", help="random weights of this official size, bf16 (a GPU)")
    parser.add_argument("--tiny", action="store_true", help="a tiny fp32 model with Gemma's vocabulary instead")
    parser.add_argument("--tokenizer", default=options().tokenizer_dir or "../shared/tokenizer")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    if args.tiny:
        model, name = tiny_model(args.device), "tiny (hidden 16, 2 layers, fp32)"
    else:
        model, name = random_model(random_config(args.preset, None, text_only=True), torch.bfloat16,
                                   device=args.device), f"{args.preset} bf16"
    vocab = model.config.text_config.vocab_size
    free = SamplingParams(max_tokens=args.steps + 20, temperature=1.0, top_p=0.95, top_k=64)
    constrained = SamplingParams(max_tokens=args.steps + 20, temperature=1.0, top_p=0.95, top_k=64,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, random weights, on {where}; JSON schema with a free string; ms per engine step "
          f"({args.steps} steps), mask parts alone (median)")
    print("| batch | free | constrained | difference | host: fill_masks | device: apply_token_masks | running |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch in args.batch:
        engine = LLMEngine(model, max_num_seqs=batch, max_model_len=args.prompt + args.steps + 64,
                           max_num_batched_tokens=max(2048, batch * args.prompt), tokenizer=tokenizer,
                           enable_prefix_caching=False)
        prompts = [torch.randint(300, 200_000, (args.prompt,)).tolist() for _ in range(batch)]
        engine.grammars.compile(constrained.structured_outputs)  # llguidance's tokenizer, once
        free_ms, _ = step_ms(engine, prompts, free, args.steps)
        constrained_ms, running = step_ms(engine, prompts, constrained, args.steps)
        # The mask parts alone, the rows inside the schema's string (the mask with the most tokens).
        matchers = [engine.grammars.matcher(constrained.structured_outputs, engine.stop_token_ids)
                    for _ in range(batch)]
        opening = tokenizer.encode('{"answer":"', add_special_tokens=False)
        for matcher in matchers:
            for token in opening:
                matcher.accept(token)
        fill = median_ms(lambda: fill_masks(matchers, vocab), torch.device("cpu"))
        masks = fill_masks(matchers, vocab).to(device)
        logits = torch.randn(batch, vocab, device=device)
        apply = median_ms(lambda: apply_token_masks(logits, masks), device)
        print(f"| {batch} | {free_ms:.2f} | {constrained_ms:.2f} | {constrained_ms - free_ms:+.2f} | {fill:.2f} | "
              f"{apply:.2f} | {running}/{batch} |")
        del engine


if __name__ == "__main__":
    main()
