"""Start-up (issue 29): device "auto" and the checkpoint's dtype by default, the KV cache sized from the memory there
is (a clear error when one sequence cannot fit), the start-up summary, progress bars, --help defaults, --version."""

import argparse
import json
import logging
import shutil

import pytest
import torch

import gemma4
from gemma4 import Config, Model
from gemma4.cli import build_parser, main as cli_main
from gemma4.engine import memory
from gemma4.engine.block_manager import BlockManager
from gemma4.engine.engine import LLMEngine
from gemma4.engine.memory import GiB, kv_budget, kv_bytes, plan_kv
from gemma4.llm import LLM
from gemma4.loading import load_model, resolve_device, save_model
from gemma4.random_init import randomize_
from reference import multimodal_config_dict

GREEDY = {"temperature": 0.0, "max_tokens": 6}


def tiny_model(family: str = "E2B", dtype: torch.dtype = torch.float32, vocab: int | None = None) -> Model:
    data = multimodal_config_dict(family)
    if vocab:  # the real tokenizer's ids
        data["text_config"].update(vocab_size=vocab, vocab_size_per_layer_input=vocab)
    return randomize_(Model(Config.from_dict(data)), seed=1).to(dtype)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory, gemma4_tokenizer_dir):
    """A tiny random checkpoint saved in bfloat16 (its config.json names no dtype), with tokenizer files."""
    path = tmp_path_factory.mktemp("bf16")
    tiny_model(dtype=torch.bfloat16, vocab=262_144).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(gemma4_tokenizer_dir / name, path / name)
    return path


def pool_bytes(engine: LLMEngine) -> int:
    return sum(t.numel() * t.element_size() for t in (*engine.blocks.keys.values(), *engine.blocks.values.values()))


