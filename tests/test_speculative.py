"""Speculative decoding in the engine (engine/speculative.py): greedy outputs with a drafter equal those without one,
token for token (logprobs within fp32 rounding), whatever the drafter proposes; sampled outputs keep the target's
distribution. Tiny fp32 configs with a sliding window of 8: prompts and outputs run past it, so rejected drafts are
written over ring slots that later queries must not see.

Random drafters accept almost nothing, so the drafts also come from an oracle (the target's own greedy tokens:
everything is accepted) and a noisy oracle (a random number of them right, then a wrong one)."""

import random

import pytest
import torch

from reference import engine_outputs, text_config_dict, tiny_model

from gemma4.assistant_checkpoint import assistant_config_for, random_assistant
from gemma4.engine.engine import LLMEngine
from gemma4.engine.sampling import Candidates, SamplingParams, next_token_distribution
from gemma4.engine.speculative import Speculator

# The kernel tests' device: CUDA when there is one, else the CPU through Triton's interpreter (conftest).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny(family, **text):
    return tiny_model({**text_config_dict(family), **text})


@pytest.fixture(scope="module", params=["E2B", "26B-A4B", "31B"])
def target(request):
    """E2B: KV-shared layers, per-layer inputs, the clustered head; 26B-A4B: MoE, K=V; 31B: dense, K=V."""
    model = tiny(request.param)
    clustered = request.param == "E2B"
    head = dict(num_centroids=16, centroid_intermediate_top_k=4) if clustered else {}
    config = assistant_config_for(model.config.text_config, num_layers=2, hidden_size=32, intermediate_size=64,
                                  clustered=clustered, **head)
    return model, random_assistant(config, dtype=torch.float32, seed=1)


def prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (n,), generator=gen).tolist() for n in lengths]


run = engine_outputs


def oracle_from(reference: dict[tuple, list[int]], noise: float = 0.0, seed: int = 0):
    """Drafts from the target's own greedy continuation of each prompt (`reference`: prompt -> output ids); with
    `noise`, each draft is replaced by a wrong token with that probability."""
    rng = random.Random(seed)

    def oracle(seq):
        output = reference[tuple(seq.prompt_ids)]
        done = len(seq.output_ids)
        tokens = output[done:]
        return [t if rng.random() >= noise else (t + 1) % 384 for t in tokens]
    return oracle


PARAMS = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[], logprobs=1)


@pytest.mark.parametrize("drafts", ["drafter", "oracle", "noisy"])
def test_greedy_outputs_equal_without_speculation(target, drafts):
    model, drafter = target
    batch = prompts([3, 20, 37])  # within, past and far past the window of 8
    plain = run(LLMEngine(model, max_num_seqs=4, max_model_len=128), batch, PARAMS)
    engine = LLMEngine(model, max_num_seqs=4, max_model_len=128, speculative_model=drafter, num_speculative_tokens=3)
    if drafts != "drafter":
        engine.speculator.oracle = oracle_from({tuple(p): out[0] for p, out in zip(batch, plain)},
                                               noise=0.3 if drafts == "noisy" else 0.0)
    spec = run(engine, batch, PARAMS)
    for (ids, logprobs), (ref_ids, ref_logprobs) in zip(spec, plain):
        assert ids == ref_ids
        # fp32: the verify forward computes 4 positions at once where decoding computes one: summation order only.
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_logprobs), rtol=0, atol=1e-4)
    stats = engine.speculator
    assert stats.num_drafted > 0
    if drafts == "oracle":  # every draft is right: 24 tokens in rounds of 3 + 1 (the last rounds are shorter)
        assert stats.num_accepted == stats.num_drafted
    elif drafts == "noisy":
        assert 0 < stats.num_accepted < stats.num_drafted
    assert engine.blocks.usage == 0


