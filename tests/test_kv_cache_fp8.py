"""fp8 KV cache (`kv_cache_dtype="fp8"`): float8 e4m3 pools with a float32 scale per (layer, KV head), stored =
fp8(clamp(x / scale, +-448)), read = fp8 * scale. The plain path against the model-dtype cache, the kernels (Triton's
interpreter on the CPU) against the plain path on the same fp8 cache, scales, saturation, and the plumbing (engine,
memory planning, CLI, server)."""

import pytest
import torch

pytest.importorskip("triton")

from gemma4 import Model, kernels  # noqa: E402
from gemma4.config import Config  # noqa: E402
from gemma4.engine.generate import left_pad  # noqa: E402
from gemma4.model.attention import attend, attention_mask  # noqa: E402
from gemma4.model.cache import KVCache  # noqa: E402
from gemma4.model.paged_cache import FP8, dequantize_kv, quantize_kv  # noqa: E402
from gemma4.options import override  # noqa: E402
from gemma4.random_init import randomize_  # noqa: E402
from reference import VOCAB  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 4


@pytest.fixture(scope="module", params=["E4B", "31B"])  # KV sharing + 2 KV heads; K=V global layers
def model(request, short_text_config):
    config = Config.from_dict({"model_type": "gemma4", "text_config": short_text_config(request.param),
                               "vision_config": None, "audio_config": None})
    return randomize_(Model(config), 3).eval().to(DEVICE)


def _cache(model, rows, length, kv_cache_dtype):
    return KVCache(model.config.text_config, rows, length, model.dtype, model.device, kv_cache_dtype)


def _decode(model, cache, use_kernels: bool, steps: int = STEPS):
    """A left-padded 2-row prefill (the 13-token row past the window of 8), then decode steps of fixed tokens (the
    inputs do not depend on the logits compared); the logits of each (prefill's last position first),
    [steps + 1, B, vocab]."""
    prompts = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (13, 6)]
    ids, mask = (t.to(model.device) for t in left_pad(prompts))
    tokens = torch.randint(3, VOCAB, (steps, 2, 1), generator=torch.Generator().manual_seed(0)).to(model.device)
    with kernels.force() if use_kernels else override(kernels=False), torch.no_grad():
        out = [model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]]
        for step in range(steps):
            out.append(model(tokens[step], cache=cache, last_only=True)[:, -1])
    return torch.stack(out)


def _pool_bytes(cache):
    """Per layer (key bytes, value bytes) of the slots a query may read: not the trash slots that padding writes."""
    pools = cache.pools
    end = {"sliding_attention": pools.ring_trash, "full_attention": pools.trash_block * pools.block_size}
    return {i: tuple(pool[:, :end[pools.layer_types[i]]].view(torch.uint8) for pool in (pools.keys[i], pools.values[i]))
            for i in pools.keys}


def _worst_case_rounding(update):
    """PagedCacheView.update on a model-dtype cache, with every K/V element the layer attends to moved by 2^-4 of
    itself, up or down (a sign drawn from the value itself, so that an element keeps its error from step to step, as
    a stored one does): the largest error e4m3 rounding (3 mantissa bits, to nearest) can give each element."""
    def perturbed(self, layer_idx, key, value):
        key, value = update(self, layer_idx, key, value)
        return tuple(x * (1 + 2**-4 * torch.sign(torch.sin(x * 12345.678))) for x in (key, value))
    return perturbed


def test_plain_fp8_cache_close_to_the_model_dtype_cache(model):
    """fp32 model, plain PyTorch path: the fp8 cache moves the logits (at most and in RMS) by no more than moving
    every cached element by its largest e4m3 rounding error does (`_worst_case_rounding`; measured: fp8 ~0.4x of it;
    these random models amplify attention errors, so a fixed bound on the logits would say little). Not by nothing
    either: the fp8 values were read."""
    from unittest import mock

    from gemma4.model.paged_cache import PagedCacheView

    fp8, full = _cache(model, 2, 32, "fp8"), _cache(model, 2, 32, "auto")
    assert fp8.nbytes * 4 == full.nbytes  # fp32 -> 1 byte
    got, want = _decode(model, fp8, False), _decode(model, full, False)
    with mock.patch.object(PagedCacheView, "update", _worst_case_rounding(PagedCacheView.update)):
        bound = _decode(model, _cache(model, 2, 32, "auto"), False) - want
    error = got - want
    assert not got.isnan().any()
    assert 0 < error.abs().max() <= bound.abs().max()
    assert error.pow(2).mean() <= bound.pow(2).mean()
    assert all(pool.dtype == FP8 for pool in (*fp8.pools.keys.values(), *fp8.pools.values.values()))


