"""The CPU's int8 / int4 kernels (model/quantized.py `cpu_linear`: PyTorch's weight-only aten ops, and the native int4
kernel of kernels/cpu.py, whose products test_cpu_kernels.py checks) against the plain twin, "dequantize, then
multiply": products on random matrices, and tiny models quantized on load whose decode steps take them, against the
same models through the twin (`kernels=False`)."""

from unittest import mock

import pytest
import torch

from gemma4 import Model
from gemma4.engine.engine import LLMEngine
from gemma4.engine.sampling import SamplingParams
from gemma4.kernels import cpu
from gemma4.model import fused
from gemma4.model.fused import QuantizedLinear
from gemma4.model.quantized import (CPU_KERNEL_MAX_ROWS, ON_LOAD, cpu_int4_layout_known, cpu_int4_supported,
                                    cpu_linear, quantize, to_cpu_int4)
from gemma4.options import override
from reference import VOCAB, engine_outputs, reference_model, text_config_dict

U32 = 2.0**-24  # fp32's unit roundoff
UBF16 = 2.0**-9


@pytest.fixture(params=["native", "pytorch"])
def int4_kernel(request, monkeypatch):
    """Which CPU int4 kernel a test runs: the native one (kernels/cpu.py), or PyTorch's, which the CPU takes where the
    native one is not built (here: made to look so, which also turns the other C kernels off)."""
    if request.param == "pytorch":
        monkeypatch.setattr(cpu, "library", lambda: None)
    elif cpu.library() is None:
        pytest.skip("the C kernels are not built here")
    return request.param


def _weight(n: int, k: int, scheme: str, seed: int = 0):
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    quantized = quantize(weight, ON_LOAD[scheme])
    return to_cpu_int4(quantized) if scheme == "int4" else quantized


def test_int4_layout_round_trip():
    """The repacked matrix reads back (the twin's unpack_cpu_int4) as the checkpoint's integers and scales."""
    assert cpu_int4_layout_known()
    for n, k in [(64, 32), (192, 256), (128, 96)]:
        quantized = quantize(torch.randn(n, k), ON_LOAD["int4"])
        repacked = to_cpu_int4(quantized)
        assert repacked.values.dtype == torch.uint8 and repacked.values.is_contiguous()
        assert repacked.shape == quantized.shape == (n, k)
        assert torch.equal(repacked.integers(), quantized.integers())
        assert torch.equal(repacked.scale, quantized.scale)
        assert torch.equal(repacked.dequantize(torch.float32), quantized.dequantize(torch.float32))
        direct = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n)), ON_LOAD["int4"], for_cpu=True)
        again = to_cpu_int4(quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n)), ON_LOAD["int4"]))
        assert torch.equal(direct.values, again.values)
        assert torch.equal(direct.cpu_scales_and_zeros, again.cpu_scales_and_zeros)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, CPU_KERNEL_MAX_ROWS])
def test_products_equal_dequantize_then_multiply(scheme, dtype, rows):
    """Against x @ w.T in fp64 with w = q * scale exact. Tolerance, per output, from the kernels' numerics (products
    in fp32, one rounding of the output to x's dtype; bf16 activations may also see the dequantized weight rounded to
    bf16): fp32 summation over K terms, K u32 sum|x w|, plus, in bf16, 2^-9 (|y| + sum|x w|). A misread layout or
    scale is off by the order of sum|x w|."""
    n, k = 192, 256
    weight = _weight(n, k, scheme)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
    got = cpu_linear(x, weight)
    assert got is not None and got.dtype == dtype and got.shape == (rows, n)
    dense = weight.dequantize(torch.float64)
    exact = x.double() @ dense.T
    magnitude = x.double().abs() @ dense.abs().T
    tolerance = k * U32 * magnitude + (UBF16 * (exact.abs() + magnitude) if dtype == torch.bfloat16 else U32 * exact.abs())
    assert ((got.double() - exact).abs() <= tolerance).all()
    assert (got.double() - exact).abs().max() > 0 or dtype == torch.float32  # the bound is not vacuous in bf16


def test_unsupported_weights_take_the_twin(monkeypatch):
    """fp8, and (without the native kernel) int4 whose rows are not whole blocks of 64, stay in the checkpoint's
    layout; `cpu_linear` declines them and `product` dequantizes."""
    monkeypatch.setattr(cpu, "library", lambda: None)
    fp8 = quantize(torch.randn(64, 64), ON_LOAD["fp8"])
    ragged = quantize(torch.randn(96, 64), ON_LOAD["int4"])
    assert not cpu_int4_supported(fp8) and not cpu_int4_supported(ragged)
    x = torch.randn(2, 64)
    for weight in (fp8, ragged):
        assert cpu_linear(x, weight) is None
        torch.testing.assert_close(fused.product(x, weight), x @ weight.dequantize(torch.float32).T, rtol=0, atol=0)