def test_penalties_logit_bias_and_sampling_in_one_verify_batch(target):
    """Rows that the general acceptance path serves, verified together: greedy under penalties, greedy under a
    logit_bias (each position's penalties count the drafts before it as output) give the tokens and logprobs
    without speculation; seeded sampled rows with penalties and top-k / top-p give the same tokens run after run."""
    model, drafter = target
    batch = prompts([21, 9, 14, 30], seed=11)
    greedy = [SamplingParams(max_tokens=18, temperature=0, stop_token_ids=[], repetition_penalty=1.6,
                             presence_penalty=0.5, frequency_penalty=0.4, logprobs=2),
              SamplingParams(max_tokens=18, temperature=0, stop_token_ids=[], logit_bias={7: 2.0, 11: -100})]
    # The sampled rows' drafts: their prompts' greedy continuations (often their likeliest tokens)
    plain = run(LLMEngine(model, max_num_seqs=4, max_model_len=128), batch, greedy * 2)
    sampled = [SamplingParams(max_tokens=18, temperature=0.8, top_k=20, top_p=0.9, seed=3, stop_token_ids=[],
                              frequency_penalty=0.3),
               SamplingParams(max_tokens=18, temperature=1.2, min_p=0.05, seed=4, stop_token_ids=[], logprobs=1)]
    outputs = []
    for _ in range(2):
        engine = LLMEngine(model, max_num_seqs=4, max_model_len=128, speculative_model=drafter,
                           num_speculative_tokens=3)
        engine.speculator.oracle = oracle_from({tuple(p): out[0] for p, out in zip(batch, plain)}, noise=0.3)
        outputs.append(run(engine, batch, greedy + sampled))
        assert 0 < engine.speculator.num_accepted < engine.speculator.num_drafted and engine.blocks.usage == 0
    for (ids, logprobs), (ref_ids, ref_logprobs) in zip(outputs[0][:2], plain[:2]):
        assert ids == ref_ids
        if ref_logprobs[0] is not None:
            torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_logprobs), rtol=0, atol=1e-4)
    assert [ids for ids, _ in outputs[0]] == [ids for ids, _ in outputs[1]]
    assert all(len(ids) == 18 for ids, _ in outputs[0])


def test_a_stop_token_inside_an_accepted_run_ends_the_output_there(target):
    """The oracle's drafts are all accepted; a greedy token inside the first run (the 3rd to 5th new one: the 1st
    comes from the prefill, then a run of 5) is made a stop id: the output ends on it, as without speculation, and
    the accepted tokens after it in the same run are dropped."""
    model, drafter = target
    batch = prompts([20, 11], seed=5)
    free = SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[])
    plain = LLMEngine(model, max_num_seqs=2, max_model_len=128).generate(batch, free)
    stop = plain[0][next(j for j in (3, 2, 4) if plain[0][j] not in plain[0][:j])]
    params = SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop])
    expected = LLMEngine(model, max_num_seqs=2, max_model_len=128).generate(batch, params)
    assert expected[0] == plain[0][:plain[0].index(stop) + 1]
    engine = LLMEngine(model, max_num_seqs=2, max_model_len=128, speculative_model=drafter, num_speculative_tokens=4)
    engine.speculator.oracle = oracle_from({tuple(p): out for p, out in zip(batch, plain)})
    runs, accept = [], engine.speculator.accept  # the first sequence's verified runs

    def recording(seqs, *args):
        results = accept(seqs, *args)
        runs.extend([token for token, _ in result] for seq, result in zip(seqs, results) if seq.prompt_ids == batch[0])
        return results
    engine.speculator.accept = recording
    assert engine.generate(batch, params) == expected
    assert any(stop in run[:-1] for run in runs)  # tokens came after it in its run
    assert engine.speculator.num_accepted > 0 and engine.blocks.usage == 0


def test_min_tokens_holds_a_stop_token_back_inside_a_run(target):
    """A greedy token (the first new one from the 3rd on) made a stop id, and min_tokens 3 past it: each verified
    position bans the stop token while the output before it is shorter than min_tokens (that token is then another
    one), as without speculation."""
    model, drafter = target
    batch = prompts([20, 11], seed=3)
    free = LLMEngine(model, max_num_seqs=2, max_model_len=128).generate(
        batch, SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[]))
    at = next(j for j in range(2, 12) if free[0][j] not in free[0][:j])
    params = SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[free[0][at]], min_tokens=at + 3)
    expected = LLMEngine(model, max_num_seqs=2, max_model_len=128).generate(batch, params)
    assert expected[0][:at] == free[0][:at] and expected[0][at] != free[0][at]
    engine = LLMEngine(model, max_num_seqs=2, max_model_len=128, speculative_model=drafter, num_speculative_tokens=4)
    engine.speculator.oracle = oracle_from({tuple(p): out for p, out in zip(batch, expected)})
    assert engine.generate(batch, params) == expected
    assert engine.speculator.num_accepted > 0


