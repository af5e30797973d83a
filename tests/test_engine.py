"""Continuous-batching engine: batch-independence, preemption, cancellation, seeds."""

import torch
import pytest

from reference import text_config_dict

from gemma4.config import Config
from gemma4.engine.engine import LLMEngine
from gemma4.engine.generate import generate
from gemma4.engine.sampling import SamplingParams
from gemma4 import Model
from gemma4.random_init import randomize_


@pytest.fixture(scope="module")
def model():
    # E2B's tiny family: sliding (window 8), global and KV-shared layers.
    config = Config.from_dict({"model_type": "gemma4", "text_config": text_config_dict("E2B"),
                               "vision_config": None, "audio_config": None})
    return randomize_(Model(config), 0).eval()


def prompts(count, seed=1, longest=40):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (int(torch.randint(1, longest, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


GREEDY = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[])


def test_single_request_matches_reference_generate(model):
    for prompt in prompts(3, seed=5):
        ref = generate(model, torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                       use_cache=False)
        assert LLMEngine(model, max_num_seqs=2, max_model_len=64).generate([prompt], GREEDY)[0] == \
            ref[0, len(prompt):].tolist()


def test_64_concurrent_greedy_equal_served_alone(model):
    batch = prompts(64)
    alone = [LLMEngine(model, max_num_seqs=1, max_model_len=64).generate([p], GREEDY)[0] for p in batch]
    # A small token budget (chunked prefill mixed with decodes) and few KV blocks (preemption).
    engine = LLMEngine(model, max_num_seqs=64, max_model_len=64, max_num_batched_tokens=48, num_blocks=30)
    together = engine.generate(batch, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert together == alone
    assert engine.blocks.usage == 0 and len(engine.blocks.free_rings) == 64


def test_abort_frees_kv_and_others_continue(model):
    engine = LLMEngine(model, max_num_seqs=4, max_model_len=64)
    keep = engine.add_request(prompts(1, seed=2)[0], GREEDY)
    drop = engine.add_request(prompts(1, seed=3, longest=20)[0], SamplingParams(max_tokens=30, temperature=0))
    engine.step()
    engine.abort(drop)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert any(o.seq_id == drop and o.finish_reason == "abort" for o in outs)
    assert [o.finish_reason for o in outs if o.seq_id == keep and o.finished] == ["length"]
    assert engine.blocks.usage == 0


def test_seeded_sampling_is_batch_independent(model):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_k=50, seed=123, stop_token_ids=[])
    batch = prompts(6, seed=4)
    alone = LLMEngine(model, max_num_seqs=1, max_model_len=64).generate([batch[0]], params)[0]
    together = LLMEngine(model, max_num_seqs=8, max_model_len=64).generate(batch, params)
    assert together[0] == alone


def test_rejects_too_long(model):
    engine = LLMEngine(model, max_num_seqs=2, max_model_len=32)
    with pytest.raises(ValueError, match="maximum context length"):
        engine.add_request(list(range(3, 30)), SamplingParams(max_tokens=10))


# --- images and audio ---------------------------------------------------------------------------------------------

def test_warm_up_fits_a_short_max_model_len(model):
    """warm_up's prompts (256 tokens, twice the window and more) are cut to what max_model_len takes: a server started
    with --max-model-len 64 on a GPU warmed up with a 256-token prompt and refused it."""
    engine = LLMEngine(model, max_num_seqs=2, max_model_len=24)
    engine.warm_up()
    assert len(engine.generate([[5] * 14], GREEDY)[0]) == 10  # and serves (14 + 10 tokens: max_model_len 24)


@pytest.fixture(scope="module", params=["E2B", "26B"])
def mm(request):
    """Tiny multimodal models of test_multimodal.py: E2B-like (vision + audio towers, KV sharing) and 26B-like
    (MoE, bidirectional attention among an image's tokens)."""
    from reference import text_config_dict
    from test_multimodal import config_dict
    return request.param, randomize_(Model(Config.from_dict(config_dict(request.param, text_config_dict))), 7).eval()


def mm_prompt(kind, seed):
    """One prompt: text, image, text, image[, audio], text; with its processor outputs."""
    from gemma4.processing.image import process_images
    from test_multimodal import random_image, two_image_row
    import numpy as np
    images = process_images([random_image(64, 120, seed), random_image(50, 50, seed + 1)], max_soft_tokens=70)
    return two_image_row(kind, images, np.random.default_rng(seed), seed)


def test_media_requests_equal_model_generate(mm):
    """Image/audio prompts served by the engine equal model.generate(**inputs), alone and batched with text
    requests under a small token budget (chunks end at image boundaries) and few KV blocks (preemption)."""
    kind, model = mm
    requests = [mm_prompt(kind, seed) for seed in (0, 1)]
    params = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[])
    expected = []
    for ids, media in requests:
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None, **media)
        expected.append(out[0, len(ids):].tolist())
        assert LLMEngine(model, max_num_seqs=1, max_model_len=256).generate([ids], params, [media])[0] == \
            expected[-1]
    texts = prompts(6, seed=9)
    alone = [LLMEngine(model, max_num_seqs=1, max_model_len=256).generate([p], params)[0] for p in texts]
    longest = max(len(ids) for ids, _ in requests) + 8
    blocks = -(-(longest + 1) // 16) + 2  # one longest sequence and two blocks more: preemptions
    engine = LLMEngine(model, max_num_seqs=8, max_model_len=longest, max_num_batched_tokens=72, num_blocks=blocks)
    soft = engine.encode_media(*requests[0])  # one encoding shared by two sequences (the n choices of a request)
    batch = [requests[0][0], texts[0], requests[1][0], requests[0][0], *texts[1:]]
    media = [soft, None, requests[1][1], soft] + [None] * 5
    got = engine.generate(batch, params, media)
    assert got == [expected[0], alone[0], expected[1], expected[0], *alone[1:]]
    assert engine.scheduler.num_preemptions > 0
    assert engine.blocks.usage == 0


def test_image_chunks_never_split(mm):
    kind, model = mm
    ids, media = mm_prompt(kind, 0)
    engine = LLMEngine(model, max_num_seqs=2, max_model_len=256, max_num_batched_tokens=70)
    soft = engine.encode_media(ids, media)
    assert len(soft.vision_runs) == 2 and soft.vision_runs[0][1] - soft.vision_runs[0][0] == 66
    seq_id = engine.add_request(ids, GREEDY, soft)
    seq = engine.seqs[seq_id]
    ends = []
    while seq.num_cached < len(ids):
        engine.step()
        ends.append(seq.num_cached)
    assert all(not (a < e < b) for e in ends for a, b in soft.vision_runs)
    with pytest.raises(ValueError, match="max-num-batched-tokens"):
        LLMEngine(model, max_num_seqs=2, max_model_len=256, max_num_batched_tokens=64).add_request(ids, GREEDY, media)
    with pytest.raises(ValueError, match="placeholder"):
        engine.encode_media(ids[:-20] if kind == "E2B" else ids[:40], media)


def test_decodes_are_not_padded_to_a_prefill_chunk(model, monkeypatch):
    """A step mixing decodes with a prefill chunk runs them as two forwards (decode rows one token wide), with the
    same tokens as each request alone."""
    from gemma4.engine.runner import ModelRunner

    widths = []
    forward = ModelRunner._forward_group
    monkeypatch.setattr(ModelRunner, "_forward_group", lambda self, items, decode, ahead=None, **kw: widths.append(
        (decode, max(item.num_tokens for item in items))) or forward(self, items, decode, ahead, **kw))
    engine = LLMEngine(model, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16)
    first = engine.add_request(prompts(1, seed=3)[0], GREEDY)
    engine.step()  # its prefill
    second = engine.add_request(list(range(3, 33)), GREEDY)  # 30 tokens: two chunks while the first decodes
    outputs = {first: [], second: []}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.seq_id].append(out.token)
    assert (True, 1) in widths and any(not decode and width > 1 for decode, width in widths)
    assert all(width == 1 for decode, width in widths if decode)
    for seq_id, prompt in ((first, prompts(1, seed=3)[0]), (second, list(range(3, 33)))):
        assert outputs[seq_id] == LLMEngine(model, max_num_seqs=1, max_model_len=64).generate([prompt], GREEDY)[0]


