"""Prefix caching (engine/block_manager.py): a prompt that starts with an earlier prompt reuses its blocks and the
snapshot of its sliding windows; outputs equal those of an engine without the cache. The tiny configs have a sliding
window of 8 tokens and blocks of 16, so every cached prefix is longer than the window."""

import pytest
import torch

from reference import engine_outputs, text_config_dict, tiny_model

from gemma4 import Model
from gemma4.config import Config
from gemma4.engine.engine import LLMEngine
from gemma4.engine.sampling import SamplingParams
from gemma4.random_init import randomize_


def tiny(family, **text):
    return tiny_model({**text_config_dict(family), **text})


@pytest.fixture(scope="module", params=["E2B", "26B-A4B", "31B"])
def model(request):
    """E2B: KV-shared layers and per-layer inputs; 26B-A4B: MoE, K=V global layers; 31B: dense, K=V."""
    return tiny(request.param)


TURN_END = 106  # <turn|>, one of the engine's default stop ids (1, 106, 50)


def tokens(n, seed):
    """Random ids without a stop id (a stop id in a prompt ends its first turn: a snapshot point)."""
    ids = torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.where((ids == 50) | (ids == TURN_END), ids + 1, ids).tolist()


# logprobs=1: each step's log-probability of its token, which the comparison reads beside the ids.
PARAMS = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[], logprobs=1)


def run(engine, prompts, params=PARAMS):
    return engine_outputs(engine, prompts, params)


def assert_same(cached, uncached):
    for (ids, logprobs), (ref_ids, ref_logprobs) in zip(cached, uncached):
        assert ids == ref_ids
        # fp32: the cached prefix was computed in other chunks, so only the summation order differs.
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_logprobs), rtol=0, atol=1e-4)


def test_a_second_turn_starts_from_the_first_ones_prompt(model):
    first = tokens(45, 0)
    engines = [LLMEngine(model, max_num_seqs=4, max_model_len=256, enable_prefix_caching=on) for on in (True, False)]
    turn1 = [run(e, [first]) for e in engines]
    assert_same(*turn1)
    second = first + turn1[0][0][0] + tokens(13, 1)  # the conversation so far, and a new message
    turn2 = [run(e, [second, first]) for e in engines]
    assert_same(*turn2)
    cache = engines[0].blocks
    # Turn 1 ended with its windows kept at the last block boundary it computed (48, inside its reply): turn 2
    # starts there; the first prompt again at its own last boundary (32).
    assert cache.hit_tokens == 48 + 32 and cache.prompt_tokens == 45 + len(second) + 45
    assert engines[1].blocks.hit_tokens == 0
    assert cache.usage == 0 and engines[1].blocks.usage == 0


def test_a_prompt_within_one_window():
    """A window of 32: a prompt of 20 tokens is prefilled in one chunk, its snapshot at 16 keeps positions 0-15 of
    the ring and forgets 16-19, which the next prompt fills with its own."""
    model = tiny("E2B", sliding_window=32)
    first, second = tokens(20, 9), tokens(20, 9)[:16] + tokens(30, 10)
    engines = [LLMEngine(model, max_num_seqs=4, max_model_len=128, enable_prefix_caching=on) for on in (True, False)]
    assert_same(*[run(e, [first]) + run(e, [second]) for e in engines])
    assert engines[0].blocks.hit_tokens == 16


def test_shared_prefixes_under_memory_pressure(model):
    """Requests sharing prefixes, under a small token budget (chunks, decodes beside prefills) and few blocks
    (preemptions, cached blocks evicted and reused): outputs equal an engine without the cache."""
    stems = [tokens(40, seed) for seed in range(3)]
    batch = [stems[i % 3] + tokens(5 + i, 100 + i) for i in range(12)]
    batch += [stems[0][:-3], stems[1]]  # shorter than a cached prefix, and one equal to it
    kwargs = dict(max_num_seqs=6, max_model_len=96, max_num_batched_tokens=40, num_blocks=14)
    ref = run(LLMEngine(model, enable_prefix_caching=False, **kwargs), batch)
    engine = LLMEngine(model, **kwargs)
    for _ in range(2):  # the second round finds the first's prefixes (those not evicted since)
        assert_same(run(engine, batch), ref)
    assert engine.blocks.hit_tokens > 0 and engine.scheduler.num_preemptions > 0
    assert engine.blocks.usage == 0 and len(engine.blocks.free_rings) == 6


