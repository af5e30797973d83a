"""`Model.generate(..., return_dict_in_generate=True, output_scores=True, output_logits=True)` gives transformers'
kind of output (sequences, per-step processed scores and raw logits), checked against transformers 5.24's generate
on tiny random configs, fp32 on the CPU."""

import pytest
import torch

from gemma4 import Model
from gemma4.engine.generate import GenerateOutput, left_pad
from gemma4.engine.sampling import SamplingParams, batchable
from reference import VOCAB, reference_model, text_config_dict

# fp32 on the CPU: the engine (no padding, paged cache) and transformers (padded batch, full forwards) differ by
# float rounding only, ~1e-4 on these random models; a wrong position, mask or warper moves scores by far more.
TOLERANCE = dict(atol=2e-3, rtol=1e-3)
EOS = 1


@pytest.fixture(scope="module", params=["E2B", "26B-A4B"])
def pair(request, tmp_path_factory):
    reference = reference_model(text_config_dict(request.param), seed=11)
    path = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(path)
    return reference, Model.from_pretrained(path, dtype=torch.float32)


def prompts(*lengths):
    return [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]


def test_greedy_padded_batch_equals_transformers(pair):
    """Sequences equal; scores and logits close at every step. min_new_tokens holds EOS back in both (its score is
    -inf, its logit is not): scores are the processed logits, not a copy of the raw ones."""
    reference, model = pair
    ids, mask = left_pad(prompts(4, 11, 7))
    kwargs = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=EOS,
                  pad_token_id=0, return_dict_in_generate=True, output_scores=True, output_logits=True)
    ours, theirs = model.generate(ids, **kwargs), reference.generate(ids, **kwargs)
    assert isinstance(ours, GenerateOutput)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert len(ours.scores) == len(ours.logits) == len(theirs.scores) == 12
    for step in range(12):
        assert ours.scores[step].shape == (3, VOCAB)
        torch.testing.assert_close(ours.scores[step], theirs.scores[step], **TOLERANCE)
        torch.testing.assert_close(ours.logits[step], theirs.logits[step], **TOLERANCE)
    assert (ours.scores[0][:, EOS] == float("-inf")).all() and ours.logits[0][:, EOS].isfinite().all()
    # dict-style access, as transformers' ModelOutput
    assert list(ours.keys()) == ["sequences", "scores", "logits"]
    assert ours["scores"] is ours.scores and ours[0] is ours.sequences


def test_sampled_scores_are_the_warped_logits(pair):
    """Step 0 depends on the prompt alone: its scores (repetition penalty, temperature, top-k, top-p as -inf) equal
    transformers'. Every step: -inf outside the top-k, finite at the drawn token; the engine keeps one row per
    token in order, as the cache-free reference generator does."""
    reference, model = pair
    ids = torch.stack(prompts(6, 6))
    warp = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3)
    kwargs = dict(max_new_tokens=8, eos_token_id=None, return_dict_in_generate=True, output_scores=True, **warp)
    ours = model.generate(ids, seed=5, output_logits=True, **kwargs)
    theirs = reference.generate(ids, pad_token_id=0, min_new_tokens=8, **kwargs)
    first = ours.scores[0].clone()
    first[:, EOS] = float("-inf")  # transformers' min_new_tokens forbids EOS; ours never stops (eos_token_id=None)
    torch.testing.assert_close(first, theirs.scores[0], **TOLERANCE)

    assert ours.sequences.shape == (2, 6 + 8) and len(ours.scores) == len(ours.logits) == 8
    for step, scores in enumerate(ours.scores):
        assert scores.shape == (2, VOCAB)
        assert (scores.isfinite().sum(-1) <= 20).all()  # top-k: -inf outside the 20 best
        token = ours.sequences[:, 6 + step]
        assert scores.gather(1, token[:, None]).isfinite().all()

    naive = model.generate(ids, seed=5, use_cache=False, **kwargs)
    assert torch.equal(naive.sequences, ours.sequences)
    for a, b in zip(naive.scores, ours.scores):
        torch.testing.assert_close(a, b, **TOLERANCE)
    assert naive.logits is None  # not asked


def test_a_row_that_stops_early_gets_zeros_after_its_end(pair):
    _, model = pair
    ids = torch.stack(prompts(5, 5))
    free = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
    stop = int(free[0, 5 + 1])  # row 0's second new token becomes the stop token
    out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=stop, pad_token_id=0,
                         return_dict_in_generate=True, output_scores=True)
    ends = [int((row[5:] == stop).nonzero()[0]) + 1 if (row[5:] == stop).any() else 6 for row in out.sequences]
    assert ends[0] <= 2 and len(out.scores) == max(ends)
    for step, scores in enumerate(out.scores):
        for row, end in enumerate(ends):
            assert (scores[row] == 0).all() == (step >= end)


def test_plain_calls_keep_nothing(pair):
    """Without return_dict_in_generate: the tensor, as transformers; with it alone: sequences only. Rows that keep
    scores take the per-row sampler; the others stay batched (no cost when not asked)."""
    _, model = pair
    ids = torch.stack(prompts(5))
    plain = model.generate(ids, max_new_tokens=3, do_sample=False, output_scores=True)
    assert isinstance(plain, torch.Tensor)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain) and out.scores is None and out.logits is None
    assert list(out.keys()) == ["sequences"] and "scores" not in out
    with pytest.raises(KeyError):
        out["scores"]
    assert batchable(SamplingParams(), 0, {EOS})
    assert not batchable(SamplingParams(output_scores=True), 0, {EOS})
    assert not batchable(SamplingParams(output_logits=True), 0, {EOS})