# --- whole models ------------------------------------------------------------------------------------------------

def _config() -> dict:
    """Tiny E2B (PLE, KV sharing, double-wide MLPs) widened so that most projections are whole blocks of 64 rows (the
    int4 kernel's layout) and some are not (K/V of one head of 32: they keep the checkpoint's layout)."""
    return dict(text_config_dict("E2B"), hidden_size=128, intermediate_size=128, hidden_size_per_layer_input=32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("e2b")
    reference_model(_config(), seed=3).save_pretrained(path)
    return path


def _engine_outputs(model, kernels: bool):
    prompts = [list(range(5, 5 + n)) for n in (3, 13, 21)]  # past the sliding window of 8
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    with override(kernels=kernels):
        return engine_outputs(LLMEngine(model, max_num_seqs=4, max_model_len=64), prompts, params)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantized_model_tokens_equal_the_twin(checkpoint, scheme, int4_kernel):
    """fp32: greedy tokens of a batch through the engine with the CPU kernels equal those through the twin, and
    their log-probabilities agree to fp32 summation order (1e-4: the differences of the products, amplified by the
    norms through the layers). The native int4 kernel takes 16-bit inputs only: fp32 int4 products run the twin."""
    model = Model.from_pretrained(checkpoint, dtype=torch.float32, device="cpu", quantization=scheme)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    repacked = [m for m in quantized if m.cpu_scales_and_zeros is not None]
    pytorch_int4 = scheme == "int4" and int4_kernel == "pytorch"
    assert (len(repacked) > 10 and len(repacked) < len(quantized)) if pytorch_int4 else not repacked
    head = model.quantized_head  # the tied LM head, quantized for the logits
    assert (head.cpu_scales_and_zeros is not None) == pytorch_int4
    calls = []
    with mock.patch.object(fused, "cpu_linear", side_effect=lambda x, w: calls.append(cpu_linear(x, w)) or calls[-1]):
        fast = _engine_outputs(model, kernels=True)
    taken = [out for out in calls if out is not None]
    assert len(taken) > 100 if scheme == "int8" or pytorch_int4 else not taken
    plain = _engine_outputs(model, kernels=False)
    for (ids, logprobs), (plain_ids, plain_logprobs) in zip(fast, plain):
        assert ids == plain_ids
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(plain_logprobs), rtol=0, atol=1e-4)


def test_bf16_quantized_model_logits_near_the_twin(checkpoint, int4_kernel):
    """bf16 activations (the CPU's fast case): the last position's logits with the kernels against the twin, within
    the spread that bf16 rounding of the same products gives (2^-9 relative per product, through the layers): a
    fraction of the logits' own scale, where a misread weight would be off by about the scale itself."""
    model = Model.from_pretrained(checkpoint, dtype=torch.bfloat16, device="cpu", quantization="int4")
    ids = torch.tensor([list(range(5, 21))])  # 16 positions: within CPU_KERNEL_MAX_ROWS
    with torch.no_grad():
        with override(kernels=True):
            fast = model(ids, last_only=True)
        with override(kernels=False):
            plain = model(ids, last_only=True)
    assert (fast - plain).abs().max() < 0.05 * plain.abs().max()
    assert VOCAB == plain.shape[-1]