def test_fp8_pool_bytes_are_half_of_bf16(model):
    bf16 = KVCache(model.config.text_config, 2, 32, torch.bfloat16, "cpu", "auto")
    assert _cache(model, 2, 32, "fp8").nbytes * 2 == bf16.nbytes


def test_kernels_on_an_fp8_cache_equal_the_plain_path(model):
    """The same fp8 cache through the kernels (fused norms + RoPE + the fp8 store at decode, split-K decode attention
    reading fp8 in place) and through the plain path: the same bytes stored, and logits as close as the model-dtype
    kernels are to the plain path (test_kernels_model: 1e-3, fp32 summation order). Scales other than 1 (powers of
    two and not) on both, so that a scale missing on any write or read moves values by a factor."""
    caches = {name: _cache(model, 2, 32, "fp8") for name in ("kernels", "plain")}
    for cache in caches.values():
        for scales in (cache.pools.key_scales, cache.pools.value_scales):
            for layer, scale in scales.items():
                scale.copy_(torch.tensor([0.5, 3.0, 1.25, 2.0][:scale.numel()]) * (1 + layer % 2))
    kernel_logits, plain_logits = _decode(model, caches["kernels"], True), _decode(model, caches["plain"], False)
    assert (kernel_logits - plain_logits).abs().max() <= 1e-3
    assert torch.equal(kernel_logits.argmax(-1), plain_logits.argmax(-1))
    kernel_bytes, plain_bytes = _pool_bytes(caches["kernels"]), _pool_bytes(caches["plain"])
    for layer in kernel_bytes:
        for got, want in zip(kernel_bytes[layer], plain_bytes[layer]):
            assert torch.equal(got, want)


def test_scales_change_the_bytes_not_the_output(model):
    """Scale 2 for KV head 0's keys and values of every layer (the plain path: the kernels equal it on any scales,
    test_kernels_on_an_fp8_cache_equal_the_plain_path). Stored bytes: head 0's change; in layer 0 (whose K/V depend on
    the tokens alone) the other head's do not, and head 0's read back (x 2) equal scale 1's wherever both are normal
    e4m3 numbers (x / 2 is as exact as x there; below 2^-5 it turns subnormal, of step 2^-8). Logits: those few
    subnormals move them by well under the fp8 cache's own error (measured: 0.1x of it; a scale not applied on read
    moves them by ~7x of it)."""
    from gemma4.model.paged_cache import dequantize_kv

    fp8_error = (_decode(model, _cache(model, 2, 32, "fp8"), False, steps=2) -
                 _decode(model, _cache(model, 2, 32, "auto"), False, steps=2)).abs().max()
    caches = {scale: _cache(model, 2, 32, "fp8") for scale in (1.0, 2.0)}
    for scales in (caches[2.0].pools.key_scales, caches[2.0].pools.value_scales):
        for scale in scales.values():
            scale[0] = 2.0
    logits = {scale: _decode(model, cache, False, steps=2) for scale, cache in caches.items()}
    assert (logits[2.0] - logits[1.0]).abs().max() <= 0.25 * fp8_error
    one, two = _pool_bytes(caches[1.0]), _pool_bytes(caches[2.0])
    for layer in one:
        for a, b in zip(one[layer], two[layer]):
            assert not torch.equal(a[0], b[0])  # head 0: rescaled
    for a, b in zip(one[0], two[0]):
        assert torch.equal(a[1:], b[1:])  # the other heads: as they were
        a, b = (dequantize_kv(t.view(FP8), torch.tensor([s, 1.0], device=t.device), torch.float32)
                for t, s in ((a, 1.0), (b, 2.0)))
        normal = a.abs() >= 2**-5
        assert normal.float().mean() > 0.9 and torch.equal(a[normal], b[normal])


def _store_inputs(heads: int, length: int = 3, dim: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, length, heads * dim, generator=g) for _ in range(3))
    cos, sin = torch.randn(2, 1, length, dim, generator=g).unbind(0)
    inputs = (q, k, v, torch.rand(dim, generator=g) + 0.5, torch.rand(dim, generator=g) + 0.5, cos, sin)
    return tuple(t.to(DEVICE) for t in inputs)


