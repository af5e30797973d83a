"""A lone prefill chunk replayed from a CUDA graph (engine/graphs.py `GraphedPrefill`): static input buffers, the
chunk left-padded to a width bucket, its cached context gathered up to a context bucket, the block table as wide as
the longest sequence allowed. Without a GPU the same padded step runs eagerly: outputs equal the engine's eager
chunks, turn 2 of a chat from the prefix cache included. The buckets here are small (widths 4-16, contexts 8-32
tokens) so that tiny prompts cross every case; the tiny configs have a sliding window of 8 and blocks of 16."""

import pytest
import torch

from reference import engine_outputs, text_config_dict, tiny_model

from gemma4 import kernels
from gemma4.engine.engine import LLMEngine
from gemma4.engine.graphs import GraphedPrefill
from gemma4.engine.sampling import SamplingParams
from gemma4.options import override

PARAMS = SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[], logprobs=1)


@pytest.fixture(scope="module", params=["E2B", "26B-A4B", "31B"])
def model(request):
    """E2B: KV-shared layers and per-layer inputs; 26B-A4B: MoE, K=V global layers; 31B: dense, K=V."""
    return tiny_model(text_config_dict(request.param))


def tokens(n, seed):
    ids = torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.where((ids == 50) | (ids == 106), ids + 1, ids).tolist()  # no stop id inside a prompt


def with_prefill_graphs(engine, widths=(4, 8, 16), contexts=(8, 32)):
    """Install GraphedPrefill with small buckets; returns the list of (chunk tokens, cached before, bucket or None
    where the chunk ran eagerly) that its runs append to."""
    graphs = GraphedPrefill(engine.runner.model, engine.blocks, engine.max_model_len, widths, contexts)
    runs, run = [], graphs.run

    def logged(seq, num_tokens, ahead=None):
        start, out = seq.num_cached, run(seq, num_tokens, ahead)
        runs.append((num_tokens, start, graphs.bucket(num_tokens, start) if out is not None else None))
        return out

    graphs.run = logged
    engine.runner.prefill_graphs = graphs
    return runs


def assert_same(got, expected):
    for (ids, logprobs), (ref_ids, ref_logprobs) in zip(got, expected):
        assert ids == ref_ids
        # fp32: a padded chunk sums in another order only where a product's shape changed
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_logprobs), rtol=0, atol=1e-4)


def test_a_chat_and_a_batch_equal_the_eager_chunks(model):
    """Turn 1 (22 tokens in chunks of up to 12, split at the prefix cache's snapshot point 16), turn 2 from the
    prefix cache, then two prompts prefilled in one step (eager: a graph holds one sequence) and a third one's chunk
    beside their decode rows."""
    first = tokens(22, 0)
    engines = [LLMEngine(model, max_num_seqs=4, max_model_len=96, max_num_batched_tokens=12) for _ in range(2)]
    runs = with_prefill_graphs(engines[0])
    turn1 = [engine_outputs(e, [first], PARAMS) for e in engines]
    assert_same(*turn1)
    second = first + turn1[1][0][0] + tokens(9, 1)  # 37 tokens
    turn2 = [engine_outputs(e, [second], PARAMS) for e in engines]
    assert_same(*turn2)
    assert engines[0].blocks.hit_tokens == engines[1].blocks.hit_tokens == 16
    # (chunk tokens, cached before it, (width, context)): chunks padded to wider buckets, contexts padded past the
    # cached tokens (12 -> 16, 28 -> 32), turn 2 starting from the 16 cached tokens
    assert runs == [(12, 0, (16, 0)), (4, 12, (4, 16)), (6, 16, (8, 16)),
                    (12, 16, (16, 16)), (4, 28, (4, 32)), (5, 32, (8, 32))]
    runs.clear()
    together = [engine_outputs(e, [tokens(5, 2), tokens(7, 3), tokens(3, 4)], PARAMS) for e in engines]
    assert_same(*together)
    assert runs == [(3, 0, (4, 0))]


def test_chunks_past_the_buckets_run_eagerly(model):
    """Chunks longer than the widest bucket, or after more cached tokens than the largest context, run the eager
    forward (the graph's run answers None); the outputs are the same."""
    prompt = tokens(70, 5)
    engines = [LLMEngine(model, max_num_seqs=2, max_model_len=96, max_num_batched_tokens=24) for _ in range(2)]
    runs = with_prefill_graphs(engines[0], widths=(4, 8, 16), contexts=(8, 32))
    assert_same(*[engine_outputs(e, [prompt], PARAMS) for e in engines])
    # 24 tokens: wider than 16; 16 tokens after 48 cached: more than 32 (the chunks split at the snapshot point 64)
    assert runs == [(24, 0, None), (24, 24, None), (16, 48, None), (6, 64, None)]