def test_hits_only_at_a_snapshot_and_never_the_whole_prompt():
    engine = LLMEngine(tiny("E2B"), max_num_seqs=4, max_model_len=128)
    prompt = tokens(48, 3)  # three full blocks: the snapshot is at 48, which only a longer prompt can use
    run(engine, [prompt])
    seq = engine.seqs.get(engine.add_request(prompt, PARAMS))
    assert engine.blocks.cached_prefix(seq) == 0  # 48 would leave no token to compute, and 16 or 32 has no snapshot
    engine.abort(seq.seq_id, output=False)
    longer = engine.seqs.get(engine.add_request(prompt + [7], PARAMS))
    assert engine.blocks.cached_prefix(longer) == 48
    other = engine.seqs.get(engine.add_request(prompt[:20] + [5] + prompt[21:] + [7], PARAMS))
    assert engine.blocks.cached_prefix(other) == 0  # a token differs in block 1: no block after it matches


def test_a_long_prompt_splits_its_prefill_at_the_snapshot():
    engine = LLMEngine(tiny("31B"), max_num_seqs=2, max_model_len=128, max_num_batched_tokens=64)
    seq = engine.seqs[engine.add_request(tokens(45, 4), PARAMS)]
    engine.step()
    assert seq.num_cached == 32  # the chunk stops at the snapshot point, although the budget takes the prompt
    engine.step()
    assert seq.num_cached == 45 and len(engine.blocks.snapshots) == 1


def test_a_full_snapshot_ring_pool_drops_the_least_recently_used():
    engine = LLMEngine(tiny("E2B"), max_num_seqs=4, max_model_len=128)  # two snapshot rings
    a, b, c = tokens(40, 5), tokens(40, 6), tokens(40, 7)
    one = SamplingParams(max_tokens=1, temperature=0, stop_token_ids=[])  # computes no block past the prompt's
    run(engine, [a], one)
    run(engine, [b], one)
    run(engine, [a + [8]], one)  # a's snapshot, used again, is now more recent than b's
    run(engine, [c], one)  # replaces b's
    hits = [engine.blocks.cached_prefix(engine.seqs[engine.add_request(p + [9], PARAMS)]) for p in (a, b, c)]
    assert hits == [32, 0, 32]


def test_conversations_share_their_system_turn():
    """The block boundary before the first turn's end is a snapshot point: another conversation with the same
    system turn starts after it, and its next turn after its own prompt."""
    system = tokens(37, 11) + [TURN_END]  # 38 tokens: the point is 32
    first, second = system + tokens(50, 12), system + tokens(30, 13)
    # Three snapshot rings: those at 32 and 80, and the second conversation's at 64.
    engines = [LLMEngine(tiny("31B"), max_num_seqs=12, max_model_len=256, max_num_batched_tokens=64,
                         enable_prefix_caching=on) for on in (True, False)]
    turn1 = [run(e, [first]) for e in engines]
    assert_same(*turn1)
    assert engines[0].blocks.hit_tokens == 0 and len(engines[0].blocks.snapshots) == 2  # at 32 and 80
    assert_same(*[run(e, [second]) for e in engines])
    assert engines[0].blocks.hit_tokens == 32
    follow_up = first + turn1[0][0][0] + tokens(20, 14)
    assert_same(*[run(e, [follow_up]) for e in engines])
    assert engines[0].blocks.hit_tokens == 32 + 80


LONG = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[], logprobs=1)  # 23 outputs computed


def test_each_turn_starts_where_the_last_one_ended():
    """A conversation resends each reply: a turn starts from the snapshot its previous turn took at the last block
    boundary it computed (inside the reply). The turn's own prompt snapshot is then the first to go: after two turns
    in three snapshot rings, the system turn's is still there."""
    engines = [LLMEngine(tiny("26B-A4B"), max_num_seqs=12, max_model_len=256, enable_prefix_caching=on)
               for on in (True, False)]  # three snapshot rings
    cache = engines[0].blocks
    system = tokens(37, 20) + [TURN_END]
    conversation = system + tokens(30, 21)  # snapshot points 32 (the system turn) and 64
    hits = []
    for turn in range(3):
        before = cache.hit_tokens
        outputs = [run(e, [conversation], LONG) for e in engines]
        assert_same(*outputs)
        hits.append(cache.hit_tokens - before)
        conversation = conversation + outputs[0][0][0] + tokens(10, 22 + turn)
        if turn == 1:  # the prompt snapshots at 64 and 96 were dropped for turn 1's, not the system turn's
            before = cache.hit_tokens
            assert_same(*[run(e, [system + tokens(20, 29)]) for e in engines])
            assert cache.hit_tokens - before == 32
    # Turn 0 ended at 68 + 23 = 91 (snapshot at 80); turn 1: 102 prompt tokens, 80 from the cache (12 of them turn
    # 0's reply), its prompt snapshot at 96, its end at 125 (112); turn 2 starts at 112.
    assert hits == [0, 80, 112]


