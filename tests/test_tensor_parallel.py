"""Tensor and expert parallelism (src/gemma4/distributed/) with CPU processes over gloo: tiny fp32 checkpoints of
every family split over 2 and 4 ranks give the single-process model's logits and greedy tokens (tolerances:
parallel_support.py; quantized weights: test_tensor_parallel_quantized.py)."""

from __future__ import annotations

import gc
import os
import signal
import time

import pytest
import torch

from parallel_support import ATOL, GREEDY, assert_matches_one_process, config_of, outputs, prompts

from gemma4 import Model, distributed
from gemma4.distributed import RankFailed, ShardingError
from gemma4.llm import LLM
from gemma4.random_init import randomize_

# (family, ranks, expert parallel): E2B has PLE and KV sharing with one KV head (replicated on every rank), 26B-A4B
# MoE with K=V global layers (one KV head) and two sliding KV heads (split by 2, replicated by 4), 31B dense.
CASES = [("E2B", 2, False), ("E2B", 4, False), ("26B-A4B", 2, False), ("26B-A4B", 4, True), ("31B", 2, False),
         ("31B", 4, False)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    paths = {}
    for family in ("E2B", "26B-A4B", "31B"):
        paths[family] = tmp_path_factory.mktemp(family)
        randomize_(Model(config_of(family)), seed=1).save_pretrained(paths[family])
    return paths


@pytest.fixture(scope="module")
def reference(checkpoints):
    """family -> (single-process model, its outputs on `prompts()`)."""
    found = {}
    for family, path in checkpoints.items():
        llm = LLM(path, dtype="float32", device="cpu", max_model_len=256, max_batch_size=4)
        found[family] = llm.model, outputs(llm, prompts())
    return found


@pytest.mark.parametrize("family,size,expert_parallel", CASES, ids=[f"{f}-tp{n}{'-ep' if e else ''}"
                                                                     for f, n, e in CASES])
def test_logits_and_greedy_tokens_equal_one_process(checkpoints, reference, family, size, expert_parallel):
    single, expected = reference[family]
    llm = LLM(checkpoints[family], dtype="float32", device="cpu", max_model_len=256, max_batch_size=4,
              tensor_parallel_size=size, enable_expert_parallel=expert_parallel)
    try:
        assert llm.model.config.text_config.num_attention_heads == 4 // size  # this rank's heads only
        assert_matches_one_process(llm, single, expected)
    finally:
        distributed.shutdown()


def test_prompt_logprobs_equal_one_process(checkpoints, reference):
    """Prompt logprobs over 2 ranks (scored inside the forward, which every rank runs: each slice of positions
    gathers the ranks' vocabulary rows; a prompt longer than score_tokens' 256 positions crosses a slice) equal the
    single process's log-softmax."""
    single, _ = reference["31B"]
    prompt = torch.randint(3, 384, (300,), generator=torch.Generator().manual_seed(5)).tolist()
    llm = LLM(checkpoints["31B"], dtype="float32", device="cpu", max_model_len=512, max_batch_size=2,
              tensor_parallel_size=2)
    try:
        [done] = llm.generate([prompt], dict(GREEDY, max_tokens=0, prompt_logprobs=2))
    finally:
        distributed.shutdown()
    with torch.no_grad():
        want = single(torch.tensor([prompt]))[0, :-1].log_softmax(-1)
    got = torch.tensor([x.logprob for x in done.prompt_logprobs[1:]])
    torch.testing.assert_close(got, want[torch.arange(len(prompt) - 1), prompt[1:]], rtol=0, atol=ATOL)
    assert [[t for t, _ in x.top] for x in done.prompt_logprobs[1:]] == want.topk(2).indices.tolist()


def test_expert_parallel_and_tensor_parallel_experts_agree(checkpoints, reference):
    """26B-A4B over 2 ranks with whole experts per rank (the other flag value than CASES' tp2 run)."""
    single, _ = reference["26B-A4B"]
    model = distributed.load_parallel(checkpoints["26B-A4B"], 2, enable_expert_parallel=True, dtype=torch.float32,
                                      device="cpu")
    try:
        experts = model.model.language_model.layers[0].experts
        assert experts.gate_up_proj.shape[0] == 4 and experts.expert_start == 0  # 8 experts, 4 on rank 0
        ids = torch.randint(3, 384, (3, 11), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(model(ids), single(ids), rtol=0, atol=ATOL)
        with pytest.raises(ValueError, match="outside this model's vocabulary"):  # refused before any rank runs
            model(torch.tensor([[5, 384]]))
        with torch.no_grad():
            torch.testing.assert_close(model(ids[:1]), single(ids[:1]), rtol=0, atol=ATOL)
        # A runtime whose model is gone (an LLM that failed after loading) gives way to the next one.
        first = distributed.current()
        del model
        gc.collect()
        assert first.model is None
        model = distributed.load_parallel(checkpoints["31B"], 2, dtype=torch.float32, device="cpu")
        assert distributed.current() is not first and not first.processes[0].is_alive()
    finally:
        distributed.shutdown()


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_each_rank_reads_only_its_slices(checkpoints, expert_parallel):
    """Loading rank 1 of 2 (no process group needed to load): every cut weight equals its part of the whole one and
    owns only that part's bytes (read as a slice, not read whole and narrowed)."""
    from gemma4.distributed import Ranks, ShardPlan
    from gemma4.loading import load_model

    path, config = checkpoints["26B-A4B"], config_of("26B-A4B")
    whole = dict(load_model(path, dtype=torch.float32, device="cpu").named_parameters())
    plan = ShardPlan(config, Ranks(1, 2), expert_parallel)
    part = load_model(path, dtype=torch.float32, device="cpu", shard=plan)
    specs = plan.specs()
    layer = "model.language_model.layers.2."  # a global layer: 4 query heads, 1 KV head (K=V)
    q, k = layer + "self_attn.q_proj.weight", layer + "self_attn.k_proj.weight"
    assert part.get_parameter(q).shape[0] == whole[q].shape[0] // 2
    assert part.get_parameter(k).shape == whole[k].shape  # the one KV head, replicated
    experts = part.get_parameter(layer + "experts.gate_up_proj").shape
    assert experts == ((4, 64, 64) if expert_parallel else (8, 32, 64))  # 8 experts of width 32: [E, 2W, H]
    for name, tensor in part.named_parameters():
        if name in specs:
            dim, ranges = specs[name]
            want = torch.cat([whole[name].narrow(dim, a, b - a) for a, b in ranges], dim)
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        else:
            want = whole[name]
        assert torch.equal(tensor, want), name
    # The same cut applied in place to a loaded model (shard_model_ after construction).
    cut = distributed.shard_model_(load_model(path, dtype=torch.float32, device="cpu"), plan)
    assert {n: type(m) for n, m in cut.named_modules()} == {n: type(m) for n, m in part.named_modules()}
    for name, tensor in part.named_parameters():
        assert torch.equal(cut.get_parameter(name), tensor), name


def test_sizes_that_do_not_divide_fail_before_loading(checkpoints):
    with pytest.raises(ShardingError, match="num_attention_heads"):
        LLM(checkpoints["31B"], dtype="float32", device="cpu", tensor_parallel_size=3)
    with pytest.raises(ShardingError, match="num_experts"):  # 8 experts over 16 ranks (heads fail too)
        distributed.check_shardable(config_of("26B-A4B"), 16, expert_parallel=True)
    assert distributed.current() is None  # nothing was started


def test_a_rank_that_dies_stops_the_engine_without_a_hang(checkpoints):
    threads = torch.get_num_threads()
    llm = LLM(checkpoints["31B"], dtype="float32", device="cpu", max_model_len=256, max_batch_size=4,
              tensor_parallel_size=2)
    runtime = distributed.current()
    try:
        assert llm.generate([[5, 6, 7]], GREEDY)[0].token_ids
        os.kill(runtime.processes[0].pid, signal.SIGKILL)
        runtime.processes[0].join(timeout=10)
        start = time.monotonic()
        with pytest.raises(RankFailed, match="rank 1 ended"):
            llm.generate([[5, 6, 7]], GREEDY)
        assert time.monotonic() - start < 10
    finally:
        distributed.shutdown()
    assert distributed.current() is None
    assert torch.get_num_threads() == threads  # CPU ranks share the cores only while they run


def test_server_answers_as_one_process_and_reports_a_dead_rank(tmp_path, gemma4_tokenizer_dir):
    """`gemma4 serve --tensor-parallel-size 2`: greedy completions equal the single-process LLM's; a rank killed
    while the server idles makes /health 503 and new requests fail, without a hang."""
    import httpx2 as httpx
    from test_server_support import Server, serve_args, write_checkpoint

    from gemma4.server.cli import build_app_from_args

    write_checkpoint(tmp_path, gemma4_tokenizer_dir)
    prompts = [[2, 100, 200, 300], [2] + list(range(500, 540))]
    single = LLM(tmp_path, dtype="float32", device="cpu", max_model_len=1024, max_batch_size=4)
    expected = [r.text for r in single.generate(prompts, dict(temperature=0.0, max_tokens=8, ignore_eos=True))]
    server = Server(build_app_from_args(serve_args(tmp_path, "--tensor-parallel-size", "2")))
    runtime = distributed.current()
    try:
        client = server.client(timeout=60)
        for prompt, want in zip(prompts, expected):
            got = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert got.choices[0].text == want
        os.kill(runtime.processes[0].pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/health").status_code == 200:
            assert time.monotonic() < deadline, "/health still ok 10 s after a rank died"
            time.sleep(0.2)
        assert "rank 1 ended" in httpx.get(f"{server.url}/health").json()["message"]
        with pytest.raises(Exception):
            client.completions.create(model="tiny", prompt=prompts[0], max_tokens=4)
    finally:
        server.stop()
        distributed.shutdown()


def test_fused_projections_are_refused_in_place(checkpoints):
    """shard_model_ on a model whose q/k/v are already fused (their weights are views of the fused one) says so; the
    loader cuts before it fuses."""
    from gemma4.distributed import Ranks, ShardPlan

    model = Model.from_pretrained(checkpoints["31B"], dtype=torch.float32, device="cpu").fuse_projections_()
    with pytest.raises(ShardingError, match="before fuse_projections_"):
        distributed.shard_model_(model, ShardPlan(config_of("31B"), Ranks(0, 2)))


def test_torchrun_serves_over_two_ranks(tmp_path, gemma4_tokenizer_dir):
    """`torchrun -m gemma4.distributed serve`: the multi-host entry, here as 2 CPU ranks of one host."""
    import subprocess
    import sys

    import httpx2 as httpx
    from test_server_support import write_checkpoint

    from gemma4.distributed.groups import free_port

    write_checkpoint(tmp_path, gemma4_tokenizer_dir)
    prompt = [2, 100, 200, 300]
    single = LLM(tmp_path, dtype="float32", device="cpu", max_model_len=512, max_batch_size=4)
    want = single.generate([prompt], dict(temperature=0.0, max_tokens=8, ignore_eos=True))[0].text
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "gemma4.distributed", "serve", str(tmp_path), "--tensor-parallel-size", "2",
               "--device", "cpu", "--dtype", "fp32", "--max-model-len", "512", "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "torchrun's server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        body = {"model": str(tmp_path), "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        got = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()
        assert got["choices"][0]["text"] == want
    finally:
        process.terminate()
        process.wait(timeout=30)