def test_token_ids_outside_the_vocabulary_are_refused(model):
    """The embedding kernel would read outside its table: every entry point refuses such ids with a ValueError."""
    vocab = model.config.text_config.vocab_size
    engine = LLMEngine(model, max_num_seqs=1, max_model_len=64)
    for bad in (vocab, -1):
        ids = torch.tensor([[3, 4, bad]])
        for call in (lambda: model(ids), lambda: generate(model, ids, max_new_tokens=2),
                     lambda: engine.add_request(ids[0].tolist(), GREEDY)):
            with pytest.raises(ValueError, match=f"token id {bad} is outside this model's vocabulary"):
                call()


def test_graphed_decode_table_rows_follow_their_sequences(model):
    """GraphedDecode keeps a host mirror of the block tables and rewrites a row only when its blocks change: after
    growth, a sequence moving to another row, a freed and re-admitted sequence (same length, other blocks), and a
    smaller batch, the mirror equals the tables built from scratch."""
    from types import SimpleNamespace

    from gemma4.engine.graphs import GraphedDecode

    engine = LLMEngine(model, max_num_seqs=4, max_model_len=64)
    graphs = GraphedDecode(model, engine.blocks, engine.max_model_len)
    width = graphs.host_tables.shape[1]
    a, b, c = (SimpleNamespace(block_table=t) for t in ([3, 4], [5], [6, 7, 8]))

    def check(seqs, size):
        graphs._update_table_rows(seqs, size)
        expected = engine.blocks.block_tables(seqs, width, size)
        assert torch.equal(graphs.host_tables[:size], expected)

    check([a, b, c], 4)
    a.block_table.append(9)  # growth
    check([a, b, c], 4)
    check([c, a], 2)  # rows move; a smaller bucket
    check([c, a, b], 4)
    b.block_table = [10]  # freed and re-admitted: same length, another block
    check([c, a, b], 4)
    check([b], 1)
    check([b, a], 4)  # rows 2..3 must be trash again


