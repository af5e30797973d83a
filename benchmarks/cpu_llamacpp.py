"""gemma4 against llama.cpp (through llama-cpp-python) on this machine's CPU: the same Gemma 4 checkpoint, the same
prompt length, greedy decoding that ignores EOS; prefill tok/s, decode tok/s and peak RSS of each engine.

    pip install llama-cpp-python gguf
    python benchmarks/cpu_llamacpp.py --checkpoint /path/to/e2b-bf16 [--prompt-tokens 128 --new-tokens 64]

`--checkpoint` is a bf16 Gemma 4 checkpoint in the Hugging Face layout (e.g. `gemma4 init --preset E2B --out DIR
--tokenizer TOKENIZER_DIR`: it needs the tokenizer files, which the GGUF embeds). It is converted once, by llama.cpp's
own `convert_hf_to_gguf.py`, to a 16-bit GGUF (`--base-type`, bf16 by default: lossless from a bf16 checkpoint), and
that is quantized to Q4_0 by `llama_cpp.llama_model_quantize`, as `llama-quantize` does; both are cached in
`--gguf-dir` (default: a `<checkpoint name>-gguf` folder beside the checkpoint) and reused.

The converter comes from the llama.cpp source tree of the installed llama-cpp-python version: `--llama-cpp-src DIR`
or `$LLAMA_CPP_SRC` (a llama.cpp checkout, or an unpacked llama-cpp-python sdist), else the sdist of that version is
fetched once with `pip download` into `--cache-dir` and its `vendor/llama.cpp` used. It runs with its own gguf-py.

Each engine runs in its own process, so each peak RSS (VmHWM: the most resident memory the process ever held, file
pages of mmap'd weights included) is that engine's alone. Threads: the cores this process may run on
(gemma4.threads.available_cores: the affinity mask, capped by a container's CPU quota), for llama.cpp's prefill and
decode and for torch.

Timing, best of `--repeats` runs after one short warm-up run (`--rounds R`: the engines run in turn R times, each time
in a new process, and each reports its best round: this machine's memory bandwidth drifts by 10-20% over minutes, which
otherwise favours whichever engine ran in the faster minutes):
* llama.cpp: one run = eval the prompt in one call (n_batch 512), argmax the last logits (prefill, = time to first
  token), then `new_tokens - 1` single-token evals each followed by an argmax (decode).
* gemma4: the checkpoint quantized as `quantization=` quantizes on load, saved once beside it
  (`<checkpoint>-gemma4-int4`, compressed-tensors) and loaded from there with the same `quantization=` (which on the
  CPU also quantizes the tied LM head); `LLM.generate` on token ids, greedy, ignore_eos, prefix caching off (each run
  re-does the prefill):
  prefill = a `max_tokens=1` call (time to first token), decode = (a `max_tokens=new_tokens` call - that call) over
  `new_tokens - 1` tokens.

Quantization recipes (`--llamacpp-types`): `q4_0` is llama.cpp's default Q4_0 recipe, what `llama-quantize ... Q4_0`
gives: 2-D weights Q4_0, but the tied token embedding (the output layer of Gemma) and the per-layer-embedding table
Q6_K, norms F32, per_layer_model_proj kept 16-bit; `q4_0-pure` makes every quantizable tensor Q4_0 (`--pure`);
`bf16`/`f16` are the 16-bit GGUF itself. The tensor types of each file are listed in the JSON.

"other load, cores" in the table is the CPU time other processes took while an engine ran, in cores: figures taken
beside other work (anything but ~0) are not comparable. llama.cpp runs with flash attention on, which its own default
(auto) picks on the CPU (llama-cpp-python's `Llama` turns it off unless asked). Checkpoints cut to fewer layers
(`gemma4 init --num-layers`) convert and run as long as they share no KV (llama.cpp takes a KV-shared layer's cache
from the last two unshared layers, which must be sliding then full, as in the official E2B and E4B).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from gemma4.threads import available_cores

GiB = 2**30
BOS = 2  # Gemma's <bos>
LLAMACPP_TYPES = ("q4_0", "q4_0-pure", "bf16", "f16")
GEMMA4_QUANTIZATIONS = ("int4", "int8", "fp8", "none")


# --------------------------------------------------------------------------------------------------------------------
# Machine and versions


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True).stdout.strip()
        return head + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_flags() -> str:
    """The vector extensions that matter to int4/bf16 kernels, as /proc/cpuinfo names them."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""
    present = set(flags.split(":", 1)[1].split())
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                    if f in present)


