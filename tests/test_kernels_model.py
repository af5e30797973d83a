"""The model with its Triton kernels (fused norms + RoPE, split-K decode attention, MoE experts) equals the model
without them: tiny random models of the four families on their shortest layer stacks (conftest.short_text_config),
fp32. Without a GPU the kernels run in Triton's interpreter on the CPU (`kernels.force()`); on a GPU they run
compiled, as in production."""

from unittest import mock

import pytest
import torch

pytest.importorskip("triton")

from gemma4 import Model, kernels  # noqa: E402
from gemma4.engine.generate import left_pad  # noqa: E402
from gemma4.options import DEFERRABLE, override  # noqa: E402
from reference import FAMILIES, VOCAB, reference_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WINDOW = 8


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request, tmp_path_factory, short_text_config):
    path = tmp_path_factory.mktemp(request.param)
    reference_model(short_text_config(request.param), seed=7).save_pretrained(path)
    return Model.from_pretrained(path, dtype=torch.float32, device=DEVICE)


def _ids():
    prompts = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (13, 6)]
    ids, mask = left_pad(prompts)
    return ids.to(DEVICE), mask.to(DEVICE)


def no_kernels():
    return override(kernels=False)


def test_prefill_logits_equal(model):
    """A left-padded prefill longer than the window: fused norms and RoPE (attention itself is SDPA here)."""
    ids, mask = _ids()
    with kernels.force():
        fused = model(ids, attention_mask=mask)
    with no_kernels():
        plain = model(ids, attention_mask=mask)
    valid = mask.bool()
    assert (fused - plain)[valid].abs().max() <= 1e-4


@pytest.mark.parametrize("rows", [2, 1])
def test_decode_logits_and_tokens_equal(model, rows):
    """Decode steps past the window over the cache with every kernel (the in-place decode attention), against the
    same cache path without any: logits within 1e-3 after the prefill and at each step, and identical greedy tokens.
    The kernels sum in another order (split-K softmax, fused reductions); Gemma's post-norms amplify that fp32 rounding
    to ~2e-4 in these random models, while a wrong mask, key bound or expert moves logits by 1e-2 or more. One row:
    every projection of a decode step goes through the GEMV kernel."""
    ids, mask = _ids()
    ids, mask = ids[:rows], mask[:rows]
    steps = 5  # the 13-token row decodes past the window, the 6-token row's queries cross it (positions 6 to 10)
    caches = {"fused": model.make_cache(rows, ids.shape[1] + steps + 7),
              "plain": model.make_cache(rows, ids.shape[1] + steps)}
    logits = {}
    for name, cache in caches.items():
        with kernels.force() if name == "fused" else no_kernels():
            seq = [model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]]
            for _ in range(steps):
                seq.append(model(seq[-1].argmax(-1, keepdim=True), cache=cache, last_only=True)[:, -1])
        logits[name] = torch.stack(seq)
    assert (logits["fused"] - logits["plain"]).abs().max() <= 1e-3
    assert torch.equal(logits["fused"].argmax(-1), logits["plain"].argmax(-1))


def test_deferred_norms_change_no_value(model, request):
    """At batch 1 the residual norms after o_proj, down_proj and the PLE projection are left to the GEMV that reads
    them (DeferredNorms) instead of the producing GEMV's last program. The same ops on the same values: decode logits
    equal those with no norm deferred (bit-equal under the interpreter; compiled, the two kernels' reductions may
    differ by an fp32 ulp), and the deferred path was taken where it applies (on the MoE family: o_proj's norms, by
    the dense MLP's GEMV and the routing GEMV, which also writes the experts' input)."""
    from gemma4.kernels import gemv as gemv_module
    from gemma4.kernels import router as router_module
    ids, mask = _ids()
    ids = ids[1:, mask[1].bool()]  # the unpadded 6-token prompt
    counted = {"normed": 0, "routed": 0}

    def counting(kernel):
        def wrapper(*args, norms=None, **kwargs):
            counted["normed"] += norms is not None
            return kernel(*args, norms=norms, **kwargs)
        return wrapper

    def counting_router(*args, attention_tail=None):
        counted["routed"] += attention_tail is not None
        return real_router(*args, attention_tail=attention_tail)
    real_router = router_module.project_and_route

    logits = {}
    for sites in (frozenset(), DEFERRABLE):
        cache = model.make_cache(1, ids.shape[1] + 4)
        with kernels.force(), override(defer_norms=sites), \
                mock.patch.object(gemv_module, "gemv", counting(gemv_module.gemv)), \
                mock.patch.object(gemv_module, "gemv_gated", counting(gemv_module.gemv_gated)), \
                mock.patch.object(router_module, "project_and_route", counting_router):
            out = model(ids, cache=cache, last_only=True)
            steps = []
            for _ in range(3):
                out = model(out[:, -1].argmax(-1, keepdim=True), cache=cache, last_only=True)
                steps.append(out[:, -1])
        logits[sites] = torch.stack(steps)
        if not sites:
            assert counted["normed"] == counted["routed"] == 0
    layers = model.config.text_config.num_hidden_layers
    # at least the attention's residual norms in every layer of every step
    assert counted["normed"] >= 3 * layers
    assert counted["routed"] == (3 * layers if request.node.callspec.params["model"] == "26B-A4B" else 0)
    if DEVICE == "cpu":
        assert torch.equal(logits[frozenset()], logits[DEFERRABLE])
    else:
        torch.testing.assert_close(logits[frozenset()], logits[DEFERRABLE], rtol=1e-4, atol=1e-4)