def test_requests_join_and_leave_a_speculating_batch(target):
    """Continuous batching: requests of other lengths and max_tokens arrive while others verify drafts; a batch
    larger than speculative_max_batch decodes one token at a time, and speculation resumes when it shrinks."""
    model, drafter = target
    batch = prompts([5, 30, 12, 19, 9], seed=4)
    lengths = [10, 3, 17, 6, 12]
    params = [SamplingParams(max_tokens=n, temperature=0, stop_token_ids=[]) for n in lengths]
    plain = LLMEngine(model, max_num_seqs=4, max_model_len=128).generate(batch, params)
    engine = LLMEngine(model, max_num_seqs=4, max_model_len=128, speculative_model=drafter, num_speculative_tokens=2,
                       speculative_max_batch=2)
    engine.speculator.oracle = oracle_from({tuple(p): out for p, out in zip(batch, plain)}, noise=0.2, seed=5)
    ids = [engine.add_request(batch[0], params[0]), engine.add_request(batch[1], params[1])]
    outputs = {i: [] for i in range(len(batch))}
    order = dict(zip(ids, range(2)))
    steps = 0
    while engine.has_unfinished():
        if steps in (2, 3, 6):  # three more requests while the first two are running
            i = len(order)
            order[engine.add_request(batch[i], params[i])] = i
        for out in engine.step():
            out.raise_error()
            if out.token is not None:
                outputs[order[out.seq_id]].append(out.token)
        steps += 1
    assert [outputs[i] for i in range(len(batch))] == plain
    assert engine.speculator.num_accepted > 0 and engine.blocks.usage == 0


@pytest.mark.parametrize("greedy_drafts", [False, True])
def test_rejection_sampling_keeps_the_target_distribution(greedy_drafts):
    """Speculator.accept on fixed distributions over 6 tokens, two sequences verified together: the first (seeded)
    with two drafts, the target's p_0, p_1, p_2 at its three positions; the second (unseeded, temperature 0.5, top-k
    5: some of its drafts have no probability at all) with one draft, p'_0, p'_1. Drafts are drawn from quite
    different q's (or are their argmax), given on candidates in another order, or over the vocabulary. Over 6,000
    rounds each position's tokens (the first's always, a later one's when every draft before it was accepted) follow
    the target's distribution there; accepting every draft would give q's frequencies instead, far outside the
    bounds."""
    from gemma4.engine.sequence import Sequence

    vocab, rounds = 6, 6000
    p_logits = [torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 0.3], [0.0, 1.5, -0.5, 1.0, 0.2, -2.0],
                              [1.0, -1.0, 0.5, 0.5, 1.5, 0.0]]),
                torch.tensor([[0.5, 0.0, -0.5, 0.8, 0.2, 0.1], [-0.2, 0.6, 0.0, 0.1, 0.3, -0.4]])]
    # Each q has the target's most likely token as its own (so that greedy drafts are often accepted), its mass
    # elsewhere; the q's of one sequence's two drafts, and of the two sequences' first, hold their mass on different
    # tokens (a q read at the wrong position or row fails the bounds).
    q_logits = torch.tensor([[[2.0, -1.0, 1.8, -1.0, 1.4, -1.0], [-1.0, 2.0, -1.0, 1.8, -0.5, 0.8]],
                             [[-1.0, 1.5, 0.5, 1.6, -1.0, 1.2], [0.0] * 6]])
    params = [SamplingParams(max_tokens=100, temperature=1.0, stop_token_ids=[]),
              SamplingParams(max_tokens=100, temperature=0.5, top_k=5, stop_token_ids=[])]
    p = [next_token_distribution(p_logits[b], params[b]) for b in range(2)]
    verified = torch.cat(p_logits)  # the verify step's rows, sequence after sequence
    q = q_logits.softmax(-1)
    order = torch.tensor([3, 0, 5, 1, 4, 2])  # the drafting steps' distributions: on candidates, on the vocabulary
    steps = [Candidates(q[:, 0, order], order.expand(2, -1), vocab), Candidates(q[:, 1], None, vocab)]
    speculator = Speculator.__new__(Speculator)
    speculator.num_drafted = speculator.num_accepted = 0
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the unseeded sequence's draws
    counts = [torch.zeros(3, vocab), torch.zeros(2, vocab)]  # per sequence and position, the tokens emitted there
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops on a few numbers: a parallel region costs more than they do
    try:
        for _ in range(rounds):
            seqs = [Sequence([1, 2, 3], params[0], generator=gen), Sequence([1, 2, 3], params[1])]
            drafts = [[int(q[b, j].argmax()) if greedy_drafts else int(torch.multinomial(q[b, j], 1, generator=gen))
                       for j in range(n)] for b, n in enumerate((2, 1))]
            for b, result in enumerate(speculator.accept(seqs, drafts, None if greedy_drafts else steps, verified)):
                for j, (token, _) in enumerate(result):
                    counts[b][j, token] += 1
    finally:
        torch.set_num_threads(threads)
    # Total variation distance; its standard error at 6,000 draws is about 0.01, at 1,000 about 0.025.
    for b in range(2):
        for j, seen in enumerate(counts[b]):
            assert (seen / seen.sum() - p[b][j]).abs().sum() / 2 < (0.03 if j == 0 else 0.08), (b, j)
    assert counts[0][2].sum() > 1000 and counts[1][1].sum() > 1000  # runs of every length were accepted
    assert min((q[b, 0] - p[b][0]).abs().sum() / 2 for b in range(2)) > 0.3  # the bound tells the two apart