# --- the host one step ahead of the device -------------------------------------------------------------------------

def run_events(engine, batch, params):
    """Generate, recording each step's StepOutputs per sequence and the order of launches and token reads."""
    from gemma4.engine.runner import Launched

    events, launch, collect = [], engine.runner.launch, Launched.collect

    def logged_collect(self):
        if self._collected is None:
            events.append("read")
        return collect(self)

    engine.runner.launch = lambda batch, ahead=None: events.append("launch") or launch(batch, ahead)
    Launched.collect = logged_collect
    try:
        ids = [engine.add_request(p, sp) for p, sp in zip(batch, params)]
        outputs = {i: [] for i in ids}
        while engine.has_unfinished():
            for out in engine.step():
                outputs[out.seq_id].append((out.token, out.finished, out.finish_reason, out.num_output_tokens))
    finally:
        Launched.collect = collect
    return [outputs[i] for i in ids], events


def test_running_ahead_changes_no_output(model):
    """Engines running one step ahead (with and without the graphed decode step's inputs, run eagerly here) give
    every sequence the same outputs as an engine that reads each step's tokens before the next: greedy and seeded
    rows, rows stopping on a token mid-way (their extra step dropped), max_tokens 1 and 2, min_tokens, penalties
    (sampled at once), chunked prefill and preemption. The device reads the pending tokens: a PENDING id (-1) reaching
    the embedding would raise."""
    from dataclasses import replace

    from gemma4.engine.graphs import GraphedDecode

    batch = prompts(12, seed=11)
    free = LLMEngine(model, max_num_seqs=12, max_model_len=64).generate(batch, GREEDY)
    greedy = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[])
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_k=20, stop_token_ids=[])
    params = [replace(greedy, stop_token_ids=[free[0][3]]),  # stops on its 4th token: one step dropped
              replace(greedy, max_tokens=1), replace(seeded, seed=2, max_tokens=2),
              replace(greedy, stop_token_ids=[free[3][2]]), replace(seeded, seed=4),
              replace(greedy, stop_token_ids=[free[5][1]], min_tokens=5),  # sampled at once while the stop is held back
              replace(greedy, repetition_penalty=1.3),  # sampled at once
              replace(greedy, stop_token_ids=[free[7][5]]), replace(seeded, seed=8, max_tokens=3),
              replace(greedy, max_tokens=2), replace(seeded, seed=10), greedy]
    results = {}
    for name, ahead, graphed in (("step by step", False, False), ("ahead", True, False), ("graphed", True, True)):
        engine = LLMEngine(model, max_num_seqs=12, max_model_len=64, max_num_batched_tokens=40, num_blocks=14,
                           run_ahead=ahead)
        in_place = []  # per launch with batched tokens: whether they were sampled into the graphs' row of tokens
        if graphed:
            graphs = engine.runner.graphs = GraphedDecode(model, engine.blocks, engine.max_model_len)
            launch = engine.runner.launch

            def launch_noted(batch, ahead=None):
                launched = launch(batch, ahead)
                if launched.tokens is not None:
                    in_place.append(launched.tokens.data_ptr() == graphs.inputs.data_ptr())
                return launched
            engine.runner.launch = launch_noted
        results[name], events = run_events(engine, batch, params)
        assert all(in_place) and len(in_place) > 5 if graphed else not in_place
        assert engine.scheduler.num_preemptions > 0
        assert engine.blocks.usage == 0 and not engine.seqs and engine.in_flight is None
        if ahead:  # a step's tokens are read after the next step is launched
            assert "launch launch read launch read" in " ".join(events)
    assert results["ahead"] == results["step by step"] == results["graphed"]
    lengths = [len(out) for out in results["ahead"]]
    assert [out[-1][2] for out in results["ahead"]][:4:3] == ["stop", "stop"] and lengths[:4] == [4, 1, 2, 3]


