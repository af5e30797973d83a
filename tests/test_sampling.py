"""Sampling as a pure function of logits: every rule checked against a hand-computed distribution."""

import math

import pytest
import torch

from gemma4.engine.sampling import (SamplingParams, distributions, draw, next_token_distribution, processed_scores,
                                    token_logprobs)

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def assert_probs(got, expected):
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float32), atol=1e-6), (got, expected)


def test_greedy_is_one_hot():
    probs = next_token_distribution(LOGITS, SamplingParams(temperature=0))
    assert_probs(probs, [1, 0, 0, 0, 0, 0])


def test_temperature():
    probs = next_token_distribution(LOGITS, SamplingParams(temperature=0.5))
    assert_probs(probs, softmax([v / 0.5 for v in LOGITS.tolist()]))


def test_top_k():
    probs = next_token_distribution(LOGITS, SamplingParams(top_k=2))
    assert_probs(probs, softmax([2.0, 1.0]) + [0, 0, 0, 0])


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    full = softmax(LOGITS.tolist())  # 0.557, 0.205, 0.124, ...
    probs = next_token_distribution(LOGITS, SamplingParams(top_p=0.7))
    kept = full[:2]
    assert_probs(probs, [p / sum(kept) for p in kept] + [0] * 4)
    probs = next_token_distribution(LOGITS, SamplingParams(top_p=0.5))  # the first token alone crosses 0.5
    assert_probs(probs, [1, 0, 0, 0, 0, 0])


def test_min_p():
    full = softmax(LOGITS.tolist())
    probs = next_token_distribution(LOGITS, SamplingParams(min_p=0.2))  # keep p >= 0.2 * 0.557
    kept = [p if p >= 0.2 * full[0] else 0 for p in full]
    assert_probs(probs, [p / sum(kept) for p in kept])


def test_rules_compose_in_order():
    """temperature, then top-k, then top-p over the renormalized survivors."""
    params = SamplingParams(temperature=2.0, top_k=4, top_p=0.6)
    scaled = softmax([v / 2.0 for v in LOGITS.tolist()[:4]])  # top-4 after temperature
    cumulative, kept = 0.0, []
    for p in scaled:
        kept.append(p if cumulative < 0.6 else 0.0)
        cumulative += p
    assert_probs(next_token_distribution(LOGITS, params), [p / sum(kept) for p in kept] + [0, 0])


def test_repetition_penalty_follows_transformers():
    seen = torch.tensor([0, 4])  # a positive logit is divided, a negative one multiplied
    probs = next_token_distribution(LOGITS, SamplingParams(repetition_penalty=2.0), prompt_ids=seen)
    assert_probs(probs, softmax([1.0, 1.0, 0.5, 0.0, -2.0, -3.0]))


def test_presence_and_frequency_penalties_follow_openai():
    output = torch.tensor([1, 1, 2])  # token 1 twice, token 2 once
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    probs = next_token_distribution(LOGITS, params, output_ids=output)
    assert_probs(probs, softmax([2.0, 1.0 - 0.5 - 0.5, 0.5 - 0.5 - 0.25, 0.0, -1.0, -3.0]))


def test_input_logits_are_not_modified():
    logits = LOGITS.clone()
    next_token_distribution(logits, SamplingParams(repetition_penalty=3.0, presence_penalty=1.0),
                            prompt_ids=torch.tensor([0]), output_ids=torch.tensor([1]))
    assert torch.equal(logits, LOGITS)