def machine() -> dict:
    import torch
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "threads": available_cores(),
            "logical_cpus": os.cpu_count(),
            "ram_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB, 1),
            "torch": torch.__version__, "llama_cpp_python": version("llama-cpp-python"),
            "gemma4": version("gemma4"), "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "git_commit": git_commit()}


# --------------------------------------------------------------------------------------------------------------------
# GGUF files: llama.cpp's converter, then its quantizer


def llama_cpp_src(explicit: str | None, cache_dir: Path) -> Path:
    """The llama.cpp source tree whose convert_hf_to_gguf.py converts the checkpoint."""
    for given in (explicit, os.environ.get("LLAMA_CPP_SRC")):
        if not given:
            continue
        for tree in (Path(given), Path(given, "vendor", "llama.cpp")):
            if (tree / "convert_hf_to_gguf.py").is_file():
                return tree
        raise SystemExit(f"no convert_hf_to_gguf.py in {given} (nor in its vendor/llama.cpp)")
    wanted = version("llama-cpp-python")
    if wanted is None:
        raise SystemExit("llama-cpp-python is not installed: pip install llama-cpp-python")
    tree = cache_dir / f"llama_cpp_python-{wanted}" / "vendor" / "llama.cpp"
    if not (tree / "convert_hf_to_gguf.py").is_file():
        # The converter ships in the sdist (vendor/llama.cpp), not in the installed wheel: fetch the same version's.
        cache_dir.mkdir(parents=True, exist_ok=True)
        print(f"fetching the llama-cpp-python {wanted} sdist for llama.cpp's converter into {cache_dir}",
              file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d",
                        str(cache_dir), f"llama-cpp-python=={wanted}"], check=True)
        with tarfile.open(cache_dir / f"llama_cpp_python-{wanted}.tar.gz") as sdist:
            sdist.extractall(cache_dir, filter="data")
    return tree


def converter_input(checkpoint: Path, staging: Path) -> Path:
    """The directory to hand the converter. llama.cpp sizes the vocabulary from the tokenizer's token list and
    refuses a token_embd with fewer rows; the project's test tokenizer (../shared/tokenizer: Gemma 3's, renamed)
    carries one added token past the model's 262,144 rows (<image_soft_token>, id 262144), which the released Gemma 4
    tokenizer does not. Such tokens are left out of a copy of tokenizer.json, beside links to the other files."""
    config = json.loads((checkpoint / "config.json").read_text())
    vocab = config.get("text_config", config)["vocab_size"]
    tokenizer_file = checkpoint / "tokenizer.json"
    if not tokenizer_file.is_file():
        return checkpoint
    tokenizer = json.loads(tokenizer_file.read_text())
    beyond = [t for t in tokenizer.get("added_tokens", []) if t["id"] >= vocab]
    if not beyond:
        return checkpoint
    print(f"leaving out tokenizer tokens past the model's {vocab} embedding rows for the converter: "
          f"{', '.join(t['content'] for t in beyond)}", file=sys.stderr)
    staging.mkdir(parents=True, exist_ok=True)
    for item in checkpoint.iterdir():
        if item.name != "tokenizer.json" and not (staging / item.name).exists():
            (staging / item.name).symlink_to(item.resolve())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["id"] < vocab]
    (staging / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    return staging


def convert(checkpoint: Path, out: Path, outtype: str, src: Path) -> None:
    """checkpoint -> 16-bit GGUF with llama.cpp's converter (text decoder only: it leaves out the vision and audio
    towers of a multimodal checkpoint). Its log goes beside the file."""
    partial = out.with_name(out.name + ".partial")
    log = out.with_name(out.name + ".convert.log")
    staging = out.with_name(out.name + ".input")
    source = converter_input(checkpoint, staging)
    print(f"converting {source} -> {out} with {src / 'convert_hf_to_gguf.py'} (log: {log})", file=sys.stderr)
    with open(log, "w") as sink:
        done = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(source),
                               "--outtype", outtype, "--outfile", str(partial)], stdout=sink, stderr=subprocess.STDOUT)
    if source == staging:
        shutil.rmtree(staging)
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"convert_hf_to_gguf.py failed ({done.returncode}):\n" + "\n".join(tail))
    partial.rename(out)


