"""Speculative decoding over tensor parallelism (distributed/runtime.py: `load_drafter`, `mirror_drafts`) with 2 CPU
ranks over gloo: each rank holds its part of the drafter (sharding.assistant_cut_specs) and reads the target's K/V
from its own pools. Tiny fp32 checkpoints (parallel_support.py) of two families: 31B (K=V global layers; its two
sliding KV heads split over the ranks, its one global KV head replicated; a dense drafter head, vocabulary parallel)
and E4B (KV-shared layers, per-layer inputs, two KV heads split; the clustered drafter head, whole on each rank).

Greedy outputs with speculation equal the single-process ones with and without it, and so do the drafter's own
drafts (speculation is lossless: only the drafts tell a wrong cut of the drafter from a right one); seeded sampled
outputs equal them token for token (over a vocabulary of 64: see that test). Prompts of 5 and 40 tokens together,
then one of 49 that starts with the second (a prefix-cache hit), against a sliding window of 8. A rank that hangs
while loading the drafter ends in RankFailed on rank 0 after the runtime's timeout."""

from __future__ import annotations

import datetime
import threading
import time

import pytest
import torch

from parallel_support import ATOL, config_of, outputs, prompts
from test_speculative import oracle_from, prompts as random_prompts

from gemma4 import Model, distributed
from gemma4.assistant_checkpoint import assistant_config_for, load_assistant, random_assistant, save_assistant
from gemma4.distributed import RankFailed, Ranks, ShardingError
from gemma4.distributed import runtime as runtime_module
from gemma4.engine.sampling import SamplingParams
from gemma4.llm import LLM
from gemma4.random_init import randomize_

FAMILIES = ["31B", "E4B"]
ENGINE = dict(dtype="float32", device="cpu", max_model_len=256, max_batch_size=4)
SPECULATIVE = dict(num_speculative_tokens=3)


def drafter_config(family: str, **text):
    """A small drafter that fits the family's tiny target (`text`: changes to the target's config first); E4B's
    has the clustered head."""
    target = config_of(family).text_config
    for name, value in text.items():
        setattr(target, name, value)
    clustered = family == "E4B"
    head = dict(num_centroids=16, centroid_intermediate_top_k=4) if clustered else {}
    return assistant_config_for(target, num_layers=2, hidden_size=32, intermediate_size=64, clustered=clustered,
                                **head)