def test_top_p_sorts_the_likeliest_alone_where_they_suffice():
    """top-p over 5,000 tokens keeps exactly the tokens that a sort of the whole row keeps: on a peaked row, whose
    1,024 likeliest tokens hold top_p (only they are sorted), and on a flat one (sorted whole)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.stack([torch.randn(5000, generator=gen) * 5, torch.randn(5000, generator=gen) * 0.1])
    probs = logits.softmax(-1)
    ordered, order = probs.sort(descending=True)
    assert ordered[0, :1024].sum() > 0.9 > 0.5 > ordered[1, :1024].sum()
    for top_p in (0.5, 0.9):
        kept = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, ordered.cumsum(-1) - ordered < top_p)
        assert torch.equal(processed_scores(logits, SamplingParams(top_p=top_p)).isfinite(), kept)


def test_rows_under_their_own_rules():
    """`distributions` over rows of different rules gives each row's next_token_distribution: greedy, top-k with
    top-p and min-p, top-k with a tie at the k-th value (both kept), penalties over padded prompt and output ids; on
    each row's top-k candidates while every sampled row has a top-k, over the vocabulary once one has none."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 40, generator=gen) * 2
    fifth, sixth = logits[2].topk(6).indices[4:].tolist()
    logits[2, sixth] = logits[2, fifth]  # tied with the 5th likeliest: top-k 5 keeps 6 tokens
    prompt = torch.tensor([[3, 4, -1], [5, -1, -1], [6, 7, 8], [9, -1, -1], [3, 3, 1]])
    output = torch.tensor([[1, 1], [-1, -1], [2, -1], [4, 4], [0, -1]])
    params = [SamplingParams(temperature=0, repetition_penalty=1.5),
              SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1),
              SamplingParams(temperature=0.7, top_k=5),
              SamplingParams(temperature=1.2, top_k=8, presence_penalty=0.5, frequency_penalty=0.3),
              SamplingParams(temperature=0.9, min_p=0.05, repetition_penalty=1.3)]

    def expected(row):
        return next_token_distribution(logits[row], params[row], prompt[row][prompt[row] >= 0],
                                       output[row][output[row] >= 0])

    for rows in ([0, 1, 3], [0, 1, 2, 3, 4]):
        got = distributions(logits[rows], [params[row] for row in rows], prompt[rows], output[rows])
        assert (got.ids is None) == (rows == [0, 1, 2, 3, 4])  # row 2's tie, row 4's missing top-k: no candidates
        assert got.most_likely()[0] == expected(0).argmax()
        for i, row in enumerate(rows):
            dense = got.rows([i]).prob_at(None)[0]
            assert torch.equal(dense > 0, expected(row) > 0), row
            torch.testing.assert_close(dense, expected(row), rtol=0, atol=1e-6)
            tokens = torch.arange(40)[None]
            torch.testing.assert_close(got.rows([i]).prob_at(tokens)[0], dense, rtol=0, atol=0)
    assert (expected(2) > 0).sum() == 6


def test_draws_follow_the_distribution():
    """20,000 seeded draws: empirical frequencies within 4 standard errors of the target probabilities."""
    probs = next_token_distribution(LOGITS, SamplingParams(temperature=1.3, top_k=5))
    generator = torch.Generator().manual_seed(1234)
    n = 20_000
    counts = torch.bincount(torch.tensor([draw(probs, generator) for _ in range(n)]), minlength=6).float()
    stderr = (probs * (1 - probs) / n).sqrt()
    assert ((counts / n - probs).abs() <= 4 * stderr + 1e-9).all()
    assert counts[5] == 0  # removed by top-k: never drawn


def test_seeded_draws_reproduce():
    probs = next_token_distribution(LOGITS, SamplingParams())
    a = torch.Generator().manual_seed(7)
    b = torch.Generator().manual_seed(7)
    assert [draw(probs, a) for _ in range(50)] == [draw(probs, b) for _ in range(50)]


def test_logprobs_of_chosen_and_top():
    result = token_logprobs(LOGITS, 2, 3)
    reference = LOGITS.log_softmax(-1)
    assert result.logprob == pytest.approx(float(reference[2]))
    assert [t for t, _ in result.top] == [0, 1, 2]
    assert result.top[0][1] == pytest.approx(float(reference[0]))


@pytest.mark.parametrize("kwargs, message", [
    ({"top_p": 0.0}, "top_p must be in"),
    ({"top_p": 1.5}, "top_p must be in"),
    ({"temperature": -1}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"logprobs": 50}, "logprobs"),
])
def test_bad_values_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="unknown sampling parameter.*topp"):
        SamplingParams.from_dict({"topp": 0.5})


def test_defaults_come_from_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.7, "top_k": 20, "top_p": 0.9}')
    params = SamplingParams.defaults_for(tmp_path, max_tokens=5)
    assert (params.temperature, params.top_k, params.top_p, params.max_tokens) == (0.7, 20, 0.9, 5)
    gemma = SamplingParams.defaults_for(None)
    assert (gemma.temperature, gemma.top_p, gemma.top_k) == (1.0, 0.95, 64)