# --- device and dtype ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cuda", [True, False])
def test_auto_device_is_cuda_when_present(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cuda" if cuda else "cpu")


def test_every_entry_point_defaults_to_auto():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("generate", "chat", "serve", "demo", "bench"):
        assert commands[name].get_default("device") == "auto", name
    for name in ("generate", "chat", "serve"):
        assert commands[name].get_default("dtype") == "auto", name
    import inspect
    assert inspect.signature(LLM).parameters["device"].default == "auto"
    assert inspect.signature(Model.from_pretrained).parameters["device"].default == "auto"
    assert inspect.signature(load_model).parameters["device"].default == "auto"


def test_dtype_defaults_to_the_checkpoints_on_the_cpu(bf16_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = Model.from_pretrained(bf16_checkpoint)  # was upcast to fp32 on the CPU
    assert (model.dtype, model.device.type) == (torch.bfloat16, "cpu")
    assert Model.from_pretrained(bf16_checkpoint, dtype="float32").dtype == torch.float32  # fp32 when asked
    # config.json's dtype comes first (the official checkpoints say "bfloat16" there)
    shutil.copytree(bf16_checkpoint, tmp_path / "fp16")
    config = json.loads((tmp_path / "fp16" / "config.json").read_text())
    (tmp_path / "fp16" / "config.json").write_text(json.dumps({**config, "torch_dtype": "float16"}))
    assert Model.from_pretrained(tmp_path / "fp16").dtype == torch.float16


def test_bf16_runs_end_to_end_on_the_cpu(bf16_checkpoint):
    """LLM on a bf16 checkpoint on the CPU, with no dtype or device given: text comes out, greedy is repeatable."""
    llm = LLM(bf16_checkpoint)
    assert (llm.model.dtype, llm.model.device.type) == (torch.bfloat16, "cpu")
    first = llm.generate(["The capital of France is", "Hi"], GREEDY)
    assert [len(c.token_ids) for c in first] == [6, 6] and all(c.text for c in first)
    assert llm.generate("The capital of France is", GREEDY)[0].token_ids == first[0].token_ids
    logits = llm.model(torch.tensor([[2, 10, 20]]))
    assert torch.isfinite(logits).all()


# --- KV sizing -------------------------------------------------------------------------------------------------------
def test_kv_pool_fits_the_budget_and_the_context_is_what_fits():
    model = tiny_model()
    per_block, per_ring = kv_bytes(model.config.text_config, model.dtype, 16)
    budget = 5 * per_ring + 40 * per_block  # rings of 4 sequences (+ trash), then room for ~40 blocks
    engine = LLMEngine(model, max_num_seqs=4, kv_cache_memory=budget)
    assert pool_bytes(engine) <= budget
    limit = model.config.text_config.max_position_embeddings
    assert engine.max_model_len == engine.blocks.num_blocks * 16 - 1 < limit  # one sequence may take every block
    # a budget for more than every sequence at full length: capped at that, and at max_position_embeddings
    roomy = LLMEngine(model, max_num_seqs=2, kv_cache_memory=GiB)
    assert roomy.max_model_len == limit and roomy.blocks.num_blocks == 2 * -(-(limit + 1) // 16)
    # --num-kv-blocks stays an explicit override
    assert LLMEngine(model, max_num_seqs=2, max_model_len=64, num_blocks=30).blocks.num_blocks == 30


def test_official_sizes_on_the_cpu_fit_the_default_budget():
    """16 sequences x max_position_embeddings was 12 GiB of KV for E2B, 332 GiB for 31B; now the CPU's budget."""
    text = Config.preset("E2B").text_config
    length, blocks = plan_kv(text, torch.bfloat16, 16, 16, budget=4 * GiB)
    per_block, per_ring = kv_bytes(text, torch.bfloat16, 16)
    assert length == text.max_position_embeddings and (blocks + 1) * per_block + 17 * per_ring <= 4 * GiB


def test_cpu_budget_is_bounded_by_free_ram(monkeypatch):
    cpu = type("Stub", (), {"device": torch.device("cpu")})()
    monkeypatch.setattr(memory, "free_ram", lambda: 64 * GiB)
    assert kv_budget(cpu, 0.9, 512) == memory.CPU_KV_BYTES
    monkeypatch.setattr(memory, "free_ram", lambda: 2 * GiB)
    assert kv_budget(cpu, 0.9, 512) == GiB


def test_gpu_budget_is_utilization_minus_used_minus_activations(monkeypatch):
    """(utilization x total - used - the largest prefill step's peak), with mem_get_info mocked."""
    gpu = type("Stub", (), {"device": torch.device("cuda", 0)})()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * GiB, 80 * GiB))  # 20 GiB in use
    monkeypatch.setattr(memory, "profile_prefill", lambda model, tokens: tokens * 2**20)  # 1 MiB a token
    assert kv_budget(gpu, 0.9, 2048) == int(0.9 * 80 * GiB) - 20 * GiB - 2 * GiB
    assert kv_budget(gpu, 0.5, 2048) == 40 * GiB - 22 * GiB
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kv_budget(gpu, 1.5, 2048)


def test_profile_prefill_reads_the_peak(monkeypatch):
    """The probe runs one prefill step of the budget's tokens; its peak over what was held is the activation."""
    model = tiny_model()
    ran = []
    real_generate = LLMEngine.generate
    monkeypatch.setattr(LLMEngine, "generate", lambda self, prompts, params: ran.append(len(prompts[0])) or
                        real_generate(self, prompts, params))
    for name, value in {"synchronize": None, "reset_peak_memory_stats": None, "empty_cache": None}.items():
        monkeypatch.setattr(torch.cuda, name, lambda *a, v=value: v)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 100 + 12345)
    assert memory.profile_prefill(model, 300) == 12345 and ran == [300]
    assert memory.profile_prefill(model, 300) == 12345 and ran == [300]  # once per model and size


def test_a_context_that_cannot_fit_is_a_clear_error(bf16_checkpoint, monkeypatch, capsys):
    with pytest.raises(ValueError, match="does not fit"):
        plan_kv(Config.preset("31B").text_config, torch.bfloat16, 16, 16, max_model_len=262_144, budget=20 * GiB)
    with pytest.raises(ValueError, match="no room for the KV cache"):  # the sliding rings alone take it all
        plan_kv(Config.preset("31B").text_config, torch.bfloat16, 64, 16, budget=40 * GiB)
    # through `gemma4 serve`: one line at start-up, no traceback, no server
    monkeypatch.setattr(memory, "CPU_KV_BYTES", 2**20)
    assert cli_main(["serve", str(bf16_checkpoint), "--max-model-len", "4000"]) == 1
    err = capsys.readouterr().err
    assert "gemma4 serve: error: a context of 4000 tokens does not fit" in err and "--max-model-len" in err
    assert "Traceback" not in err


def test_llm_adds_all_requests_or_none(bf16_checkpoint):
    llm = LLM(bf16_checkpoint, max_model_len=64)
    assert llm.engine.max_model_len == 64
    with pytest.raises(ValueError, match="maximum context length of 64"):
        llm.generate(["Hi", "word " * 80], GREEDY)
    assert not llm.engine.has_unfinished()
    assert len(llm.generate("Hi", GREEDY)[0].token_ids) == 6


