"""CUDA-only checks of the fast decode path: the CUDA-graph step equals the same step run eagerly, and the
device-side MoE and sampler paths equal their references. Skipped where there is no CUDA device."""

import pytest
import torch

from gemma4 import Model
from gemma4.engine.generate import free_engine, left_pad
from gemma4.model.text import MLP, Experts, Router
from gemma4.options import override
from reference import FAMILIES, VOCAB, saved_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STEPS = 40  # >= 32 decode steps, past several sliding windows (8) of the tiny configs


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory):
    return saved_reference(request.param, tmp_path_factory.mktemp(request.param), seed=7)


def padded_prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids, mask = left_pad([torch.randint(3, VOCAB, (n,), generator=gen) for n in lengths])
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("lengths", [(9,), (4, 12, 7)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_graph_greedy_tokens_equal_eager(checkpoint, lengths, dtype):
    """`Model.generate` on CUDA: the engine's decode steps replayed from CUDA graphs run the very kernels of the eager
    engine, so greedy tokens are identical, in bf16 too; twice on the kept engine; in fp32 also the reference's."""
    model = Model.from_pretrained(checkpoint, dtype=dtype, device="cuda")
    ids, mask = padded_prompts(lengths)
    kwargs = dict(attention_mask=mask, max_new_tokens=STEPS, do_sample=False, eos_token_id=None)
    graph, again = model.generate(ids, **kwargs), model.generate(ids, **kwargs)
    graphs = model.__dict__["_engine"].engine.runner.graphs
    assert graphs is not None and graphs.usable and graphs.graphs, graphs and graphs.describe()
    free_engine(model)
    with override(cuda_graphs=False):
        eager = model.generate(ids, **kwargs)
        assert model.__dict__["_engine"].engine.runner.graphs is None
    free_engine(model)
    assert torch.equal(eager, graph) and torch.equal(graph, again)
    if dtype == torch.float32:
        assert torch.equal(graph, model.generate(ids, use_cache=False, **kwargs))


def test_graph_logits_close_to_eager_bf16(checkpoint):
    """bf16 logits of 32 graph steps vs the same steps run eagerly, on two engines fed the same tokens. Both run the
    same kernels on the same inputs, so they should agree to the bit; the bound (1e-2 of the logits' scale, about two
    bf16 ulps of the hidden states after softcapping) only leaves room for a cuBLAS heuristic choosing another
    algorithm inside capture, and is far below what a stale or wrongly-written cache slot does (O(1))."""
    from gemma4.engine.engine import LLMEngine
    from gemma4.engine.sampling import SamplingParams

    model = Model.from_pretrained(checkpoint, dtype=torch.bfloat16, device="cuda")
    graph = LLMEngine(model, max_num_seqs=2, max_model_len=64, run_ahead=False)
    with override(cuda_graphs=False):
        eager = LLMEngine(model, max_num_seqs=2, max_model_len=64, run_ahead=False)
    logits = {}
    for name, engine in (("graph", graph), ("eager", eager)):  # each step's logits, as the runner returns them
        forward = engine.runner.forward
        engine.runner.forward = lambda batch, ahead=None, f=forward, n=name: (  # (logits, hidden) passed on
            lambda out: logits.setdefault(n, []).append(out[0].clone()) or out)(f(batch, ahead))
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 11)]
    params = SamplingParams(max_tokens=33, temperature=0.0, ignore_eos=True)
    pairs = [(graph.seqs[graph.add_request(p, params)], eager.seqs[eager.add_request(p, params)]) for p in prompts]
    while eager.has_unfinished():  # in lockstep, the graph engine fed the eager engine's tokens
        graph.step()
        eager.step()
        for ours, theirs in pairs:
            ours.output_ids[-1:] = theirs.output_ids[-1:]
    assert graph.runner.graphs.graphs and len(logits["graph"]) == len(logits["eager"]) > 30
    for a, b in zip(logits["graph"], logits["eager"]):
        assert ((a - b).abs().max() / b.abs().max()) <= 1e-2


