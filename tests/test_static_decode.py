"""The static decode path (static KV cache, no host syncs in a step; what the CUDA graphs capture) equals the dynamic
reference path on the CPU, and the batched device sampler follows the per-row sampler's rules."""

import copy

import pytest
import torch

from gemma4 import Model
from gemma4.engine.generate import DecodeRunner, decode_mode, left_pad, token_steps
from gemma4.engine.sampling import SamplingParams, batchable, next_token_distribution, sample_batch
from reference import FAMILIES, VOCAB, saved_reference

WINDOW = 8


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request, tmp_path_factory):
    path = saved_reference(request.param, tmp_path_factory.mktemp(request.param), seed=5)
    return Model.from_pretrained(path, dtype=torch.float32)


def prompt(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_static_cache_logits_equal_dynamic_cache(model, dtype, tolerance):
    """Prefill in chunks, then 3 x window steps: the static cache attends over its whole (mostly empty) buffer
    and must give the logits of the dynamic cache. fp64: only summation order differs (1e-9 is far below what a
    wrong slot or mask does, 1e-2+); fp32: the post-norms amplify rounding to ~1e-5 on these random models."""
    model = copy.deepcopy(model).to(dtype)
    ids = prompt(2, 11)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in row 1
    steps = 3 * WINDOW
    dynamic = model.make_cache(2, ids.shape[1] + steps)
    static = model.make_cache(2, ids.shape[1] + steps + 5, static=True)  # a bigger buffer is fine too
    for start in range(0, ids.shape[1], 4):
        a = model(ids[:, start:start + 4], attention_mask=mask[:, start:start + 4], cache=dynamic, last_only=True)
        b = model(ids[:, start:start + 4], attention_mask=mask[:, start:start + 4], cache=static, last_only=True)
    for _ in range(steps):
        assert (a - b).abs().max() <= tolerance
        token = a[:, -1].argmax(-1, keepdim=True)
        a = model(token, cache=dynamic, last_only=True)
        b = model(token, cache=static, last_only=True)
    assert (a - b).abs().max() <= tolerance


def test_static_generate_equals_dynamic_generate(model):
    """Greedy tokens, left-padded batch, chunked prefill: identical on both paths (and twice on the same
    kept runner, whose cache is reset in place between calls)."""
    prompts = [prompt(1, n, seed=n)[0] for n in (4, 12, 7)]
    ids, mask = left_pad(prompts)
    kwargs = dict(attention_mask=mask, max_new_tokens=3 * WINDOW, do_sample=False, eos_token_id=None)
    dynamic = model.generate(ids, decode="dynamic", **kwargs)
    for _ in range(2):
        static = model.generate(ids, decode="static", prefill_chunk_size=5, **kwargs)
        assert torch.equal(dynamic, static)


def test_static_path_per_row_fallback_and_stops(model):
    """Rows with penalties or logprobs fall back to the per-row sampler; eos stops rows as before."""
    ids = prompt(2, 6, seed=9)
    kwargs = dict(max_new_tokens=12, do_sample=False, repetition_penalty=1.3, eos_token_id=None)
    assert torch.equal(model.generate(ids, decode="dynamic", **kwargs), model.generate(ids, decode="static", **kwargs))
    free = model.generate(ids[:1], max_new_tokens=10, do_sample=False, eos_token_id=None, decode="static")
    stop = int(free[0, 6 + 2])
    stopped = model.generate(ids[:1], max_new_tokens=10, do_sample=False, eos_token_id=stop, pad_token_id=0,
                             decode="static")
    reference = model.generate(ids[:1], max_new_tokens=10, do_sample=False, eos_token_id=stop, pad_token_id=0,
                               decode="dynamic")
    assert torch.equal(stopped, reference)


def test_static_path_runs_one_step_ahead(model, monkeypatch):
    """Where the device samples, the next step is launched before a step's tokens reach the caller (the GPU then
    never waits for the host); where the per-row sampler runs, only after. Stops mid-way give the reference's
    tokens either way."""
    launched = []
    step = DecodeRunner.step
    monkeypatch.setattr(DecodeRunner, "step", lambda self, tokens: launched.append(1) or step(self, tokens))
    ids = prompt(1, 6, seed=2)
    free = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, decode="static")
    stop = int(free[0, 6 + 4])
    for penalty, ahead in ((1.0, 1), (1.3, 0)):
        params = [SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=penalty)]
        launched.clear()
        seen = []
        for n, s in enumerate(token_steps(model, ids, None, params, [{stop}], decode="static"), start=1):
            seen.append(s.tokens[0])
            assert len(launched) == min(n - 1 + ahead, 9)
        reference = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=stop,
                                   repetition_penalty=penalty, decode="dynamic")
        assert seen[-1] == stop and seen == reference[0, 6:6 + len(seen)].tolist()
    assert len(launched) == len(seen) - 1  # with the penalty: no step after the stop


def test_seeded_sampling_on_static_path_reproduces(model):
    ids = prompt(2, 5)
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, decode="static")
    a, b = model.generate(ids, seed=3, **kwargs), model.generate(ids, seed=3, **kwargs)
    c = model.generate(ids, seed=4, **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_decode_modes():
    class Fake:
        device = torch.device("cpu")

    assert decode_mode(Fake()) == "dynamic"
    assert decode_mode(Fake(), "graph") == "static"  # no CUDA: the same step, eagerly
    with pytest.raises(ValueError, match="decode mode"):
        decode_mode(Fake(), "fast")


def test_runner_static_step_equals_model_step(model):
    ids = prompt(2, 6, seed=1)
    runner = DecodeRunner(model, 2, 32, graph=False)
    cache = model.make_cache(2, 32)
    a = model(ids, cache=cache, last_only=True)[:, -1]
    b = model(ids, cache=runner.cache, last_only=True)[:, -1]
    for _ in range(10):
        token = a.argmax(-1)
        a = model(token[:, None], cache=cache, last_only=True)[:, -1]
        b, greedy = runner.step(token)
        assert torch.allclose(a, b, atol=1e-4, rtol=0) and torch.equal(greedy, b.argmax(-1))


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


def test_static_prefill_attends_over_the_written_prefix_only(model):
    """A static cache's prefill chunk (never captured) plans the global keys up to its last position; a decode step
    (what the CUDA graph captures) plans the whole buffer, reading nothing back to the host."""
    from gemma4.config import FULL

    cache = model.make_cache(2, 64, static=True)
    positions = torch.arange(10).expand(2, 10)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :4] = False  # left padding
    cache.begin(positions, valid)
    assert cache.key_positions(FULL).tolist() == [list(range(10))] * 2
    cache.end()
    cache.begin(torch.full((2, 1), 10), torch.ones(2, 1, dtype=torch.bool))
    assert cache.key_positions(FULL).shape == (2, 64 + 1)