def quantize_q4_0(source: Path, out: Path, pure: bool) -> None:
    """16-bit GGUF -> Q4_0 through libllama's quantizer (llama-quantize's code), in a child process: it loads no
    model but holds tensors while it works."""
    print(f"quantizing {source} -> {out} (Q4_0{', pure' if pure else ''})", file=sys.stderr)
    partial = out.with_name(out.name + ".partial")
    code = ("import ctypes, sys, llama_cpp\n"
            "p = llama_cpp.llama_model_quantize_default_params()\n"
            "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0\n"
            f"p.nthread = {available_cores()}\n"
            f"p.pure = {pure}\n"
            "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))\n")
    done = subprocess.run([sys.executable, "-c", code, str(source), str(partial)])
    if done.returncode != 0:
        raise SystemExit(f"llama_model_quantize failed ({done.returncode})")
    partial.rename(out)


def gguf_summary(path: Path) -> dict:
    """Tensor types of a GGUF: how many tensors and bytes per type, and the types of the large embedding tables."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    count, nbytes, named = collections.Counter(), collections.Counter(), {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        count[kind] += 1
        nbytes[kind] += int(tensor.n_bytes)
        if tensor.name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
            named[tensor.name] = kind
    return {"file_gb": round(path.stat().st_size / GiB, 3),
            "types": {kind: {"tensors": count[kind], "gb": round(nbytes[kind] / GiB, 3)} for kind in count},
            "embedding_types": named, "has_output_weight": "output.weight" in named}


def gguf_dir(args) -> Path:
    checkpoint = args.checkpoint.resolve()
    return (args.gguf_dir or checkpoint.parent / f"{checkpoint.name}-gguf").resolve()


def gguf_files(args, wanted: list[str]) -> dict[str, Path]:
    """kind -> its GGUF file, made if missing: 16-bit ones by the converter, Q4_0 ones from the --base-type file."""
    out_dir = gguf_dir(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint.resolve()
    paths = {kind: out_dir / f"{checkpoint.name}-{kind}.gguf" for kind in [*wanted, args.base_type]}

    def sixteen_bit(kind: str) -> None:
        if not paths[kind].is_file():
            convert(checkpoint, paths[kind], kind, llama_cpp_src(args.llama_cpp_src, args.cache_dir))

    for kind in wanted:
        if paths[kind].is_file():
            continue
        if kind in ("bf16", "f16"):
            sixteen_bit(kind)
        else:
            sixteen_bit(args.base_type)
            quantize_q4_0(paths[args.base_type], paths[kind], pure=kind == "q4_0-pure")
    return {kind: paths[kind] for kind in wanted}


# --------------------------------------------------------------------------------------------------------------------
# The measurements, each engine in a child process


def memory_of_this_process() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024 / GiB  # kB
    return {"peak_rss_gb": round(fields["VmHWM"], 3), "rss_loaded_gb": round(fields["VmRSS"], 3)}


def figures(spec: dict, prefill_s: list[float], decode_s: list[float]) -> dict:
    """Best of the repeats: the least disturbed run on a machine that may have other work."""
    prompt, new = spec["prompt_tokens"], spec["new_tokens"]
    return {"prefill_tok_s": round(prompt / min(prefill_s), 2), "decode_tok_s": round((new - 1) / min(decode_s), 2),
            "prefill_s": [round(s, 4) for s in prefill_s], "decode_s": [round(s, 4) for s in decode_s]}


def run_llamacpp(spec: dict) -> dict:
    import llama_cpp
    import numpy as np

    n = spec["threads"]
    start = time.perf_counter()
    llm = llama_cpp.Llama(spec["gguf"], n_ctx=spec["prompt_tokens"] + spec["new_tokens"], n_threads=n,
                          n_threads_batch=n, flash_attn=spec["flash_attn"], verbose=spec["verbose"])
    load_s = time.perf_counter() - start
    vocab = llm.n_vocab()

    def argmax() -> int:  # greedy over the last position's logits, read in place
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(vocab,)).argmax())

    def once(prompt: list[int], new: int) -> tuple[float, float, list[int]]:
        llm.reset()  # position 0: the next eval drops the whole KV cache first
        begin = time.perf_counter()
        llm.eval(prompt)
        tokens = [argmax()]
        first = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([tokens[-1]])
            tokens.append(argmax())
        return first - begin, time.perf_counter() - first, tokens

    once(spec["prompt"][:16], 4)  # warm-up: buffers, the thread pool
    runs = [once(spec["prompt"], spec["new_tokens"]) for _ in range(spec["repeats"])]
    return {**figures(spec, [r[0] for r in runs], [r[1] for r in runs]), "load_s": round(load_s, 2),
            "tokens": runs[-1][2], "n_vocab": vocab, **memory_of_this_process()}  # while the model is loaded


def quantized_checkpoint(checkpoint: Path, quantization: str) -> Path:
    """The same weights quantized as gemma4 quantizes on load, saved once beside the checkpoint (compressed-tensors, as
    the quantized checkpoints users download): the timed process loads that, as llama.cpp loads its Q4_0 file, so
    its peak memory is that of running the model, not of quantizing it. `none`: the checkpoint itself."""
    if quantization == "none":
        return checkpoint
    out = checkpoint.with_name(f"{checkpoint.name}-gemma4-{quantization}")
    if not (out / "config.json").is_file():
        print(f"quantizing {checkpoint} to {quantization} once, into {out} ...", file=sys.stderr)
        code = ("import sys, shutil, pathlib; from gemma4.loading import load_model, save_model; "
                "src, out, q = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]; "
                "save_model(load_model(src, device='cpu', quantization=q), out); "
                "[shutil.copy(f, out / f.name) for f in src.iterdir() if f.name.startswith('tokenizer') "
                "or f.suffix == '.jinja' or f.name in ('generation_config.json', 'special_tokens_map.json')]")
        subprocess.run([sys.executable, "-c", code, str(checkpoint), str(out), quantization], check=True)
    return out


def run_gemma4(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from gemma4 import LLM, SamplingParams

    quantization = None if spec["quantization"] == "none" else spec["quantization"]
    start = time.perf_counter()
    # One sequence, a context of exactly prompt + new tokens, no prefix cache: each run re-does the prefill.
    llm = LLM(spec["checkpoint"], device="cpu", quantization=quantization, max_batch_size=1,
              max_model_len=spec["prompt_tokens"] + spec["new_tokens"], enable_prefix_caching=False)
    load_s = time.perf_counter() - start

    def timed(prompt: list[int], new: int) -> tuple[float, list[int]]:
        params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
        begin = time.perf_counter()
        out = llm.generate([prompt], params)[0]
        seconds = time.perf_counter() - begin
        assert len(out.token_ids) == new, (len(out.token_ids), new)
        return seconds, out.token_ids

    timed(spec["prompt"][:16], 4)  # warm-up
    first, whole, tokens = [], [], []
    for _ in range(spec["repeats"]):
        first.append(timed(spec["prompt"], 1)[0])
        seconds, tokens = timed(spec["prompt"], spec["new_tokens"])
        whole.append(seconds)
    # decode = the rest of a whole run once its first token is out; best whole run less the best first token
    best = figures(spec, first, [min(whole) - min(first)])
    blocks = getattr(llm.engine, "blocks", None)
    return {**best, "whole_s": [round(s, 4) for s in whole], "load_s": round(load_s, 2), "tokens": tokens,
            "kv_pool_gb": round(blocks.nbytes / GiB, 3) if hasattr(blocks, "nbytes") else None,
            "dtype": str(llm.model.dtype).removeprefix("torch."), **memory_of_this_process()}


def child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = (run_llamacpp if spec["engine"] == "llama.cpp" else run_gemma4)(spec)
    except Exception as e:  # reported in the table; the other engines still run
        import traceback
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"[:300], **memory_of_this_process()}
    Path(spec["result"]).write_text(json.dumps(result))


def busy_cpu_seconds() -> float:
    """CPU time every core of the machine spent busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(spec: dict) -> dict:
    name = f"{spec['engine']}-{spec['quantization']}".replace(" ", "-")
    with tempfile.TemporaryDirectory() as workdir:
        spec = {**spec, "result": str(Path(workdir, f"{name}.result.json"))}
        spec_path = Path(workdir, f"{name}.spec.json")
        spec_path.write_text(json.dumps(spec))
        print(f"running {spec['engine']} {spec['quantization']} ...", file=sys.stderr)
        busy, own, begin = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)])
        # Other work on the machine while the engine ran: every core's busy time less the child's own CPU time, as
        # cores kept busy on average (0 on an otherwise idle machine; it competes for the same cores).
        others = (busy_cpu_seconds() - busy) - (children_cpu_seconds() - own)
        load = {"other_load_cores": round(max(others, 0.0) / (time.perf_counter() - begin), 2)}
        result_path = Path(spec["result"])
        if done.returncode != 0 or not result_path.is_file():
            return {"error": f"the child process exited with {done.returncode} (out of memory?)", **load}
        return {**json.loads(result_path.read_text()), **load}