def test_llm_takes_fewer_sequences_when_16_do_not_fit(bf16_checkpoint, monkeypatch):
    """Each sequence holds sliding-window rings (800 MiB for 31B): LLM halves its default batch until one fits."""
    ring_extra = BlockManager.ring_slots_past_window(0, 16, caching=True)  # the prefix cache's block past the window
    per_block, per_ring = kv_bytes(Config.from_file(bf16_checkpoint).text_config, torch.bfloat16, 16,
                                   ring_extra=ring_extra)
    monkeypatch.setattr(memory, "free_ram", lambda: None)
    # 8 sequences' rings, the prefix cache's 2 and the trash ring; 64 tokens
    monkeypatch.setattr(memory, "CPU_KV_BYTES", 11 * per_ring + 6 * per_block)
    llm = LLM(bf16_checkpoint, max_model_len=64)
    assert llm.max_batch_size == llm.engine.max_num_seqs == 8
    assert len(llm.generate(["Hi"] * 10, GREEDY)) == 10
    with pytest.raises(ValueError, match="no room for the KV cache"):
        LLM(bf16_checkpoint, max_model_len=64, max_batch_size=16)


# --- summary, progress bars, --help, --version -----------------------------------------------------------------------
def test_serve_prints_a_startup_summary(bf16_checkpoint, capsys):
    from gemma4.server.cli import add_serve_arguments, build_app_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    app = build_app_from_args(parser.parse_args([str(bf16_checkpoint), "--max-model-len", "256"]))
    engine = app.state.server.engine
    try:
        err = capsys.readouterr().err
        blocks = engine.engine.blocks.num_blocks
        assert (f"gemma4 serve: device cpu, dtype bfloat16, context 256 tokens, 16 sequences at most, KV cache "
                f"{blocks} blocks of 16 tokens (") in err and "eager decode; ready in" in err
        assert engine.engine.scheduler.budget == 2048  # the CPU's default step (8192 on a GPU): a 1120-token image fits
    finally:
        engine.shutdown()


def test_demo_runs_on_the_cpu_with_no_flags_but_the_tokenizer(gemma4_tokenizer_dir, monkeypatch, capsys, tmp_path):
    """On the CPU the demo runs int4 from a random checkpoint it writes to the cache once and reuses."""
    from gemma4.options import override

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["demo", "--tokenizer", str(gemma4_tokenizer_dir), "--num-layers", "2", "--max-new-tokens", "2"]
    with override(cache_dir=str(tmp_path)):
        assert cli_main(argv) == 0
        first = capsys.readouterr()
        assert cli_main(argv) == 0
        second = capsys.readouterr()
    cached = tmp_path / "random" / "E2B-2layers-int4-seed0-v1"
    assert f"wrote {cached}" in first.err and f"reusing {cached}" in second.err
    assert [p.name for p in (tmp_path / "random").iterdir()] == [cached.name]  # no partial copy left
    assert "E2B (2 layers), int4, RANDOM WEIGHTS" in first.err
    assert "engine: device cpu, dtype bfloat16, context 4096 tokens" in first.err
    assert "model (random weights, so this is noise)" in first.out
    assert first.out == second.out


def test_llm_logs_a_startup_summary(bf16_checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="gemma4.llm"):
        LLM(bf16_checkpoint, max_model_len=128)
    assert "gemma4.LLM: device cpu, dtype bfloat16, context 128 tokens, 16 sequences at most" in caplog.text


def test_progress_bars(tmp_path, capsys):
    model = randomize_(Model(Config.from_dict(multimodal_config_dict("E2B"))), progress=True)
    save_model(model, tmp_path, progress=True)
    load_model(tmp_path, progress=True)
    err = capsys.readouterr().err
    assert all(step in err for step in ("random weights", "writing weights", "loading weights"))
    randomize_(model)  # small: no bar
    assert capsys.readouterr().err == ""


def test_graph_capture_goes_through_every_bucket(monkeypatch):
    from gemma4.engine.graphs import GraphedDecode

    graphed = GraphedDecode.__new__(GraphedDecode)
    graphed.model = type("Stub", (), {"device": torch.device("cuda")})()
    graphed.sizes, graphed.graphs, graphed.usable = [1, 2, 4, 8], {}, True
    monkeypatch.setattr(GraphedDecode, "_capture", lambda self, size: self.graphs.setdefault(size, "graph"))
    graphed.capture_all()
    assert sorted(graphed.graphs) == [1, 2, 4, 8]


def test_help_shows_defaults_everywhere(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        assert sub.formatter_class is argparse.ArgumentDefaultsHelpFormatter, name
        undocumented = [a.dest for a in sub._actions if a.option_strings and a.dest != "help" and not a.help]
        assert not undocumented, (name, undocumented)
    with pytest.raises(SystemExit) as exit:
        cli_main(["serve", "--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0
    assert "(default: 0.9)" in out and "(default: auto)" in out and "(default: 16)" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        cli_main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"gemma4 {gemma4.__version__}"
