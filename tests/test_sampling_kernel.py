"""The fused sampler (gemma4.kernels.logits.sample_candidates, taken by `sample_batch` for unseeded top-k rows on
the kernels path) draws from exactly the distribution `next_token_distribution` defines.

Without a GPU it runs in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1 before Triton is imported)."""

import pytest
import torch

pytest.importorskip("triton")

from gemma4 import kernels  # noqa: E402
from gemma4.engine import sampling  # noqa: E402
from gemma4.engine.sampling import SamplingParams, next_token_distribution, sample_batch  # noqa: E402
from gemma4.kernels import logits as logit_kernels  # noqa: E402
from gemma4.options import override  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROWS = [SamplingParams(temperature=1.0, top_p=0.95, top_k=64),  # Gemma's defaults
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.5, top_k=40),
        SamplingParams(temperature=1.0, top_k=64, min_p=0.05),
        SamplingParams(temperature=2.0, top_p=0.9, top_k=1),
        SamplingParams(temperature=0.5, top_p=0.8, top_k=64, min_p=0.1)]


def table(params):
    return torch.tensor([[p.temperature for p in params], [p.top_k for p in params], [p.top_p for p in params],
                         [p.min_p for p in params]], dtype=torch.float32, device=DEVICE)


def inverse_cdf(probs, order, u):
    """The token whose CDF interval (candidates in descending-logit order) holds u, or None within 1e-5 of a
    boundary (where float summation order may decide either way)."""
    cdf = probs[order].cumsum(0)
    if ((cdf - u).abs() < 1e-5).any():
        return None
    return int(order[min(int((cdf <= u).sum()), int((probs[order] > 0).nonzero().max()))])


def test_draw_inverts_the_reference_distribution():
    """For each row and uniform number, the kernel's token is the reference distribution's inverse CDF at u."""
    torch.manual_seed(0)
    logits = torch.randn(len(ROWS), 3000, device=DEVICE) * 3
    values, ids = logits.topk(64, dim=-1)
    checked = 0
    for u in torch.linspace(0.003, 0.997, 41).tolist():
        uniform = torch.full((len(ROWS),), u, device=DEVICE)
        out = logit_kernels.sample_candidates(values, ids, table(ROWS), uniform)
        for row, params in enumerate(ROWS):
            probs = next_token_distribution(logits[row], params)
            expected = inverse_cdf(probs, logits[row].argsort(descending=True), u)
            if expected is not None:
                assert int(out[row]) == expected, (row, u)
                checked += 1
    assert checked > 0.9 * 41 * len(ROWS)


def test_top_p_rule_only_when_asked():
    """top_p False skips the rule for every row: a row with top_p 0.5 then keeps its whole top-k."""
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]], device=DEVICE)
    values, ids = logits.topk(5, dim=-1)
    params = table([SamplingParams(top_p=0.5, top_k=5)])
    u = torch.tensor([0.999], device=DEVICE)
    assert int(logit_kernels.sample_candidates(values, ids, params, u)) == 0  # only the top token is kept
    assert int(logit_kernels.sample_candidates(values, ids, params, u, top_p=False)) == 4


def test_draws_follow_the_distribution():
    """Many independent draws of one row (uniform numbers from torch.rand, as sample_batch draws them): frequencies
    within 5 sigma of the probabilities."""
    torch.manual_seed(1)
    logits = torch.randn(1, 200, device=DEVICE) * 2
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=16)
    rows = 2000
    values, ids = logits.topk(16, dim=-1)
    tokens = logit_kernels.sample_candidates(values.expand(rows, -1), ids.expand(rows, -1), table([params] * rows),
                                             torch.rand(rows, device=DEVICE))
    probs = next_token_distribution(logits[0], params)
    counts = torch.bincount(tokens, minlength=200).float() / rows
    assert (counts[probs == 0] == 0).all()
    sigma = (probs * (1 - probs) / rows).sqrt()
    assert ((counts - probs).abs() <= 5 * sigma + 1e-9).all()


