"""Prompt log-probabilities (SamplingParams.prompt_logprobs, vLLM's): each prompt token's log-probability, rank and
the top k there equal the log-softmax of transformers 5.24's logits (fp32, CPU, tiny configs), with prompts longer
than the sliding window chunked over several steps beside other requests, with the prefix cache and preemption;
`max_tokens=0` scores a prompt and ends. The server's side (echo, prompt_logprobs): test_server_prompt_logprobs.py."""

import pytest
import torch

from reference import VOCAB, reference_logits, reference_model, text_config_dict

import gemma4.model.gemma4
from gemma4 import LLM, Model
from gemma4.engine.engine import LLMEngine
from gemma4.engine.sampling import SamplingParams

TOL = 1e-4


@pytest.fixture(scope="module", params=["E2B", "26B-A4B"])
def pair(request, tmp_path_factory):
    """(transformers model, ours from its checkpoint). E2B: KV-shared layers (which a last-position forward runs on
    the last position alone) and per-layer inputs; 26B-A4B: MoE."""
    reference = reference_model(text_config_dict(request.param), seed=3)
    path = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(path)
    return reference, Model.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(autouse=True)
def small_slices(monkeypatch):
    """Logits made 5 positions at a time (Gemma4.score_tokens), so that a chunk's scores cross slices."""
    monkeypatch.setattr(gemma4.model.gemma4, "SCORE_ROWS", 5)


def tokens(n, seed):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_reference(reference, prompt, scored, k):
    """`scored` (one StepOutput's prompt_logprobs) equals the reference's log-softmax at each prompt position."""
    logprobs = reference_logits(reference, torch.tensor([prompt]))[0].log_softmax(-1)
    assert len(scored) == len(prompt) and scored[0] is None
    for i in range(1, len(prompt)):
        entry, row = scored[i], logprobs[i - 1]
        assert entry.token_id == prompt[i]
        assert abs(entry.logprob - row[prompt[i]].item()) <= TOL, (i, entry.logprob, row[prompt[i]].item())
        # the rank counts the tokens at least as likely (itself too); those within TOL of it may go either way
        assert 1 + (row >= row[prompt[i]] + TOL).sum() <= entry.rank <= (row >= row[prompt[i]] - TOL).sum()
        values, ids = row.topk(k)
        assert [t for t, _ in entry.top] == ids.tolist(), i
        torch.testing.assert_close(torch.tensor([v for _, v in entry.top]), values, rtol=0, atol=TOL)


def run(engine, prompts, params):
    """Each request's outputs, all submitted at once."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    outputs = {i: [] for i in ids}
    for out in engine.run(ids):
        out.raise_error()
        outputs[out.seq_id].append(out)
    return [outputs[i] for i in ids]


GREEDY = dict(temperature=0, stop_token_ids=[])


def test_prompt_logprobs_equal_the_reference(pair):
    """Prompts longer than the window (8), in chunks of at most 12 tokens over several steps, beside requests that
    decode and one that asks for none: each scored prompt equals the reference, a scoring-only request (max_tokens 0)
    ends after its prefill with no token, and the generated tokens are those of the requests alone."""
    reference, model = pair
    prompts = [tokens(37, 0), tokens(29, 1), tokens(20, 2), tokens(4, 3)]
    params = [SamplingParams(max_tokens=4, prompt_logprobs=5, **GREEDY),
              SamplingParams(max_tokens=0, prompt_logprobs=0, **GREEDY),
              SamplingParams(max_tokens=6, **GREEDY), SamplingParams(max_tokens=12, **GREEDY)]
    engine = LLMEngine(model, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=12)
    # The short one first: it decodes while the others' prompts are chunked.
    short = engine.add_request(prompts[3], params[3])
    engine.step()
    outputs = run(engine, prompts[:3], params[:3])
    for _ in engine.run([short]):
        pass
    assert_reference(reference, prompts[0], outputs[0][0].prompt_logprobs, 5)
    assert all(out.prompt_logprobs is None for out in outputs[0][1:])  # on the first output only
    assert_reference(reference, prompts[1], outputs[1][0].prompt_logprobs, 0)
    [scored] = outputs[1]
    assert scored.token is None and scored.finished and scored.finish_reason == "length"
    assert all(out.prompt_logprobs is None for out in outputs[2])
    alone = [LLMEngine(model, max_num_seqs=1, max_model_len=64).generate([p], SamplingParams(max_tokens=n, **GREEDY))
             for p, n in ((prompts[0], 4), (prompts[2], 6))]
    assert [out.token for out in outputs[0]] == alone[0][0] and [out.token for out in outputs[2]] == alone[1][0]
    assert engine.blocks.usage == 0


def test_a_cached_prefix_is_computed_again(pair):
    """A prompt whose prefix the cache holds still gets every position's logprob (a request that asks computes its
    whole prompt); its blocks go to the cache all the same, for the next request."""
    reference, model = pair
    stem = tokens(40, 4)
    engine = LLMEngine(model, max_num_seqs=4, max_model_len=128)
    run(engine, [stem], [SamplingParams(max_tokens=2, **GREEDY)])
    hits = engine.blocks.hit_tokens
    prompt = stem + tokens(9, 5)
    [outputs] = run(engine, [prompt], [SamplingParams(max_tokens=2, prompt_logprobs=2, **GREEDY)])
    assert engine.blocks.hit_tokens == hits  # no hit: computed from the start
    assert_reference(reference, prompt, outputs[0].prompt_logprobs, 2)
    run(engine, [prompt + tokens(5, 6)], [SamplingParams(max_tokens=2, **GREEDY)])
    assert engine.blocks.hit_tokens > hits  # the scored request's blocks are cached


def test_preempted_requests_score_their_whole_prompt(pair):
    """Few KV blocks: sequences are preempted (and recomputed) while others prefill and decode; every prompt's
    logprobs still equal the reference, each position once."""
    reference, model = pair
    prompts = [tokens(20 + 3 * i, 10 + i) for i in range(6)]
    params = SamplingParams(max_tokens=10, prompt_logprobs=1, **GREEDY)
    engine = LLMEngine(model, max_num_seqs=6, max_model_len=64, max_num_batched_tokens=16, num_blocks=12)
    outputs = run(engine, prompts, [params] * len(prompts))
    assert engine.scheduler.num_preemptions > 0
    for prompt, outs in zip(prompts, outputs):
        assert_reference(reference, prompt, outs[0].prompt_logprobs, 1)
        assert sum(out.prompt_logprobs is not None for out in outs) == 1


def test_sampling_params_bounds():
    """prompt_logprobs: None or an integer in [0, 20], as logprobs; max_tokens 0 only with it."""
    for value in (-1, 21, 1.5, True, "2"):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=value)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    assert SamplingParams(max_tokens=0, prompt_logprobs=20).max_tokens == 0


def test_llm_generate_returns_them(pair):
    """gemma4.LLM's Completion carries the prompt's logprobs beside the output's."""
    reference, model = pair
    llm = LLM(model, max_model_len=64)
    prompt = tokens(15, 7)
    [done] = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=3, **GREEDY))
    assert done.token_ids == [] and done.finish_reason == "length"
    assert_reference(reference, prompt, done.prompt_logprobs, 3)
    [plain] = llm.generate([prompt], SamplingParams(max_tokens=2, **GREEDY))
    assert plain.prompt_logprobs is None