def test_store_kernel_rounds_and_saturates_as_torch():
    """qkv_norm_rope_store into fp8 pools = the same store into fp32 pools, then quantize_kv (torch: x / scale,
    clamp, cast rounding to nearest even): byte for byte, over scales that saturate (K/V of RMS 1 divided by 2^-9
    reach 448 and beyond: +-448, no NaN), round normally and reach e4m3's subnormals (scale 150)."""
    from gemma4.kernels.norm import qkv_norm_rope_store

    heads, dim, length = 4, 32, 3
    q, k, v, qw, kw, cos, sin = _store_inputs(heads, length, dim)
    slots = torch.tensor([[5, 0, 9]], device=DEVICE)
    scales = torch.tensor([2.0**-9, 0.7, 13.0, 150.0], device=DEVICE)
    full = [torch.zeros(heads, 12, dim, device=DEVICE) for _ in range(2)]
    fp8 = [torch.zeros(heads, 12, dim, dtype=FP8, device=DEVICE) for _ in range(2)]
    with kernels.force():
        qkv_norm_rope_store(q, k, v, qw, kw, 1e-6, cos, sin, *full, slots)
        qkv_norm_rope_store(q, k, v, qw, kw, 1e-6, cos, sin, *fp8, slots, scales, scales.flip(0))
    for stored, exact, scale in zip(fp8, full, (scales, scales.flip(0))):
        want = quantize_kv(exact, scale)
        assert torch.equal(stored.view(torch.uint8), want.view(torch.uint8))
        assert not stored.float().isnan().any()
    saturated = fp8[0][0, slots[0]].float()  # key head 0, scale 2^-9
    assert saturated.abs().max() == 448 and (saturated.abs() == 448).float().mean() > 0.25
    assert (fp8[0][3, slots[0]].float().abs() < 2**-6).any()  # subnormals reached


def test_plain_store_saturates():
    x = torch.tensor([1000.0, -1e6, 449.0, 3.0, -0.001]).view(1, 1, 5)
    got = dequantize_kv(quantize_kv(x, torch.ones(1)), torch.ones(1), torch.float32)
    assert got.flatten().tolist() == [448.0, -448.0, 448.0, 3.0, -2**-9]  # e4m3 subnormals: steps of 2^-9