def save_checkpoints(root, family: str, **text):
    """(target directory, drafter directory) of the family under `root` (`text`: changes to its text config)."""
    config = config_of(family)
    for name, value in text.items():
        setattr(config.text_config, name, value)
    randomize_(Model(config), seed=1).save_pretrained(root / "target")
    save_assistant(random_assistant(drafter_config(family, **text), dtype=torch.float32, seed=1), root / "drafter")
    return root / "target", root / "drafter"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (target directory, drafter directory)."""
    return {family: save_checkpoints(tmp_path_factory.mktemp(family), family) for family in FAMILIES}


@pytest.fixture(scope="module")
def reference(checkpoints):
    """family -> (one process's `outputs` without a drafter, with it, and its drafter's drafts meanwhile)."""
    found = {}
    for family, (target, drafter) in checkpoints.items():
        plain = outputs(LLM(target, **ENGINE), prompts())
        llm = LLM(target, speculative_model=drafter, **SPECULATIVE, **ENGINE)
        drafts = recorded_drafts(llm)
        found[family] = plain, outputs(llm, prompts()), drafts
    return found


@pytest.fixture(params=FAMILIES)
def parallel(request, checkpoints):
    """(family, an LLM over 2 ranks with the family's drafter), shut down after the test (one runtime at a time)."""
    target, drafter = checkpoints[request.param]
    llm = LLM(target, tensor_parallel_size=2, speculative_model=drafter, **SPECULATIVE, **ENGINE)
    try:
        yield request.param, llm
    finally:
        distributed.shutdown()


def recorded_drafts(llm: LLM) -> list[list[list[int]]]:
    """The drafts of every drafting round of `llm` from now on (Speculator.draft's rows)."""
    rounds, draft = [], llm.engine.speculator.draft

    def recording(seqs, ks):
        rows, probs = draft(seqs, ks)
        rounds.append(rows)
        return rows, probs

    llm.engine.speculator.draft = recording
    return rounds


def assert_same_outputs(got, expected) -> None:
    """Equal greedy tokens, logprobs within parallel_support's tolerance."""
    for (got_ids, got_logprobs), (want_ids, want_logprobs) in zip(got, expected):
        assert got_ids == want_ids
        torch.testing.assert_close(torch.tensor(got_logprobs), torch.tensor(want_logprobs), rtol=0, atol=ATOL)


def test_greedy_outputs_and_drafts_equal_one_process(parallel, reference):
    family, llm = parallel
    plain, speculative, single_drafts = reference[family]
    drafter = llm.engine.speculator.drafter
    assert drafter.config.text_config.num_attention_heads == 2  # this rank's query heads only
    assert (drafter.lm_head_weight.shape[0] == 384) == (family == "E4B")  # the clustered head stays whole
    drafts = recorded_drafts(llm)
    got = outputs(llm, prompts())
    assert_same_outputs(got, plain)
    assert_same_outputs(got, speculative)
    assert drafts == single_drafts and len(drafts) > 2  # the drafter's own proposals, round for round
    spec = llm.engine.speculator
    # Drafts that are often right (a noisy oracle: the target's own tokens, some replaced): runs of accepted tokens,
    # and rejected drafts' K/V left in every rank's rings and blocks past num_cached.
    spec.oracle = oracle_from({tuple(p): ids for p, (ids, _) in zip(prompts(), plain)}, noise=0.3)
    spec.num_drafted = spec.num_accepted = 0
    try:
        assert_same_outputs(outputs(llm, prompts()), plain)
    finally:
        spec.oracle = None
    assert 0 < spec.num_accepted < spec.num_drafted
    assert llm.engine.blocks.hit_tokens > 0 and llm.engine.blocks.usage == 0


def test_sampled_and_penalized_rows_verify_together(parallel, checkpoints):
    """Seeded and unseeded sampled rows beside a greedy one under penalties (the general acceptance path): the
    drafts of sampled rows are drawn on rank 0 while every rank runs each drafting step. All finish, without a hang;
    the greedy row gives one process's tokens without a drafter."""
    family, llm = parallel
    batch = random_prompts([40, 23, 17, 31], seed=11)
    params = [SamplingParams(max_tokens=12, stop_token_ids=[], **rule) for rule in (
        dict(temperature=0.8, top_k=20, top_p=0.9, seed=3, frequency_penalty=0.3),
        dict(temperature=1.2, min_p=0.05, logprobs=1),
        dict(temperature=0, repetition_penalty=1.6, presence_penalty=0.5, logprobs=2),
        dict(temperature=1.0, seed=4))]
    spec = llm.engine.speculator
    spec.num_drafted = 0
    results = llm.generate(batch, params)
    assert [len(r.token_ids) for r in results] == [12] * 4 and spec.num_drafted > 0
    single = LLM(checkpoints[family][0], **ENGINE).generate([batch[2]], params[2])[0]
    assert results[2].token_ids == single.token_ids
    assert llm.engine.blocks.usage == 0


# Seeded sampling with the cut-offs of Gemma 4's generation_config, a seed per prompt; over a vocabulary of 64, where
# top-k 64 keeps every token (see the test).
SAMPLED = [SamplingParams(temperature=1.0, top_p=0.95, top_k=64, seed=seed, max_tokens=16, stop_token_ids=[],
                          logprobs=1) for seed in (5, 6, 7)]
SMALL_VOCAB = 64


@pytest.fixture(scope="module")
def small_vocabulary(tmp_path_factory):
    """family -> (target directory, drafter directory) over a vocabulary of SMALL_VOCAB tokens."""
    return {family: save_checkpoints(tmp_path_factory.mktemp(f"{family}-small"), family, vocab_size=SMALL_VOCAB,
                                     vocab_size_per_layer_input=SMALL_VOCAB) for family in FAMILIES}


def sampled_outputs(llm: LLM):
    """(`outputs` under SAMPLED of `prompts()` within SMALL_VOCAB, the drafts of every round and the distributions
    [B, V] they were drawn from, one per drafting step; the drafts accepted)."""
    spec, rounds = llm.engine.speculator, []
    draft = spec.draft

    def recording(seqs, ks):
        rows, probs = draft(seqs, ks)
        rounds.append((rows, torch.stack([step.prob_at(None) for step in probs])))
        return rows, probs

    spec.draft = recording
    batch = [[3 + token % (SMALL_VOCAB - 3) for token in prompt] for prompt in prompts()]
    results = llm.generate(batch[:2], SAMPLED[:2]) + llm.generate(batch[2:], SAMPLED[2:])
    return [(r.token_ids, [lp.logprob for lp in r.logprobs]) for r in results], rounds, spec.num_accepted


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_sampled_outputs_equal_one_process(small_vocabulary, family):
    """Seeded sampled rows with the drafter: one process's tokens, token for token, its drafts and their
    distributions. Sampled outputs depend on the drafts (unlike greedy ones), so this checks the drafter's cut too.

    Rank 0 alone draws (drafts, acceptance tests, last tokens) with the same seeded generators; the ranks change only
    the fp32 logits, by the summation order (<= 1.1e-5). A draw is the argmax of p / E over the candidates, one
    E ~ Exp(1) per candidate column. Where top-k picks the candidates (the 384-token configs), the columns go from
    the most likely, so two tokens whose logits lie within 1e-5 swap columns, and E's: there, Gaussian noise of 1e-5
    (E4B) or 1e-4 (31B) on the logits changed these outputs. Over 64 tokens top-k 64 keeps all, the columns are the
    token ids, and they stayed the same under noise of 1e-3 (and 1e-2 for 31B)."""
    target, drafter = small_vocabulary[family]
    # Three snapshot rings: the first two sequences' ends take two (at 16 and 48), the third prompt starts from the
    # second's prompt at 32.
    engine = {**ENGINE, "max_batch_size": 12}
    want, want_drafts, want_accepted = sampled_outputs(LLM(target, speculative_model=drafter, **SPECULATIVE,
                                                           **engine))
    llm = LLM(target, tensor_parallel_size=2, speculative_model=drafter, **SPECULATIVE, **engine)
    try:
        got, drafts, accepted = sampled_outputs(llm)
        assert llm.engine.blocks.usage == 0 and llm.engine.blocks.hit_tokens > 0
    finally:
        distributed.shutdown()
    assert_same_outputs(got, want)
    assert [rows for rows, _ in drafts] == [rows for rows, _ in want_drafts] and accepted == want_accepted > 0
    for (_, q), (_, want_q) in zip(drafts, want_drafts):  # 3.6e-7 apart at most, measured
        torch.testing.assert_close(q, want_q, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_rank_reads_only_its_drafter_slices(checkpoints, family):
    """Rank 1 of 2 (no process group needed to load): each cut tensor is its part of the whole drafter and owns
    only that part's bytes (read as a slice); the rest is the whole tensor."""
    from gemma4.distributed.sharding import assistant_cut_specs

    path = checkpoints[family][1]
    whole = dict(load_assistant(path, dtype=torch.float32, device="cpu").named_parameters())
    part = load_assistant(path, dtype=torch.float32, device="cpu", ranks=Ranks(1, 2))
    specs = assistant_cut_specs(drafter_config(family), Ranks(1, 2))
    assert ("model.embed_tokens.weight" in specs) == (family == "31B")  # the dense head is vocabulary parallel
    for name, tensor in part.named_parameters():
        if name in specs:
            dim, ((a, b),) = specs[name]
            want = whole[name].narrow(dim, a, b - a)
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        else:
            want = whole[name]
        assert torch.equal(tensor, want), name
    attention = part.model.layers[0].self_attn
    assert (attention.num_heads, attention.q_proj.out_features) == (2, 2 * attention.head_dim)


def test_a_drafter_that_the_size_cannot_cut_fails_before_loading(checkpoints, tmp_path):
    """A drafter of 2 query heads over 4 ranks (its target takes 4): a ShardingError naming the drafter's heads
    before any rank starts."""
    target, _ = checkpoints["31B"]
    save_assistant(random_assistant(drafter_config("31B", num_attention_heads=2), dtype=torch.float32),
                   tmp_path / "drafter")
    with pytest.raises(ShardingError, match=r"num_attention_heads \(2\) of the drafter"):
        LLM(target, tensor_parallel_size=4, speculative_model=tmp_path / "drafter", **ENGINE)
    assert distributed.current() is None  # nothing was started


def test_serve_with_a_drafter_over_two_ranks(tmp_path, gemma4_tokenizer_dir):
    """`gemma4 serve --tensor-parallel-size 2 --speculative-model`: each rank loads its part of the drafter with the
    engine; greedy completions equal one process's without a drafter, in runs of accepted drafts (the target's own
    tokens, from a second engine on the same ranks)."""
    from test_server_speculative import drafter, greedy_oracle
    from test_server_support import Server, serve_args, write_checkpoint

    from gemma4.server.cli import build_app_from_args

    write_checkpoint(tmp_path, gemma4_tokenizer_dir)
    save_assistant(drafter(), tmp_path / "drafter")
    batch = [[2, 100, 200, 300], [2] + list(range(500, 540))]
    greedy = dict(temperature=0.0, max_tokens=8, ignore_eos=True)
    single = LLM(tmp_path, dtype="float32", device="cpu", max_model_len=1024, max_batch_size=4)
    expected = [r.text for r in single.generate(batch, greedy)]
    server = Server(build_app_from_args(serve_args(tmp_path, "--tensor-parallel-size", "2", "--speculative-model",
                                                   str(tmp_path / "drafter"), "--num-speculative-tokens", "3")))
    try:
        engine = server.app.state.server.engine.engine
        engine.speculator.oracle = greedy_oracle(engine.runner.model)
        client = server.client(timeout=60)
        for prompt, want in zip(batch, expected):
            got = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert got.choices[0].text == want
        assert engine.speculator.num_accepted > 0
    finally:
        server.stop()
        distributed.shutdown()


def _worker_hanging_in_drafter_load(rank, *args):
    """Test only, the target of the spawned ranks (runtime._worker_main, pickled by name): rank 1 never returns from
    loading its part of the drafter."""
    import gemma4.assistant_checkpoint

    if rank == 1:
        gemma4.assistant_checkpoint.load_assistant = lambda *args, **kwargs: time.sleep(3600)
    runtime_module._worker_main(rank, *args)  # the real one: this is a fresh process


def test_a_rank_that_hangs_loading_the_drafter_fails_without_a_hang(checkpoints, monkeypatch):
    """Rank 1 hangs in the drafter's load: rank 0 raises RankFailed naming it once the runtime's timeout (here 3 s)
    has passed, rather than waiting on the control group for ever; the runtime is failed and shuts down at once."""
    target, drafter = checkpoints["31B"]
    monkeypatch.setattr(runtime_module, "_worker_main", _worker_hanging_in_drafter_load)
    model = distributed.load_parallel(target, 2, dtype=torch.float32, device="cpu",
                                      timeout=datetime.timedelta(seconds=3))
    runtime = distributed.current()
    # Where rank 0 would wait for ever, end rank 1 after a while: the test then fails rather than hangs.
    guard = threading.Timer(60, lambda: [process.kill() for process in runtime.processes])
    guard.start()
    try:
        start = time.monotonic()
        with pytest.raises(RankFailed, match=r"loading the drafter failed: .*Rank 1 failed"):
            runtime.load_drafter(drafter)
        assert time.monotonic() - start < 10
        assert runtime.failed is not None
        with pytest.raises(RankFailed):  # refused at once from now on
            model(torch.tensor([[5, 6, 7]]))
        start = time.monotonic()
        distributed.shutdown()
        assert time.monotonic() - start < 5 and distributed.current() is None
    finally:
        guard.cancel()
        distributed.shutdown()
