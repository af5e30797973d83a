"""Speculative decoding in the engine (engine/speculative.py): greedy outputs with a drafter equal those without one,
token for token (logprobs within fp32 rounding), whatever the drafter proposes; sampled outputs keep the target's
distribution. Tiny fp32 configs with a sliding window of 8: prompts and outputs run past it, so rejected drafts are
written over ring slots that later queries must not see.

Random drafters accept almost nothing, so the drafts also come from an oracle (the target's own greedy tokens:
everything is accepted) and a noisy oracle (a random number of them right, then a wrong one)."""

import random

import pytest
import torch

from reference import text_config_dict

from gemma4 import Model
from gemma4.assistant_checkpoint import assistant_config_for, random_assistant
from gemma4.config import Config
from gemma4.engine.engine import LLMEngine
from gemma4.engine.sampling import SamplingParams
from gemma4.engine.speculative import Speculator
from gemma4.random_init import randomize_


def tiny(family, **text):
    config = Config.from_dict({"model_type": "gemma4", "text_config": {**text_config_dict(family), **text},
                               "vision_config": None, "audio_config": None})
    return randomize_(Model(config), 0).eval()


@pytest.fixture(scope="module", params=["E2B", "26B-A4B", "31B"])
def target(request):
    """E2B: KV-shared layers, per-layer inputs, the clustered head; 26B-A4B: MoE, K=V; 31B: dense, K=V."""
    model = tiny(request.param)
    clustered = request.param == "E2B"
    head = dict(num_centroids=16, centroid_intermediate_top_k=4) if clustered else {}
    config = assistant_config_for(model.config.text_config, num_layers=2, hidden_size=32, intermediate_size=64,
                                  clustered=clustered, **head)
    return model, random_assistant(config, dtype=torch.float32, seed=1)


def prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (n,), generator=gen).tolist() for n in lengths]


def run(engine, prompt_list, params):
    """Each prompt's (output ids, their log-probabilities), all submitted at once."""
    ids = [engine.add_request(p, params) for p in prompt_list]
    got = {i: ([], []) for i in ids}
    for out in engine.run(ids):
        out.raise_error()
        if out.token is not None:
            got[out.seq_id][0].append(out.token)
            got[out.seq_id][1].append(out.logprobs.logprob if out.logprobs else None)
    return [got[i] for i in ids]


def oracle_from(reference: dict[tuple, list[int]], noise: float = 0.0, seed: int = 0):
    """Drafts from the target's own greedy continuation of each prompt (`reference`: prompt -> output ids); with
    `noise`, each draft is replaced by a wrong token with that probability."""
    rng = random.Random(seed)

    def oracle(seq):
        output = reference[tuple(seq.prompt_ids)]
        done = len(seq.output_ids)
        tokens = output[done:]
        return [t if rng.random() >= noise else (t + 1) % 384 for t in tokens]
    return oracle


PARAMS = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[], logprobs=1)


@pytest.mark.parametrize("drafts", ["drafter", "oracle", "noisy"])
def test_greedy_outputs_equal_without_speculation(target, drafts):
    model, drafter = target
    batch = prompts([3, 20, 37])  # within, past and far past the window of 8
    plain = run(LLMEngine(model, max_num_seqs=4, max_model_len=128), batch, PARAMS)
    engine = LLMEngine(model, max_num_seqs=4, max_model_len=128, speculative_model=drafter, num_speculative_tokens=3)
    if drafts != "drafter":
        engine.speculator.oracle = oracle_from({tuple(p): out[0] for p, out in zip(batch, plain)},
                                               noise=0.3 if drafts == "noisy" else 0.0)
    spec = run(engine, batch, PARAMS)
    for (ids, logprobs), (ref_ids, ref_logprobs) in zip(spec, plain):
        assert ids == ref_ids
        # fp32: the verify forward computes 4 positions at once where decoding computes one: summation order only.
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_logprobs), rtol=0, atol=1e-4)
    stats = engine.speculator
    assert stats.num_drafted > 0
    if drafts == "oracle":  # every draft is right: 24 tokens in rounds of 3 + 1 (the last rounds are shorter)
        assert stats.num_accepted == stats.num_drafted
    elif drafts == "noisy":
        assert 0 < stats.num_accepted < stats.num_drafted
    assert engine.blocks.usage == 0