@pytest.mark.parametrize("tokens", [1, 4, 8, 300])
def test_gathered_and_grouped_moe_equal_loop_on_cuda(tokens):
    """bf16 on the device: the two paths round differently (the loop accumulates experts in bf16, the gathered path
    in fp32), so the bound is bf16's: 1e-2 relative to the output's scale."""
    from gemma4.config import TextConfig

    data = dict(FAMILIES["26B-A4B"])
    data.pop("model_type")
    config = TextConfig.from_dict(data)
    torch.manual_seed(tokens)
    experts, router = Experts(config).cuda(), Router(config).cuda()
    with torch.no_grad():
        for p in (*experts.parameters(), *router.parameters()):
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
        experts, router = experts.bfloat16(), router.bfloat16()
        x = torch.randn(tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
        weights, chosen = router(x)
        loop = experts.forward_loop(x, weights, chosen).float()
        gathered = experts.forward_gathered(x, weights, chosen).float()
        grouped = experts.forward_grouped(x, weights, chosen).float()
    assert ((loop - gathered).abs().max() / loop.abs().max()) <= 1e-2
    assert ((loop - grouped).abs().max() / loop.abs().max()) <= 1e-2


def test_sampled_graph_decode_reproduces_with_seed(checkpoint):
    model = Model.from_pretrained(checkpoint, dtype=torch.bfloat16, device="cuda")
    ids, mask = padded_prompts((6, 9), seed=4)
    kwargs = dict(attention_mask=mask, max_new_tokens=STEPS, do_sample=True, temperature=0.9, top_k=30, top_p=0.9)
    a, b, c = (model.generate(ids, seed=s, **kwargs) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, ids.shape[1]:] < VOCAB).all()


def test_dense_mlp_beside_the_experts(monkeypatch, tmp_path):
    """26B-A4B on CUDA: the dense MLP's kernels run on a second stream (model/fused.py Beside), in the CUDA graphs
    too, and the greedy tokens (fp32) equal those of the dense MLP run in line; batch 1 and a padded batch of 3
    (the sorted experts' path at 24 pairs is the serving one)."""
    from gemma4.model import fused, text

    checkpoint = saved_reference("26B-A4B", tmp_path, seed=7)
    model = Model.from_pretrained(checkpoint, dtype=torch.float32, device="cuda")
    streams = set()
    mlp_forward = text.MLP.forward
    monkeypatch.setattr(text.MLP, "forward", lambda self, x: streams.add(torch.cuda.current_stream()) or
                        mlp_forward(self, x))
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(text, "Beside", lambda x, enabled=True, on=enabled: fused.Beside(x, enabled and on))
        streams.clear()
        for lengths in ((9,), (4, 12, 7)):
            ids, mask = padded_prompts(lengths)
            results.append(model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                                          eos_token_id=None))
            free_engine(model)  # the next run captures its graphs again, with this setting
        side = set(fused.Beside._streams.values())
        assert len(side) == 1 and (streams == side if enabled else not streams & side), (streams, side)
    assert all(torch.equal(a, b) for a, b in zip(results[:2], results[2:]))


def test_serving_engine_graph_decode_equals_eager(checkpoint):
    """The serving engine's decode steps replayed from CUDA graphs (padded batch buckets, in-place paged
    attention) give the eager engine's tokens, while rows finish at different lengths (buckets shrink), one stops on
    a token, one is sampled with a seed; and running one step ahead (the default: the graph reads the last step's
    tokens on the device) changes nothing. In fp32: the decode kernel's split count follows the shapes (padded
    batch, block-table width), so in bf16 the two paths round differently and a tiny random model's greedy tokens
    may part."""
    dtype = torch.float32
    from gemma4.engine.engine import LLMEngine
    from gemma4.engine.sampling import SamplingParams

    model = Model.from_pretrained(checkpoint, dtype=dtype, device="cuda")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 17, 9, 1, 30)]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (STEPS, 7, 23, 12, 3)]
    params[2] = SamplingParams(max_tokens=23, temperature=1.0, top_k=40, seed=5, ignore_eos=True)

    def serve(run_ahead=True):
        engine = LLMEngine(model, max_num_seqs=5, max_model_len=96, max_num_batched_tokens=16, run_ahead=run_ahead)
        return engine.generate(prompts, params), engine.runner.graphs

    first, _ = serve()
    params[0] = SamplingParams(max_tokens=STEPS, temperature=0.0, stop_token_ids=[first[0][9]])
    graphed, graphs = serve()
    assert graphs is not None and graphs.usable and len(graphs.graphs) >= 3, graphs and graphs.describe()
    assert len(graphed[0]) <= 10 and graphed[0][-1] == first[0][9]
    assert serve(run_ahead=False)[0] == graphed
    with override(cuda_graphs=False):
        eager, no_graphs = serve()
    assert no_graphs is None
    assert graphed == eager