def test_sample_batch_path_choice(monkeypatch):
    """The fused kernel for unseeded rows with a top-k (greedy rows still take the raw argmax); rows with a seed or
    without a top-k take the eager path."""
    calls = []
    real = logit_kernels.sample_candidates
    monkeypatch.setattr(logit_kernels, "sample_candidates", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(2)
    logits = torch.randn(3, 2000, device=DEVICE)  # a vocabulary larger than TOP_K_CANDIDATES
    greedy = SamplingParams(temperature=0)
    with kernels.force():
        out = sample_batch(logits, [ROWS[0], greedy, ROWS[1]], [None] * 3)
        assert len(calls) == 1 and int(out[1]) == int(logits[1].argmax())
        for row, params in ((0, ROWS[0]), (2, ROWS[1])):
            assert next_token_distribution(logits[row], params)[out[row]] > 0
        sample_batch(logits, [ROWS[0]] * 3, [None, torch.Generator(DEVICE).manual_seed(0), None])
        sample_batch(logits, [SamplingParams(temperature=1.0)] * 3, [None] * 3)  # no top-k
        assert len(calls) == 1
    assert sampling.TOP_K_CANDIDATES >= 64



@pytest.mark.parametrize("kind", ["fused", "fused with a greedy row", "all greedy", "all greedy, eager"])
def test_rows_holding_a_nan_are_flagged(kind):
    """sample_batch's nan_id: each path returns valid ids (the next step may read them) and, beside them, nan_id for
    the rows whose logits hold a NaN (one NaN, at the least likely token, is enough) and the ids elsewhere. (The
    eager sampler raises on such a row: the runner then samples row by row, failing that one.)"""
    torch.manual_seed(4)
    logits = torch.randn(3, 2000, device=DEVICE)
    logits[1, logits[1].argmin()] = float("nan")
    greedy = SamplingParams(temperature=0)
    params = [ROWS[0], greedy, greedy] if kind == "fused with a greedy row" else \
        [ROWS[0]] * 3 if kind == "fused" else [greedy] * 3
    generators = [None] * 3
    with kernels.force() if kind != "all greedy, eager" else override(kernels=False):
        plain = sample_batch(logits, params, generators)
        tokens, checked = sample_batch(logits, params, generators, nan_id=-7)
    assert tokens.shape == checked.shape == plain.shape == (3,)
    assert ((tokens >= 0) & (tokens < 2000)).all()
    assert checked[1] == -7 and checked[[0, 2]].tolist() == tokens[[0, 2]].tolist()
    if params[2].greedy:  # (sampled rows draw anew each call)
        assert int(tokens[2]) == int(plain[2]) == int(logits[2].argmax())


@pytest.mark.parametrize("kind", ["fused", "fused with a greedy row", "all greedy", "seeded, eager"])
def test_sample_batch_writes_its_tokens_into_out(kind):
    """`out` (a decode graph's row of input tokens): every path leaves there the tokens it would return without it
    (the same uniform numbers), the kernels writing it themselves where no greedy row is merged in afterwards."""
    logits = torch.randn(3, 2000, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(5))
    greedy = SamplingParams(temperature=0)
    params = {"fused": [ROWS[0]] * 3, "fused with a greedy row": [ROWS[0], greedy, ROWS[1]], "all greedy": [greedy] * 3,
              "seeded, eager": [ROWS[0]] * 3}[kind]
    generators = lambda: [torch.Generator(DEVICE).manual_seed(1) if kind == "seeded, eager" else None] * 3  # noqa: E731
    with kernels.force():
        torch.manual_seed(6)
        expected, expected_checked = sample_batch(logits, params, generators(), nan_id=-7)
        out = torch.full((3,), -1, dtype=torch.long, device=DEVICE)
        torch.manual_seed(6)
        tokens, checked = sample_batch(logits, params, generators(), nan_id=-7, out=out)
    assert tokens is out and out.tolist() == expected.tolist() and checked.tolist() == expected_checked.tolist()


def test_allowed_token_ids_in_every_sample_batch_path(monkeypatch):
    """allowed_token_ids hold a row's token to them (-inf elsewhere, where logit_bias is added) on the fused kernel
    path, the eager one (a seeded row) and the greedy argmax; another row of the batch is not held."""
    calls = []
    real = logit_kernels.sample_candidates
    monkeypatch.setattr(logit_kernels, "sample_candidates", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(3)
    logits = torch.randn(2, 2000, device=DEVICE)
    allowed = [int(i) for i in logits[0].argsort()[:3]]  # the three least likely: never drawn without the rule
    for base in (ROWS[0], SamplingParams(temperature=0)):
        params = [SamplingParams(**{**vars(base), "allowed_token_ids": allowed}), base]
        with kernels.force():
            for generators in ([None, None], [torch.Generator(DEVICE).manual_seed(0), None]):
                for _ in range(5):
                    out = sample_batch(logits, params, generators).tolist()
                    assert out[0] in allowed and out[1] not in allowed
        if base.greedy:
            assert out == [max(allowed, key=lambda t: float(logits[0, t])), int(logits[1].argmax())]
    assert calls  # the fused kernel drew some of them