# --------------------------------------------------------------------------------------------------------------------


def best_round(rounds: list[dict]) -> dict:
    """One engine's figures over its rounds: the fastest decode round, with the best prefill of all rounds and the
    largest memory and other load of any; an error if every round failed."""
    done = [r for r in rounds if "error" not in r]
    if not done:
        return rounds[-1]
    best = dict(max(done, key=lambda r: r["decode_tok_s"]))
    best["prefill_tok_s"] = max(r["prefill_tok_s"] for r in done)
    for key in ("peak_rss_gb", "rss_loaded_gb", "other_load_cores"):
        best[key] = max(r[key] for r in done)
    best["decode_tok_s_rounds"] = [r["decode_tok_s"] for r in done]
    return best


def table(info: dict, rows: list[dict], args) -> str:
    lines = [f"{info['cpu']} ({info['cpu_flags']}), {info['threads']} threads (of {info['logical_cpus']} logical "
             f"CPUs), {info['ram_gb']} GiB RAM; torch {info['torch']}, llama-cpp-python {info['llama_cpp_python']}; "
             f"{info['date']}; gemma4 at {info['git_commit']}",
             f"checkpoint {args.checkpoint}; {args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens "
             f"(greedy, EOS ignored), best of {args.repeats} runs in each of {args.rounds} rounds "
             "(the engines in turn)",
             "",
             "| engine | quantization | prompt tokens | prefill tok/s | decode tok/s | peak RSS GB | RSS loaded GB "
             "| other load, cores |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        r = row["result"]
        if "error" in r:
            lines.append(f"| {row['engine']} | {row['quantization']} | {args.prompt_tokens} | failed: {r['error']} "
                         f"| | {r.get('peak_rss_gb', '')} | | {r['other_load_cores']} |")
            continue
        lines.append(f"| {row['engine']} | {row['quantization']} | {args.prompt_tokens} | {r['prefill_tok_s']:,.1f} "
                     f"| {r['decode_tok_s']:,.2f} | {r['peak_rss_gb']:.2f} | {r['rss_loaded_gb']:.2f} "
                     f"| {r['other_load_cores']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help="bf16 Gemma 4 checkpoint directory (Hugging Face layout)")
    parser.add_argument("--gguf-dir", type=Path, help="where the GGUF files are cached (default: "
                        "<checkpoint>-gguf beside the checkpoint)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine; the best is reported")
    parser.add_argument("--rounds", type=int, default=1, help="the engines run in turn this many times (each in a "
                        "new process); each engine's best round is reported")
    parser.add_argument("--llamacpp-types", default="q4_0",
                        help=f"comma-separated, of {', '.join(LLAMACPP_TYPES)} ('' for none)")
    parser.add_argument("--gemma4-quantization", default="int4",
                        help=f"comma-separated, of {', '.join(GEMMA4_QUANTIZATIONS)} (none: the checkpoint's bf16; "
                        "'' for none)")
    parser.add_argument("--base-type", choices=("bf16", "f16"), default="bf16",
                        help="the 16-bit GGUF that Q4_0 is quantized from")
    parser.add_argument("--flash-attn", choices=("on", "off"), default="on",
                        help="llama.cpp's flash attention (llama.cpp's own default, auto, turns it on for the CPU; "
                        "llama-cpp-python's Llama defaults to off)")
    parser.add_argument("--llama-cpp-src", help="llama.cpp source tree with convert_hf_to_gguf.py (default: "
                        "$LLAMA_CPP_SRC, else the installed llama-cpp-python version's sdist, fetched once)")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "gemma4-bench",
                        help="where that sdist is kept")
    parser.add_argument("--seed", type=int, default=0, help="of the prompt's random token ids")
    parser.add_argument("--verbose", action="store_true", help="llama.cpp's own log")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    if args.checkpoint is None or not (args.checkpoint / "config.json").is_file():
        parser.error("--checkpoint must be a checkpoint directory with config.json")
    if args.new_tokens < 2 or args.prompt_tokens < 16 or args.repeats < 1 or args.rounds < 1:
        parser.error("needs --new-tokens >= 2, --prompt-tokens >= 16, --repeats >= 1, --rounds >= 1")
    kinds = [k for k in args.llamacpp_types.split(",") if k]
    quantizations = [q for q in args.gemma4_quantization.split(",") if q]
    if bad := [k for k in kinds if k not in LLAMACPP_TYPES] + [q for q in quantizations
                                                                if q not in GEMMA4_QUANTIZATIONS]:
        parser.error(f"unknown: {', '.join(bad)}")

    import numpy as np

    info = machine()
    paths = gguf_files(args, kinds)
    # The same prompt for every engine: <bos> then random ordinary token ids (random weights: content is moot).
    rng = np.random.default_rng(args.seed)
    prompt = [BOS] + rng.integers(1000, 200_000, args.prompt_tokens - 1).tolist()
    common = {"prompt": prompt, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "threads": available_cores(), "verbose": args.verbose}
    rows = []
    for kind in kinds:
        spec = {**common, "engine": "llama.cpp", "quantization": kind.upper().replace("-PURE", " pure"),
                "gguf": str(paths[kind]), "flash_attn": args.flash_attn == "on"}
        rows.append({"engine": spec["engine"], "quantization": spec["quantization"], "gguf": spec["gguf"],
                     "gguf_summary": gguf_summary(paths[kind]), "flash_attn": spec["flash_attn"], "spec": spec})
    for quantization in quantizations:
        spec = {**common, "engine": "gemma4", "quantization": quantization,
                "checkpoint": str(quantized_checkpoint(args.checkpoint, quantization))}
        rows.append({"engine": "gemma4", "quantization": quantization, "spec": spec})
    # The engines in turn, `rounds` times: a machine whose memory bandwidth drifts over minutes favours none of them.
    for row in rows:
        row["rounds"] = []
    for _ in range(args.rounds):
        for row in rows:
            row["rounds"].append(measure(row["spec"]))
    for row in rows:
        del row["spec"]
        row["result"] = best_round(row["rounds"])
        if row["quantization"] == "none":
            row["quantization"] = f"none ({row['result'].get('dtype', 'checkpoint dtype')})"

    print(table(info, rows, args))
    for row in rows:
        if "gguf_summary" in row:
            s = row["gguf_summary"]
            types = ", ".join(f"{k} {v['tensors']} ({v['gb']} GB)" for k, v in s["types"].items())
            print(f"\n{row['quantization']} GGUF: {s['file_gb']} GB; tensors by type: {types}; embeddings: "
                  f"{s['embedding_types']}", end="")
    print()
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "checkpoint": str(args.checkpoint),
                                         "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                                         "repeats": args.repeats, "rounds": args.rounds, "seed": args.seed,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