def test_a_chunk_ending_at_a_pending_token_reads_it_on_the_device(model):
    """A chunk whose last token the step in flight sampled (PENDING on the host: engine.py, run ahead) takes that
    token from the device: the logits equal the eager chunk's with the token known, and differ with another one."""
    from types import SimpleNamespace

    from gemma4.engine.scheduler import Scheduled
    from gemma4.engine.sequence import PENDING

    engine = LLMEngine(model, max_num_seqs=2, max_model_len=64)
    engine.add_request(tokens(10, 30), PARAMS)
    (item,) = engine.scheduler.schedule()  # admitted, its blocks reserved
    seq, runner = item.seq, engine.runner
    runner.prefill_graphs = GraphedPrefill(model, engine.blocks, engine.max_model_len, (4, 8, 16), (8, 32))
    seq.output_ids.append(PENDING)  # 11 tokens, the last one on the device
    logits = {}
    for token in (77, 78):
        ahead = SimpleNamespace(tokens=torch.tensor([5, token]), source=lambda s: 1)
        logits[token] = runner.prefill_graphs.run(seq, 11, ahead)[0].clone()
    seq.output_ids[-1], runner.prefill_graphs = 77, None
    eager = runner._forward_group([Scheduled(seq, 11)], decode=False)[0]
    torch.testing.assert_close(logits[77], eager, rtol=0, atol=1e-4)
    assert (logits[78] - eager).abs().max() > 1e-2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernels on CPU tensors need Triton's interpreter; "
                    "on a GPU: test_gpu.py's test_prefill_graphs_equal_eager_chunks")
def test_with_the_kernels_equals_the_plain_eager_chunks(request):
    """The CUDA path's kernels (flash prefill attention over the bucket's gathered context, the MoE kernels, fused
    norms), in the interpreter: a chat's two turns through the graphs' padded step equal the plain engine's."""
    model = tiny_model(text_config_dict("26B-A4B"))
    first = tokens(22, 7)
    plain = LLMEngine(model, max_num_seqs=2, max_model_len=96, max_num_batched_tokens=12)
    with override(kernels=False):
        turn1 = engine_outputs(plain, [first], PARAMS)
        second = first + turn1[0][0] + tokens(9, 8)
        turn2 = engine_outputs(plain, [second], PARAMS)
    with kernels.force():
        engine = LLMEngine(model, max_num_seqs=2, max_model_len=96, max_num_batched_tokens=12)
        runs = with_prefill_graphs(engine, widths=(8, 16), contexts=(16, 32))
        assert_same(engine_outputs(engine, [first], PARAMS), turn1)
        assert_same(engine_outputs(engine, [second], PARAMS), turn2)
    assert {bucket for _, _, bucket in runs} == {(16, 0), (8, 16), (16, 16), (8, 32)}


def test_a_drafter_starts_from_the_graphs_hidden_state():
    """Speculative decoding's first drafting round starts from the final hidden state of the prompt's last token,
    which a prefill graph returns: the drafts equal those after eager chunks (greedy outputs alone could not tell:
    speculation never changes them)."""
    from gemma4.assistant_checkpoint import assistant_config_for, random_assistant

    model = tiny_model(text_config_dict("31B"))
    config = assistant_config_for(model.config.text_config, num_layers=2, hidden_size=32, intermediate_size=64)
    drafter = random_assistant(config, dtype=torch.float32, seed=1)
    batch = [tokens(n, 40 + n) for n in (5, 14, 27)]
    drafted = []
    for graphed in (False, True):
        # run_ahead=False: the prompt's first token is on the host at once, so the next step drafts from the
        # prefill's hidden state (running ahead, it decodes that pending token first)
        engine = LLMEngine(model, max_num_seqs=4, max_model_len=96, max_num_batched_tokens=16,
                           speculative_model=drafter, num_speculative_tokens=3, run_ahead=False)
        runs = with_prefill_graphs(engine) if graphed else []
        drafts, draft = [], engine.speculator.draft

        def recorded(seqs, counts, draft=draft, drafts=drafts):
            out = draft(seqs, counts)
            drafts.append([list(d) for d in out[0]])
            return out

        engine.speculator.draft = recorded
        engine.generate(batch, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[]))
        drafted.append(drafts)
    assert any(bucket is not None for _, _, bucket in runs)
    assert drafted[0] == drafted[1] and len(drafted[0]) > 3
