"""Incremental decoding equals the full forward; greedy generation equals transformers 5.24 token for token."""

import copy

import pytest
import torch

from gemma4 import Model
from gemma4.engine.generate import left_pad
from reference import FAMILIES, VOCAB, reference_model, text_config_dict

WINDOW = 8  # the tiny configs' sliding window


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    reference = reference_model(text_config_dict(request.param), seed=11)
    path = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(path)
    return request.param, reference, Model.from_pretrained(path, dtype=torch.float32)


def prompt(batch=1, length=7, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-6), (torch.float32, 1e-3)])
@pytest.mark.parametrize("chunk", [None, 3, 5])
def test_cached_logits_equal_full_forward_every_step(pair, chunk, dtype, tolerance):
    """3 x window of decoding; at each step the cached logits equal a cache-free forward of the same tokens.

    In fp32 the two paths differ by float rounding only (other kernel shapes, other summation order), which
    Gemma's post-norms amplify layer by layer: about 1e-4 on these 10-layer random models. In fp64 that rounding
    vanishes, so there the bound is tight enough for any real cache bug (a wrong slot or mask moves logits by 1e-2+).
    """
    _, _, model = pair
    model = copy.deepcopy(model).to(dtype)
    ids = prompt(2, 11)
    steps = 3 * WINDOW
    cache = model.make_cache(2, ids.shape[1] + steps)
    logits = None
    for start in range(0, ids.shape[1], chunk or ids.shape[1]):
        logits = model(ids[:, start:start + (chunk or ids.shape[1])], cache=cache)
    sequence = ids
    for _ in range(steps):
        full = model(sequence)[:, -1]
        assert (logits[:, -1] - full).abs().max() <= tolerance
        token = full.argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=1)
        logits = model(token, cache=cache)


def test_greedy_equals_transformers_generate(pair):
    """>= 64 new tokens, well past the sliding window."""
    family, reference, model = pair
    ids = prompt(1, 6, seed=3)
    ours = model.generate(ids, max_new_tokens=72, do_sample=False, eos_token_id=None)
    theirs = reference.generate(ids, max_new_tokens=72, min_new_tokens=72, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
    assert torch.equal(ours, theirs), family


def test_padded_batch_greedy_equals_transformers_generate(pair):
    """A left-padded batch through the engine (each row its own request) against transformers' generate on the same
    padded batch and mask."""
    family, reference, model = pair
    ids, mask = left_pad([prompt(1, n, seed=n)[0] for n in (4, 12, 7)])
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None)
    theirs = reference.generate(ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs), family


def test_naive_path_equals_cached_path(pair):
    _, _, model = pair
    ids = prompt(2, 9, seed=4)
    cached = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, prefill_chunk_size=4)
    naive = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, use_cache=False)
    assert torch.equal(cached, naive)


def test_left_padded_batch_equals_prompts_alone(pair):
    _, _, model = pair
    prompts = [prompt(1, n, seed=n)[0] for n in (4, 12, 7)]
    ids, mask = left_pad(prompts)
    longest = ids.shape[1]
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=24, do_sample=False, eos_token_id=None)
        assert torch.equal(batched[row, longest:], alone[0, len(p):])


def test_eos_stops_and_pads(pair):
    _, _, model = pair
    ids = prompt(1, 5)
    free = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
    stop_token = int(free[0, 5 + 3])  # the 4th new token becomes "eos"
    stopped = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=stop_token, pad_token_id=0)
    first = (free[0, 5:] == stop_token).nonzero()[0].item()
    assert torch.equal(stopped[0, : 5 + first + 1], free[0, : 5 + first + 1])
    assert (stopped[0, 5 + first + 1:] == 0).all()


def test_seeded_sampling_reproduces(pair):
    _, _, model = pair
    ids = prompt(1, 5)
    a = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, seed=3)
    b = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, seed=3)
    c = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cache_memory_by_layer_type():
    """Sliding layers: constant in context length. KV-shared layers: nothing. Global layers: linear."""
    from gemma4 import Config
    from gemma4.model.cache import KVCache

    text = Config.preset("E2B").text_config
    short = KVCache(text, 1, 4096, torch.bfloat16, "meta").pools
    long = KVCache(text, 1, 8192, torch.bfloat16, "meta").pools
    shared = [i for i in range(text.num_hidden_layers) if text.is_kv_shared(i)]
    assert shared and not any(i in short.keys for i in shared)
    trash = short.block_size
    for i, t in enumerate(text.layer_types):
        if i in short.keys and t == "sliding_attention":
            assert short.keys[i].shape == long.keys[i].shape == (text.num_key_value_heads, text.sliding_window + 1,
                                                                 text.head_dim)  # window + 1 slots either way
        elif i in short.keys:
            assert long.keys[i].shape[1] - trash == 2 * (short.keys[i].shape[1] - trash) == 8192


def test_errors(pair):
    _, _, model = pair
    ids = prompt(1, 5)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        model.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="exceeds this model's context"):
        model.generate(ids, max_new_tokens=model.config.text_config.max_position_embeddings)
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate(ids, max_new_tokens=2, do_sample=True, top_p=1.5)


def test_e2b_cache_at_128k_is_a_small_fraction_of_a_full_cache(capsys):
    """E2B at 128K context: sliding layers hold 512 positions, KV-shared layers nothing, only 3 global layers grow."""
    from gemma4 import Config
    from gemma4.model.cache import KVCache

    text = Config.preset("E2B").text_config
    context = 128 * 1024
    cache = KVCache(text, 1, context, torch.bfloat16, "meta")
    ours = cache.nbytes
    # What a cache of the full context on every layer would take (K and V, bf16).
    full = sum(2 * context * kv * hd * 2 for kv, hd in zip(text.layer_num_kv_heads, text.layer_head_dims))
    with capsys.disabled():
        print(f"\nE2B KV cache at {context} tokens: {ours / 2**20:.0f} MiB "
              f"({ours / context:.0f} B/token) vs {full / 2**20:.0f} MiB full-length on every layer "
              f"({full / context:.0f} B/token): {ours / full:.1%}")
    assert ours < full / 6  # only the 3 storing global layers of 35 grow with the context
