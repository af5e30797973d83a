"""`Model.generate` runs on the engine: it equals the naive reference generator (a full forward per step, no cache)
on left-padded batches, chunked prefill, penalties, stops and seeds; and the batched device sampler follows the
per-row sampler's rules."""

import pytest
import torch

from gemma4 import Model
from gemma4.engine.generate import engine_for, left_pad
from gemma4.engine.sampling import SamplingParams, batchable, next_token_distribution, sample_batch
from reference import FAMILIES, VOCAB, saved_reference

WINDOW = 8


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request, tmp_path_factory):
    path = saved_reference(request.param, tmp_path_factory.mktemp(request.param), seed=5)
    return Model.from_pretrained(path, dtype=torch.float32)


def prompt(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_engine_equals_reference_on_a_padded_batch_in_chunks(model):
    """Greedy tokens, left-padded batch, chunked prefill, 3 x window steps: the engine's equal the reference's (and
    again on the kept engine)."""
    prompts = [prompt(1, n, seed=n)[0] for n in (4, 12, 7)]
    ids, mask = left_pad(prompts)
    kwargs = dict(attention_mask=mask, max_new_tokens=3 * WINDOW, do_sample=False, eos_token_id=None)
    reference = model.generate(ids, use_cache=False, **kwargs)
    for _ in range(2):
        assert torch.equal(model.generate(ids, prefill_chunk_size=5, **kwargs), reference)
    assert model.__dict__["_engine"].engine.max_num_seqs == 3


def test_penalties_stops_and_min_new_tokens_equal_reference(model):
    """Rows with penalties go through the per-row sampler; eos stops a row (then padded); min_new_tokens holds the
    stop back."""
    ids = prompt(2, 6, seed=9)
    kwargs = dict(max_new_tokens=12, do_sample=False, repetition_penalty=1.3, eos_token_id=None)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))
    free = model.generate(ids[:1], max_new_tokens=10, do_sample=False, eos_token_id=None)
    stop = int(free[0, 6 + 2])
    for extra in ({}, {"min_new_tokens": 6}):
        kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=stop, pad_token_id=0, **extra)
        stopped = model.generate(ids, **kwargs)
        assert torch.equal(stopped, model.generate(ids, use_cache=False, **kwargs))
        hits = (stopped[0, 6:] == stop).nonzero().flatten().tolist()
        if extra:  # the stop is held back for 6 tokens (the row may then never meet it)
            assert not hits or hits[0] >= 5
        else:
            assert hits[0] == (free[0, 6:] == stop).nonzero()[0].item() <= 2
        if hits:
            assert (stopped[0, 6 + hits[0] + 1:] == 0).all()


def test_seeded_sampling_reproduces(model):
    ids = prompt(2, 5)
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    a, b = model.generate(ids, seed=3, **kwargs), model.generate(ids, seed=3, **kwargs)
    c = model.generate(ids, seed=4, **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_kept_engine_grows_and_is_reused(model):
    model.__dict__.pop("_engine", None)
    first = engine_for(model, 2, 40)
    assert engine_for(model, 1, 30) is first and first.max_model_len == 1024
    grown = engine_for(model, 4, 30)
    assert grown is not first and grown.max_num_seqs == 4 and engine_for(model, 2, 900) is grown


def test_an_interrupted_stream_does_not_lose_another_callers_outputs(model):
    """Two callers on one engine: outputs of a request stepped by the other caller's `run` wait in its mailbox;
    closing a `run` early aborts its request."""
    engine = engine_for(model, 2, 64)
    greedy = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[])
    a = engine.add_request(prompt(1, 5, seed=1)[0].tolist(), greedy)
    b = engine.add_request(prompt(1, 6, seed=2)[0].tolist(), greedy)
    stream = engine.run([a])
    first = next(stream)
    tokens_b = [out.token for out in engine.run([b]) if out.token is not None]
    tokens_a = [first.token] + [out.token for out in stream if out.token is not None]
    alone = [engine.generate([prompt(1, n, seed=s)[0].tolist()], greedy)[0] for n, s in ((5, 1), (6, 2))]
    assert [t for t in tokens_a if t is not None] == alone[0] and tokens_b == alone[1]
    c = engine.add_request(prompt(1, 5, seed=1)[0].tolist(), greedy)
    stream = engine.run([c])
    next(stream)
    stream.close()
    while engine.has_unfinished():
        engine.step()
    assert not engine.mailbox and not engine.seqs and engine.blocks.usage == 0


# --- batched sampler -------------------------------------------------------------------------------------------------

def test_sample_batch_greedy_rows_take_the_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, top_p=0.5)]
    tokens = sample_batch(logits, params, [None] * 4)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=1.0, top_k=10, top_p=0.8, min_p=0.05),
])
def test_sample_batch_draws_only_from_the_per_row_support(params):
    """Every drawn token has positive probability under `next_token_distribution`, and the empirical
    frequencies match it (2,000 draws per row; 0.05 is ~5 standard errors of the largest probability)."""
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1)) * 3
    rows = 2000
    batch_logits = logits.repeat_interleave(rows, dim=0)
    torch.manual_seed(0)
    tokens = sample_batch(batch_logits, [params] * len(batch_logits), [None] * len(batch_logits))
    for r in range(3):
        probs = next_token_distribution(logits[r], params)
        drawn = tokens[r * rows:(r + 1) * rows]
        assert (probs[drawn] > 0).all()
        freq = torch.bincount(drawn, minlength=40).float() / rows
        assert (freq - probs).abs().max() < 0.05


def test_batchable():
    assert batchable(SamplingParams(), 0, {1})
    assert not batchable(SamplingParams(repetition_penalty=1.1), 0, {1})
    assert not batchable(SamplingParams(logprobs=0), 0, {1})
    assert not batchable(SamplingParams(min_tokens=3), 1, {1})
    assert batchable(SamplingParams(min_tokens=3), 3, {1})
    assert batchable(SamplingParams(min_tokens=3), 0, set())