def test_quantized_head_is_derived_and_not_saved(checkpoint, tmp_path, monkeypatch, int4_kernel):
    """The CPU's quantized LM head is the tied table quantized with the decoder's scheme; the embedding keeps the
    table. A saved model holds no head. Loaded back (a compressed-tensors checkpoint) it runs as stored, with the bf16
    head (as the parity tests against transformers require); with quantization= its scheme, the same head is derived
    and gives the same logits, which differ from those of the bf16 head."""
    from safetensors import safe_open

    from gemma4.loading import save_model

    from gemma4.model import gemma4

    monkeypatch.setattr(gemma4, "HEAD_ROWS_AT_ONCE", 128)  # quantized in blocks of rows, as a full table is
    model = Model.from_pretrained(checkpoint, dtype=torch.bfloat16, device="cpu", quantization="int4")
    expected = quantize(model.text.embed_tokens.weight, ON_LOAD["int4"])
    assert (model.quantized_head.cpu_scales_and_zeros is not None) == (int4_kernel == "pytorch")
    assert torch.equal(model.quantized_head.integers(), expected.integers())
    assert torch.equal(model.quantized_head.scale, expected.scale)
    save_model(model, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        assert not [key for key in saved.keys() if "head" in key]
    assert Model.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu").quantized_head is None
    again = Model.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu", quantization="int4")
    assert torch.equal(again.quantized_head.integers(), expected.integers())
    with pytest.raises(ValueError, match="already quantized otherwise"):
        Model.from_pretrained(tmp_path, device="cpu", quantization="int8")
    ids = torch.tensor([list(range(5, 15))])
    with torch.no_grad():
        logits = model(ids)
        assert torch.equal(again(ids), logits)
        model.quantized_head = None
        assert not torch.equal(model(ids), logits)


def test_wide_projections_stored_in_chunks(checkpoint, tmp_path, monkeypatch):
    """With the native kernel, int4 projections whose K is wider than CPU_INT4_CHUNK_INPUTS (here made 128: the tiny
    E2B's double-wide down projections and global o_proj, K = 256) are stored chunk by chunk on load, and only
    those. The model's greedy tokens equal those of the same model without chunks, its log-probabilities within the
    fp32 summation order the chunks change (a few units of bf16 rounding); saved, it writes the checkpoint's
    words."""
    if cpu.library() is None:
        pytest.skip("the C kernels are not built here")
    from safetensors.torch import load_file

    from gemma4.loading import save_model
    from gemma4.model import quantized

    plain = Model.from_pretrained(checkpoint, dtype=torch.bfloat16, device="cpu", quantization="int4")
    monkeypatch.setattr(quantized, "CPU_INT4_CHUNK_INPUTS", 128)
    model = Model.from_pretrained(checkpoint, dtype=torch.bfloat16, device="cpu", quantization="int4")
    chunked = {name: m.chunk for name, m in model.named_modules() if isinstance(m, QuantizedLinear) and m.chunk}
    wide = {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear) and m.in_features > 128}
    assert chunked and set(chunked) == wide and set(chunked.values()) == {128}
    assert any(name.endswith("down_proj") for name in chunked)  # and the global layers' o_proj
    (ids, logprobs), *_ = _engine_outputs(model, kernels=True)
    (plain_ids, plain_logprobs), *_ = _engine_outputs(plain, kernels=True)
    assert ids == plain_ids
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(plain_logprobs), rtol=0, atol=8 * 2.0**-8)
    save_model(model, tmp_path / "chunked")
    save_model(plain, tmp_path / "plain")
    saved, expected = (load_file(tmp_path / name / "model.safetensors") for name in ("chunked", "plain"))
    assert saved.keys() == expected.keys() and all(torch.equal(saved[key], expected[key]) for key in saved)


def test_random_quantized_checkpoint(tmp_path):
    """`gemma4 init --quantization int4` (write_random_checkpoint): the decoder's Linears drawn as int4, written as a
    compressed-tensors checkpoint that loads back to the same integers; the dequantized spread is about the dense
    draws' (GAIN / sqrt(fan_in))."""
    from gemma4.random_init import GAIN, random_config, random_model, write_random_checkpoint

    write_random_checkpoint("E2B", tmp_path, num_layers=2, text_only=True, quantization="int4")
    loaded = Model.from_pretrained(tmp_path, device="cpu")
    drawn = random_model(random_config("E2B", 2, text_only=True), quantization="int4")
    pairs = [(m, drawn.get_submodule(name)) for name, m in loaded.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(pairs) > 10
    for ours, theirs in pairs:
        assert torch.equal(ours.weight.integers(), theirs.weight.integers())
        spread = ours.weight.dequantize(torch.float32).std().item() * ours.in_features**0.5 / GAIN
        assert 0.8 < spread < 1.25


def test_page_out_gives_back_mapped_pages_and_keeps_the_data(tmp_path):
    """page_out on a memory-mapped checkpoint tensor drops its pages from the resident set (read from the file again
    when touched); on ordinary memory it changes nothing."""
    import sys

    from safetensors import safe_open
    from safetensors.torch import save_file

    from gemma4.model.pages import page_out

    def resident_file_mib() -> float:
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssFile")) / 1024

    save_file({"t": torch.arange(2**24, dtype=torch.float32)}, tmp_path / "t.safetensors")  # 64 MiB
    with safe_open(tmp_path / "t.safetensors", "pt", device="cpu") as reader:
        mapped = reader.get_tensor("t")
    total = mapped.sum()
    resident = resident_file_mib() if sys.platform.startswith("linux") else None
    page_out(mapped)
    if resident is not None:
        assert resident_file_mib() < resident - 32
    assert mapped.sum() == total
    plain = torch.arange(2**22, dtype=torch.float32)
    page_out(plain)
    assert torch.equal(plain, torch.arange(2**22, dtype=torch.float32))