def test_serving_engine_decodes_in_place_over_the_paged_pools(model, request):
    """The serving engine's decode steps (one token per row) read the paged pools in place through the kernel's slot
    lists: greedy outputs equal the engine without kernels, with chunked prefill, several rows and a prompt longer
    than the window (ring slots overwritten). Two families (KV sharing + PLE; MoE + K=V): the interpreter is slow."""
    if request.node.callspec.params["model"] not in ("E2B", "26B-A4B"):
        pytest.skip("E2B and 26B-A4B cover the switches; the interpreter is slow")
    from gemma4.engine.engine import LLMEngine
    from gemma4.engine.sampling import SamplingParams

    prompts = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 12, 5)]
    params = SamplingParams(max_tokens=WINDOW + 2, temperature=0.0, ignore_eos=True)
    from gemma4.kernels import attention
    bounds = []  # per decode-kernel call: (window, whether each row's candidates were cut at its query + 1, or at
    # the window on sliding layers)
    real = attention.decode_attention

    def spy(query, key, value, key_positions, query_positions, window=None, **keys):
        if keys.get("slots") is not None:  # in place over the pools
            bound = keys.get("num_keys")
            # The values on the CPU only: on a GPU this may run under a graph capture (no host reads) or on padding
            # rows (bound 0), and the decode kernels' own tests check the bound there.
            wanted = query_positions.long() + 1 if window is None else (query_positions.long() + 1).clamp(max=window)
            cut = bound is not None and (query.is_cuda or bool((bound.long() == wanted).all()))
            bounds.append((window, cut))
        return real(query, key, value, key_positions, query_positions, window, **keys)

    with kernels.force(), mock.patch.object(attention, "decode_attention", spy):
        fused = LLMEngine(model, max_num_seqs=3, max_model_len=64, max_num_batched_tokens=8).generate(prompts, params)
    with no_kernels():
        plain = LLMEngine(model, max_num_seqs=3, max_model_len=64, max_num_batched_tokens=8).generate(prompts, params)
    assert fused == plain
    # Sliding layers too read only the candidates up to the query (the ring's slots past it are empty), at most the
    # window's.
    assert {window for window, _ in bounds} == {WINDOW, None} and all(cut for _, cut in bounds)


def test_serving_decode_in_padded_buckets_equals_unpadded(model, request):
    """The serving engine's graph step (`GraphedDecode`: static buffers, batch padded to a bucket, block tables as
    wide as the longest sequence allowed) run eagerly here: greedy outputs equal the plain engine's while rows
    finish at different lengths and 1-token prefill chunks go through the same step."""
    if request.node.callspec.params["model"] != "E2B":
        pytest.skip("one family: the interpreter is slow")
    from gemma4.engine.engine import LLMEngine
    from gemma4.engine.graphs import GraphedDecode
    from gemma4.engine.sampling import SamplingParams

    gen = torch.Generator().manual_seed(3)
    # A budget of 4 tokens: while three rows decode, the long prompt is prefilled one token per step.
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (3, 4, 2, 9)]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (WINDOW + 2, 8, 2, 2)]
    with kernels.force():
        engine = LLMEngine(model, max_num_seqs=4, max_model_len=48, max_num_batched_tokens=4)
        engine.runner.graphs = GraphedDecode(model, engine.blocks, engine.max_model_len)
        calls = []
        run = engine.runner.graphs.run
        engine.runner.graphs.run = lambda seqs, ahead=None: calls.append(len(seqs)) or run(seqs, ahead)
        padded = engine.generate(prompts, params)
    with no_kernels():
        plain = LLMEngine(model, max_num_seqs=4, max_model_len=48, max_num_batched_tokens=4).generate(prompts, params)
    assert padded == plain
    assert 3 in calls and 1 in calls  # odd batch sizes went through padded buckets