def test_prefill_graphs_equal_eager_chunks(checkpoint):
    """Lone prefill chunks replayed from CUDA graphs (`GraphedPrefill`: width and context buckets, captured during
    the run) give the eager chunks' greedy tokens and logprobs (fp32): a chat's turn 2 from the prefix cache, and a
    chunk beside decode rows."""
    from gemma4.engine.engine import LLMEngine
    from gemma4.engine.sampling import SamplingParams
    from reference import engine_outputs

    model = Model.from_pretrained(checkpoint, dtype=torch.float32, device="cuda")
    gen = torch.Generator().manual_seed(5)
    first = torch.randint(3, VOCAB, (40,), generator=gen).tolist()
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)

    def chat():
        engine = LLMEngine(model, max_num_seqs=4, max_model_len=160, max_num_batched_tokens=32)
        turn1 = engine_outputs(engine, [first], params)
        message = torch.randint(3, VOCAB, (20,), generator=torch.Generator().manual_seed(6)).tolist()
        second = first + turn1[0][0] + message
        together = engine_outputs(engine, [second, first[:9], first[9:30]], params)
        return turn1 + together, engine.runner.prefill_graphs

    graphed, graphs = chat()
    # chunks at context 0 and after a context (since turn 2 starts after turn 1's reply, its chunks are fewer)
    assert graphs is not None and graphs.usable, graphs and graphs.describe()
    assert {0} < {context for _, context in graphs.graphs}, graphs.describe()
    with override(prefill_graphs=False):
        eager, none = chat()
    assert none is None
    for (ids, logprobs), (ref_ids, ref_logprobs) in zip(graphed, eager):
        assert ids == ref_ids
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_logprobs), rtol=0, atol=1e-4)


def test_fused_projections_graph_decode_equals_unfused(checkpoint):
    """Fused q/k/v and gate/up matmuls (the CUDA default) on the CUDA-graph path: the unfused greedy tokens (fp32)."""
    with override(fuse_projections=False):
        model = Model.from_pretrained(checkpoint, dtype=torch.float32, device="cuda")
    assert all(m.gate_up_weight is None for m in model.modules() if isinstance(m, MLP))
    ids, mask = padded_prompts((4, 12, 7))
    kwargs = dict(attention_mask=mask, max_new_tokens=STEPS, do_sample=False, eos_token_id=None)
    plain = model.generate(ids, **kwargs)
    free_engine(model)  # its graphs hold the unfused weights
    assert torch.equal(plain, model.fuse_projections_().generate(ids, **kwargs))


@pytest.mark.parametrize("preset, dtype, num_layers, bound", [("E2B", torch.bfloat16, None, 0.99),
                                                               ("26B-A4B", torch.float32, 6, 0.999)])