def test_another_sample_of_a_prompt_that_ended():
    """Its end's snapshot does not drop the prompt's while there is room: a new sample starts after the prompt."""
    engine = LLMEngine(tiny("E2B"), max_num_seqs=12, max_model_len=128)  # three snapshot rings
    prompt = tokens(20, 40) + [TURN_END] + tokens(30, 41)  # snapshot points 16 and 48
    run(engine, [prompt], LONG)  # ends at 51 + 23 = 74: a snapshot at 64
    assert len(engine.blocks.snapshots) == 3
    run(engine, [prompt])
    assert engine.blocks.hit_tokens == 48


def test_a_turn_ended_by_a_drafter_starts_the_next():
    """With speculative decoding, rejected drafts were written past the tokens computed: the window the end snapshot
    keeps must not have been overwritten by them (rings hold the drafts' slots and a block's more)."""
    from gemma4.assistant_checkpoint import assistant_config_for, random_assistant
    model = tiny("31B")
    config = assistant_config_for(model.config.text_config, num_layers=2, hidden_size=32, intermediate_size=64)
    drafter = random_assistant(config, dtype=torch.float32, seed=1)
    params = SamplingParams(max_tokens=21, temperature=0, stop_token_ids=[], logprobs=1)
    engines = [LLMEngine(model, max_num_seqs=4, max_model_len=256, speculative_model=drafter, num_speculative_tokens=3),
               LLMEngine(model, max_num_seqs=4, max_model_len=256, enable_prefix_caching=False)]
    first = tokens(40, 30)
    turn1 = [run(e, [first], params) for e in engines]
    assert_same(*turn1)
    assert engines[0].speculator.num_drafted > engines[0].speculator.num_accepted  # drafts were rejected
    second = first + turn1[0][0][0] + tokens(9, 31)
    assert_same(*[run(e, [second], params) for e in engines])
    assert engines[0].blocks.hit_tokens == 48  # the end of turn 1 at 40 + 20 computed tokens: 48


def test_without_prefix_caching_nothing_is_kept():
    engine = LLMEngine(tiny("E2B"), max_num_seqs=4, max_model_len=128, enable_prefix_caching=False)
    prompt = tokens(20, 7) + [TURN_END] + tokens(20, 8)
    run(engine, [prompt, prompt + [5]])
    assert engine.blocks.hit_tokens == 0 and not engine.blocks.cached and not engine.blocks.snapshots
    assert engine.blocks.num_rings == 4


# --- images in the prefix -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mm():
    from test_multimodal import config_dict
    return randomize_(Model(Config.from_dict(config_dict("E2B", text_config_dict))), 7).eval()


def test_images_in_the_prefix(mm):
    """A second turn after a prompt with images hits past the images; the same tokens with other pixels do not
    hit at all (every block from the first image on is named by its soft tokens too)."""
    from test_engine import mm_prompt
    ids, media = mm_prompt("E2B", 0)
    other_media = mm_prompt("E2B", 1)[1]  # images of the same sizes, other pixels
    params = SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[])
    engines = [LLMEngine(mm, max_num_seqs=8, max_model_len=384, enable_prefix_caching=on) for on in (True, False)]
    first = [e.generate([ids], params, [media])[0] for e in engines]
    assert first[0] == first[1]
    second = ids + first[0] + tokens(9, 8)
    outs = [e.generate([second], params, [media])[0] for e in engines]
    assert outs[0] == outs[1]
    engine = engines[0]
    assert engine.blocks.hit_tokens == len(ids) // 16 * 16
    same = engine.seqs[engine.add_request(ids + [5], params, media)]
    assert engine.blocks.cached_prefix(same) == len(ids) // 16 * 16
    other = engine.seqs[engine.add_request(ids + [5], params, other_media)]
    assert engine.blocks.cached_prefix(other) == 0


def test_no_snapshot_point_inside_an_image():
    """A point moved before one image may fall inside the image before it: it moves again (a split inside an image
    would hold the prefill forever, as the fuzz test once found: two images close together)."""
    from types import SimpleNamespace
    from gemma4.engine.sequence import Sequence
    engine = LLMEngine(tiny("E2B"), max_num_seqs=4, max_model_len=256)
    seq = Sequence(tokens(140, 15), PARAMS, media=SimpleNamespace(vision_runs=[(7, 73), (75, 135)]))
    assert engine.blocks._snapshot_points(seq) == []  # 128 -> 64 (before the second image) -> 0 (the first)
    seq = Sequence(tokens(40, 15) + [TURN_END] + tokens(129, 16), PARAMS,
                   media=SimpleNamespace(vision_runs=[(50, 90), (110, 165)]))
    assert engine.blocks._snapshot_points(seq) == [32, 96]  # the first turn ends at 41; 160 -> 96