@pytest.mark.parametrize("family", ["E2B", "26B-A4B"])
def test_flattened_verify_rows_in_the_decode_step(family, short_text_config):
    """The verify step as the decode graphs run it (GraphedDecode: k + 1 rows per sequence sharing its cache, every
    kernel of the in-place decode step; here eagerly, in Triton's interpreter without a GPU): greedy outputs equal the
    same engine's without a drafter, with an oracle and a noisy oracle, two sequences past the window."""
    from gemma4 import kernels
    from gemma4.engine.graphs import GraphedDecode

    model = tiny_model(short_text_config(family)).to(DEVICE)
    config = assistant_config_for(model.config.text_config, num_layers=2, hidden_size=32, intermediate_size=64)
    drafter = random_assistant(config, dtype=torch.float32, seed=1, device=DEVICE)
    batch = prompts([11, 4], seed=6)
    params = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[])

    def engine(**spec):
        made = LLMEngine(model, max_num_seqs=2, max_model_len=64, run_ahead=False, **spec)
        made.runner.graphs = GraphedDecode(model, made.blocks, made.max_model_len,
                                           None if not spec else 2 * (spec["num_speculative_tokens"] + 1))
        return made

    with kernels.force():
        plain = engine().generate(batch, params)
        for noise in (0.0, 0.4):
            spec = engine(speculative_model=drafter, num_speculative_tokens=3)
            calls = []
            run = spec.runner.graphs.run
            spec.runner.graphs.run = lambda seqs, ahead=None, drafts=None: calls.append(drafts) or run(seqs, ahead,
                                                                                                         drafts)
            spec.speculator.oracle = oracle_from({tuple(p): out for p, out in zip(batch, plain)}, noise=noise)
            assert spec.generate(batch, params) == plain
            assert any(drafts for drafts in calls) and spec.speculator.num_accepted > 0