def test_abort_while_a_token_is_in_flight(model):
    engine = LLMEngine(model, max_num_seqs=2, max_model_len=64)
    keep = engine.add_request(prompts(1, seed=2)[0], GREEDY)
    drop = engine.add_request(prompts(1, seed=3)[0], GREEDY)
    engine.step()
    engine.step()
    seq = engine.seqs[drop]
    assert seq.pending and seq.output_ids[-1] == -1 and engine.in_flight is not None
    engine.abort(drop)
    assert not seq.pending and -1 not in seq.output_ids
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.finish_reason for o in outs if o.seq_id == drop] == ["abort"]
    assert [o.token for o in outs if o.seq_id == keep][-1] is not None
    assert engine.blocks.usage == 0


# --- one request cannot take the others down -----------------------------------------------------------------------

class Poisoned(torch.nn.Module):
    """`model` whose logits turn NaN (or whose forward raises `error`) for rows at positions >= `position`."""

    def __init__(self, model, position, error=None):
        super().__init__()
        self.inner, self.position, self.error = model, position, error
        self.config, self.dtype, self.device = model.config, model.dtype, model.device
        self.generation_config = {}

    def forward(self, input_ids, position_ids=None, return_hidden=False, **kwargs):
        logits, hidden = self.inner(input_ids, position_ids=position_ids, return_hidden=True, **kwargs)
        bad = position_ids[:, -1] >= self.position
        if bad.any() and self.error is not None:
            raise self.error
        logits = logits.masked_fill(bad[:, None, None], float("nan"))
        return (logits, hidden) if return_hidden else logits


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(max_tokens=10, temperature=1.0, stop_token_ids=[]),
                                    SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.2,
                                                   stop_token_ids=[])],
                         ids=["greedy batched", "sampled batched", "full sampler"])
