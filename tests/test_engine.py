"""Continuous-batching engine: batch-independence, preemption, cancellation, seeds."""

import torch
import pytest

from reference import text_config_dict

from gemma4.config import Config
from gemma4.engine.engine import LLMEngine
from gemma4.engine.generate import generate
from gemma4.engine.sampling import SamplingParams
from gemma4.model.gemma4 import Model
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


def test_single_request_matches_static_generate(model):
    for prompt in prompts(3, seed=5):
        ref = generate(model, torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None)
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