@pytest.mark.parametrize("family", ["E2B", "31B"])
def test_the_drafter_reads_the_target_pools_in_place_as_their_gathered_copies(family, short_text_config):
    """PagedKV (the decode kernel over the target's pools, as on CUDA; Triton's interpreter here) against SharedKV
    (the pools' keys below num_cached, gathered): the drafter's logits and hidden states agree within fp32 rounding,
    for two sequences past the window, one with rejected drafts' K/V left in its ring and blocks."""
    from gemma4 import kernels
    from gemma4.engine.speculative import TargetKV
    from gemma4.model.assistant import PagedKV
    from gemma4.options import override

    model = tiny_model(short_text_config(family)).to(DEVICE)
    config = assistant_config_for(model.config.text_config, num_layers=2, hidden_size=32, intermediate_size=64)
    drafter = random_assistant(config, dtype=torch.float32, seed=1, device=DEVICE)
    engine = LLMEngine(model, max_num_seqs=2, max_model_len=64, speculative_model=drafter, num_speculative_tokens=3)
    ids = [engine.add_request(p, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[]))
           for p in prompts([13, 6], seed=8)]
    for _ in range(4):  # random drafts: most are rejected, their K/V stay past num_cached
        engine.step()
    seqs = [engine.seqs[i] for i in ids]
    spec = engine.speculator
    num_cached = torch.tensor([seq.num_cached for seq in seqs], device=DEVICE)
    assert all(seq.num_cached > 8 for seq in seqs) and spec.num_drafted > spec.num_accepted
    embeds = model.text.embed_tokens(torch.tensor([[seq.output_ids[-1]] for seq in seqs], device=DEVICE))
    hidden = torch.stack([seq.hidden for seq in seqs])[:, None]
    with torch.no_grad():
        with override(kernels=False):
            kv = TargetKV(spec._view(seqs, num_cached), paged=False).read(spec.step.sources, model.dtype)
            dense = drafter(embeds, hidden, num_cached[:, None], kv)
        with kernels.force():
            kv = TargetKV(spec._view(seqs, num_cached), paged=True).read(spec.step.sources, model.dtype)
            assert isinstance(kv, PagedKV)
            paged = drafter(embeds, hidden, num_cached[:, None], kv)
    torch.testing.assert_close(paged.logits, dense.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(paged.hidden, dense.hidden, rtol=0, atol=1e-4)


def test_llm_and_serve_take_a_drafter_checkpoint(tmp_path):
    """LLM(speculative_model=DIR) loads a drafter saved in the released layout (save_assistant) and gives the greedy
    text of an LLM without it; a drafter of another model's size, a missing directory and `gemma4 serve`'s flags."""
    from gemma4 import LLM
    from gemma4.assistant_checkpoint import save_assistant
    from gemma4.config import ConfigError
    from gemma4.server.cli import add_serve_arguments

    model = tiny("31B")
    model.save_pretrained(tmp_path / "target")
    config = assistant_config_for(model.config.text_config, num_layers=2, hidden_size=32, intermediate_size=64)
    save_assistant(random_assistant(config, dtype=torch.float32, seed=3), tmp_path / "drafter")
    prompt = prompts([30], seed=9)[0]
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[])
    plain = LLM(tmp_path / "target", dtype=torch.float32, device="cpu").generate([prompt], params)
    fast = LLM(tmp_path / "target", dtype=torch.float32, device="cpu", speculative_model=tmp_path / "drafter",
               num_speculative_tokens=2)
    assert fast.engine.speculator is not None and fast.engine.speculator.num_tokens == 2
    assert [o.token_ids for o in fast.generate([prompt], params)] == [o.token_ids for o in plain]
    other = assistant_config_for(tiny("E2B", hidden_size=48).config.text_config, num_layers=1, hidden_size=16,
                                 intermediate_size=32)
    save_assistant(random_assistant(other, dtype=torch.float32), tmp_path / "other")
    with pytest.raises(ConfigError, match="does not fit this model"):
        LLM(tmp_path / "target", dtype=torch.float32, device="cpu", speculative_model=tmp_path / "other")
    with pytest.raises(FileNotFoundError):
        LLM(tmp_path / "target", dtype=torch.float32, device="cpu", speculative_model=tmp_path / "missing")
    import argparse
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["m", "--speculative-model", "d", "--num-speculative-tokens", "3"])
    assert (args.speculative_model, args.num_speculative_tokens) == ("d", 3)