@pytest.mark.parametrize("run_ahead", [True, False])
def test_a_sequence_that_cannot_be_sampled_fails_alone(model, params, run_ahead):
    """NaN logits for one sequence (from its fourth token on): it ends with finish_reason "error" and a message;
    the sequences batched with it give what they give alone, and the engine takes new requests after."""
    others = prompts(5, seed=21, longest=10)  # positions < 20: never poisoned
    poisoned = [7] * 30
    engine = LLMEngine(Poisoned(model, len(poisoned) + 2), max_num_seqs=8, max_model_len=64, run_ahead=run_ahead)
    ids = [engine.add_request(p, params if p is poisoned else GREEDY) for p in [*others[:3], poisoned, *others[3:]]]
    outputs = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.seq_id].append(out)
    bad = outputs[ids[3]]
    assert bad[-1].finished and bad[-1].finish_reason == "error" and "NaN" in bad[-1].error
    assert [o.token is not None for o in bad] == [True, True, True, False]
    alone = LLMEngine(model, max_num_seqs=1, max_model_len=64).generate(others, GREEDY)
    assert [[o.token for o in outputs[i] if o.token is not None] for i in ids[:3] + ids[4:]] == alone
    assert engine.blocks.usage == 0 and not engine.seqs
    assert engine.generate([others[0]], GREEDY) == alone[:1]


def test_a_failing_forward_fails_its_batch_and_the_engine_goes_on(model):
    short, long = prompts(1, seed=23, longest=10)[0], prompts(1, seed=24, longest=10)[0] + [5] * 30
    engine = LLMEngine(Poisoned(model, 35, error=torch.cuda.OutOfMemoryError("out of memory")), max_num_seqs=1,
                       max_model_len=64)
    ids = [engine.add_request(p, GREEDY) for p in (long, short)]  # one at a time: the long one fails alone
    outputs = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.seq_id].append(out)
    assert outputs[ids[0]][-1].finish_reason == "error" and "out of memory" in outputs[ids[0]][-1].error
    assert [o.token for o in outputs[ids[1]]] == LLMEngine(model, max_num_seqs=1, max_model_len=64).generate(
        [short], GREEDY)[0]
    assert engine.blocks.usage == 0


def test_a_device_error_stops_the_engine(model):
    engine = LLMEngine(Poisoned(model, 0, error=torch.AcceleratorError("CUDA error: an illegal memory access")),
                       max_num_seqs=2, max_model_len=64)
    engine.add_request(prompts(1)[0], GREEDY)
    with pytest.raises(torch.AcceleratorError):
        engine.step()


def test_bad_words_never_complete(model):
    """vLLM's bad_words (token sequences): a one-token word is never sampled; a longer one's last token never follows
    the rest. Chosen from the unconstrained greedy output, so that the model would write them: the output is the
    same until the banned token would come, and other from there."""
    prompt = prompts(1, seed=5)[0]
    engine = LLMEngine(model, max_num_seqs=2, max_model_len=64)

    def greedy(bad_words=None):
        return engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[],
                                                        bad_words=bad_words))[0]

    free = greedy()
    for word in ([free[3]], free[6:8]):
        at = next(i for i in range(len(free)) if free[i:i + len(word)] == word) + len(word) - 1  # its last token
        banned = greedy([word])
        assert banned[:at] == free[:at] and banned[at] != free[at]
        assert all(banned[i:i + len(word)] != word for i in range(len(banned)))
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=[[]])