def test_full_size_fast_path_close_to_plain_ops(preset, dtype, num_layers, bound):
    """Official shapes with random weights: what tiny configs cannot show (grids, tiles and offsets at head_dim 512,
    a 262K vocabulary, 128 experts, 1,024-slot rings). The CUDA default path (Triton kernels incl. the flash prefill
    attention, the paged cache, CUDA-graph decode) against plain PyTorch ops on the reference cache path (the `kernels`
    option off), over a prompt longer than the sliding window, then 8 decode steps both fed the plain path's greedy
    tokens.

    The paths sum in other orders, so hidden states part by rounding that the layers compound: the bound asks each
    step's logit vector to point the same way. E2B in bf16, all 35 layers: cosine >= 0.99 (measured on an H200).
    26B-A4B: a random router's top-8 of 128 has near-ties that bf16 rounding flips (3 layers on the CPU: bf16 vs
    fp32 logits at cosine 0.982; the whole bf16 model fast vs plain at 0.38 on an H200), each flip swapping an
    expert; so fp32, where flips are rare, on 6 layers (5 sliding + 1 global, every shape of the model), cosine >=
    0.999. A wrong slot, mask, expert or offset gives garbage or NaNs, far below either bound."""
    from gemma4.engine.engine import LLMEngine
    from gemma4.engine.sampling import SamplingParams
    from gemma4.random_init import random_config, random_model

    config = random_config(preset, num_layers, text_only=True)
    model = random_model(config, dtype, device="cuda")
    length = config.text_config.sliding_window + 100
    ids = torch.randint(10, 200_000, (1, length), generator=torch.Generator().manual_seed(0)).cuda()
    steps, max_len = 8, length + 16

    with torch.no_grad(), override(kernels=False):
        cache = model.make_cache(1, max_len)
        plain = [model(ids, cache=cache, last_only=True)[:, -1].float()]
        for _ in range(steps):
            plain.append(model(plain[-1].argmax(-1, keepdim=True), cache=cache, last_only=True)[:, -1].float())

    # The engine's path (its prefill, then decode steps replayed from a CUDA graph), fed the plain path's tokens.
    # No prefix cache: its snapshot points would split the prefill into chunks, and the first step would sample
    # nothing.
    engine = LLMEngine(model, max_num_seqs=1, max_model_len=max_len, max_num_batched_tokens=4096, run_ahead=False,
                       enable_prefix_caching=False)
    fast, forward = [], engine.runner.forward
    engine.runner.forward = lambda batch, ahead=None: (  # (logits, hidden) passed on
        lambda out: fast.append(out[0].clone()) or out)(forward(batch, ahead))
    seq_id = engine.add_request(ids[0].tolist(), SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True))
    seq = engine.seqs[seq_id]
    for logits in plain[:-1]:
        engine.step()
        seq.output_ids[-1] = int(logits.argmax(-1))
    engine.step()
    assert engine.runner.graphs is not None and engine.runner.graphs.graphs
    cosines = [torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item() for a, b in zip(fast, plain)]
    print(f"{preset} {dtype}: cosine per step {[round(c, 5) for c in cosines]}")  # shown with pytest -s
    assert len(fast) == len(plain)
    for step, (a, cosine) in enumerate(zip(fast, cosines)):
        assert torch.isfinite(a).all(), step
        assert cosine >= bound, (step, cosine)


@pytest.mark.parametrize("quantization", ["int4", "fp8"])
def test_quantized_tied_head_on_cuda(checkpoint, quantization):
    """Quantized on load on CUDA, the tied LM head is quantized too (for the logits only; the embedding lookups read
    the table): the logits are the softcapped product with the dequantized head (fp32 up to summation order), and
    the CUDA-graph decode gives the eager one's greedy tokens."""
    from gemma4.model.quantized import ON_LOAD

    model = Model.from_pretrained(checkpoint, dtype=torch.float32, device="cuda", quantization=quantization)
    head = model.quantized_head
    assert head is not None and head.scheme == ON_LOAD[quantization] and head.values.is_cuda
    table = model.text.embed_tokens.weight
    assert table.dtype == torch.float32 and head.shape == table.shape
    hidden = torch.randn(3, 1, table.shape[1], device="cuda")
    cap = model.config.text_config.final_logit_softcapping
    expected = torch.tanh(hidden @ head.dequantize(torch.float32).T / cap) * cap
    for rows in (hidden[:1], hidden):  # one row: the GEMV kernel; three: the quantized matmul kernel
        torch.testing.assert_close(model.logits(rows).float(), expected[:len(rows)], rtol=1e-4, atol=1e-4)
    ids, mask = padded_prompts((9,))
    kwargs = dict(attention_mask=mask, max_new_tokens=STEPS, do_sample=False, eos_token_id=None)
    graph = model.generate(ids, **kwargs)
    free_engine(model)
    with override(cuda_graphs=False):
        assert torch.equal(model.generate(ids, **kwargs), graph)