def _exact_attention(query, keys, values, slots, positions, query_positions, window):
    """The model's attend() in float64 over each row's candidates, keys/values pools [Hkv, N, D] read at `slots`."""
    valid = torch.ones(len(query), 1, dtype=torch.bool, device=query.device)
    mask = attention_mask(query_positions[:, None], valid, positions, window)
    keys, values = (pool[:, slots].transpose(0, 1).double() for pool in (keys, values))  # [B, Hkv, S, D]
    return attend(query.double()[:, :, None], keys, values, mask).reshape(query.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_kernel_on_fp8_applies_the_scales_outside_the_products(dtype):
    """decode_attention over fp8 pools with per-head scales (exact fp8 values in the products, the key scale on the
    scores, the value scale on the output) against exact attention over fp8 * scale in float64, and against the kernel
    on those pools dequantized to the query's dtype beforehand (dequantize_kv, which rounds each fp8 * scale). fp32:
    the two orders of the same fp32 arithmetic, within a few fp32 ulps. bf16: no farther from the exact result than the
    dequantized pools' kernel is, whose bf16 rounding of K, V and the weights p bounds it. Scales of both kinds (not
    powers of two) per head, so that a scale missed or swapped moves outputs by far more."""
    from gemma4.kernels.attention import decode_attention

    g = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, slots_total, batch = 4, 2, 32, 40, 2
    keys, values = (torch.randn(kv_heads, slots_total, dim, generator=g).to(DEVICE) * 3 for _ in range(2))
    key_scale, value_scale = torch.tensor([0.5, 3.0], device=DEVICE), torch.tensor([1.7, 0.25], device=DEVICE)
    key_fp8, value_fp8 = quantize_kv(keys, key_scale), quantize_kv(values, value_scale)
    query = torch.randn(batch, heads, dim, generator=g).to(DEVICE, dtype)
    slots = torch.stack([torch.randperm(slots_total, generator=g)[:24] for _ in range(batch)]).to(DEVICE)
    positions = torch.arange(24, device=DEVICE).expand(batch, 24).contiguous()
    query_positions = torch.tensor([23, 15], device=DEVICE)
    with kernels.force():
        got = decode_attention(query, key_fp8, value_fp8, positions, query_positions, 8, slots=slots,
                               num_splits=2, key_scale=key_scale, value_scale=value_scale)
        dequantized = decode_attention(query, dequantize_kv(key_fp8, key_scale, dtype),
                                       dequantize_kv(value_fp8, value_scale, dtype), positions, query_positions, 8,
                                       slots=slots, num_splits=2)
        wrong_scale = decode_attention(query, key_fp8, value_fp8, positions, query_positions, 8, slots=slots,
                                       num_splits=2, key_scale=key_scale, value_scale=value_scale.flip(0))
    exact = _exact_attention(query, dequantize_kv(key_fp8, key_scale, torch.float64),
                             dequantize_kv(value_fp8, value_scale, torch.float64), slots, positions, query_positions, 8)
    error, dequantized_error = (got.double() - exact).abs(), (dequantized.double() - exact).abs()
    if dtype == torch.float32:
        # On CUDA the kernel's exp2 is ex2.approx (2 ulp) and its scores are summed in the MMA's order: 2^-18 there
        # (both orders measured within 9.1e-6 of outputs up to 9.35 on the H100), 2^-20 under the interpreter.
        bound = (2**-20 if DEVICE == "cpu" else 2**-18) * exact.abs().max()
        assert error.max() <= bound and dequantized_error.max() <= bound
    else:
        assert 0 < error.max() <= dequantized_error.max() and error.mean() <= dequantized_error.mean()
    assert (wrong_scale.double() - exact).abs().max() > 100 * dequantized_error.max()


def test_engine_runs_on_fp8_and_plans_twice_the_blocks(model):
    from gemma4.engine.engine import LLMEngine
    from gemma4.engine.memory import plan_kv, summary
    from gemma4.engine.sampling import SamplingParams

    text, budget = model.config.text_config, 2**17
    auto_length, auto_blocks = plan_kv(text, model.dtype, 2, 16, budget=budget)
    fp8_length, fp8_blocks = plan_kv(text, model.dtype, 2, 16, budget=budget, kv_cache_dtype="fp8")
    assert auto_blocks >= 1 and fp8_blocks >= 2 * auto_blocks and fp8_length >= 2 * auto_length
    engine = LLMEngine(model, max_num_seqs=2, max_model_len=64, kv_cache_dtype="fp8", kv_cache_memory=2**21)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outputs = engine.generate([[5, 9, 14, 3], [7] * 11], params)
    assert [len(o) for o in outputs] == [6, 6]
    assert all(pool.dtype == FP8 for pool in engine.blocks.keys.values())
    assert "fp8" in summary(engine, 0.0)
    with pytest.raises(ValueError, match="'auto', 'fp8'"):
        LLMEngine(model, max_num_seqs=2, max_model_len=64, kv_cache_dtype="int8", kv_cache_memory=2**21)
    with pytest.raises(ValueError, match="'auto', 'fp8'"):
        _cache(model, 1, 16, "fp16")


def test_model_generate_switches_the_kept_engine(model):
    from gemma4.engine.generate import engine_for, free_engine

    free_engine(model)
    first = engine_for(model, 1, 40)
    assert first.kv_cache_dtype == "auto" and engine_for(model, 1, 30) is first
    fp8 = engine_for(model, 1, 30, kv_cache_dtype="fp8")
    assert fp8 is not first and fp8.kv_cache_dtype == "fp8" and engine_for(model, 1, 30) is fp8
    ids = torch.tensor([[4, 8, 15, 16]], device=model.device)
    assert model.generate(ids, max_new_tokens=3, do_sample=False, kv_cache_dtype="fp8").shape == (1, 7)
    with pytest.raises(ValueError, match="'auto', 'fp8'"):
        model.generate(ids, max_new_tokens=3, kv_cache_dtype="e5m2")
    free_engine(model)


def test_cli_and_server_arguments():
    import dataclasses

    from gemma4.bench import BenchSpec
    from gemma4.cli import build_parser

    parser = build_parser()
    for command in (["generate", "m", "--prompt", "x"], ["chat", "m"], ["serve", "m"], ["bench"]):
        assert parser.parse_args(command).kv_cache_dtype == "auto"
        assert parser.parse_args([*command, "--kv-cache-dtype", "fp8"]).kv_cache_dtype == "fp8"
        with pytest.raises(SystemExit):
            parser.parse_args([*command, "--kv-cache-dtype", "int8"])
    args = parser.parse_args(["bench", "--kv-cache-dtype", "fp8"])
    spec = BenchSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchSpec)})  # as cmd_bench
    assert spec.kv_cache_dtype == "fp8"


def test_server_state_passes_kv_cache_dtype(model):
    from types import SimpleNamespace

    from gemma4.server.state import build_state

    tokenizer = SimpleNamespace(stop_token_ids=[1])
    state = build_state(model, tokenizer, "m", max_model_len=64, max_num_seqs=2, num_blocks=8, kv_cache_dtype="fp8")
    try:
        assert state.engine.engine.kv_cache_dtype == "fp8"
    finally:
        state.engine.shutdown()
    with pytest.raises(ValueError, match="'auto', 'fp8'"):
        build_state(model, tokenizer, "m", max_model_len=64, max_num_seqs=2, num_blocks=8, kv_cache_dtype="bf16")
