"""The CPU's one-call decode steps (kernels/cpu.py `decode_layers`, chosen by text.TextModel.decodes_on_cpu): every
decoder layer of a decode step in one C call, against the same steps layer by layer in Python with the C kernels per
op (option `cpu_decode_layers` off), on tiny int4 models in bf16 / fp16; the cases it must decline; and the
vectorized tanh gelu (`gelu_gated`) against PyTorch's."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from gemma4 import Model
from gemma4.engine.engine import LLMEngine
from gemma4.engine.generate import left_pad
from gemma4.engine.sampling import SamplingParams
from gemma4.kernels import cpu
from gemma4.model.text import TextModel
from gemma4.options import override
from reference import VOCAB, engine_outputs, reference_model, text_config_dict

pytestmark = pytest.mark.skipif(cpu.library() is None, reason="the C kernels are not built here")

TOKENS = 12
PROMPT_LENGTHS = (3, 13, 21)  # past the sliding window of 8; rows of different lengths in one decode step

CONFIGS = {
    # Tiny E2B (PLE, KV sharing, double-wide MLPs), widened as test_cpu_quantized.py's so that the int4 layout holds.
    "E2B": dict(text_config_dict("E2B"), hidden_size=128, intermediate_size=128, hidden_size_per_layer_input=32),
    # K=V global layers (no v_proj), two KV heads on the sliding ones, no PLE, no MoE: its q/k(/v) fuse as they are.
    "31B": text_config_dict("31B"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> a saved tiny checkpoint, written once per module on first use."""
    saved = {}

    def get(family: str):
        if family not in saved:
            path = tmp_path_factory.mktemp(family)
            reference_model(CONFIGS[family], seed=3).save_pretrained(path)
            saved[family] = path
        return saved[family]

    return get


def _load(path, dtype=torch.bfloat16, quantization="int4"):
    return Model.from_pretrained(path, dtype=dtype, device="cpu", quantization=quantization)


def _run_engine(model, monkeypatch, cpu_decode: bool, **engine_args):
    """(engine outputs of the three prompts, greedy, with logprobs; calls of cpu.decode_layers; what each
    decodes_on_cpu answered)."""
    answers = []
    decides = TextModel.decodes_on_cpu

    def recorded(self, embeds, cache):
        answers.append(decides(self, embeds, cache))
        return answers[-1]

    monkeypatch.setattr(TextModel, "decodes_on_cpu", recorded)
    prompts = [list(range(5, 5 + n)) for n in PROMPT_LENGTHS]
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)
    engine = LLMEngine(model, max_num_seqs=4, max_model_len=64, **engine_args)
    with (mock.patch.object(cpu, "decode_layers", wraps=cpu.decode_layers) as spy,
          override(cpu_decode_layers=cpu_decode)):
        outputs = engine_outputs(engine, prompts, params)
    assert all(len(ids) == TOKENS and all(0 <= t < VOCAB for t in ids) for ids, _ in outputs)
    return outputs, spy.call_count, answers


def _flip_tolerance(dtype) -> float:
    """How far the two paths' outputs may part, in units of the logits' scale (|logit| ~ 2 on these tiny models).
    Both paths run the same C products, norms and gelu, and attention sums the keys in the per-op path's order (the
    new one last): over a KVCache they give the same bits. Through the engine (ragged rows, chunked prefills) they
    still part by a rounding flip now and then, for a reason not found yet: a 16-bit attention output moved by one
    ulp stays in the cache, and the later logits then differ by a few eps of the dtype times their scale (measured
    before the keys' order was aligned: fp16 up to ~4.5 eps, bf16 ~2.5 eps, over 30 steps). 8 eps allows that with a
    margin, and is still far below what a real fault gives: one key too few in the window, or RoPE's cos shifted by
    one lane, moves these logits by ~1 (measured)."""
    return 8 * torch.finfo(dtype).eps


@pytest.mark.parametrize("family, dtype", [("E2B", torch.bfloat16), ("E2B", torch.float16), ("31B", torch.bfloat16)])
def test_engine_one_call_decode_equals_per_op(checkpoints, monkeypatch, family, dtype):
    """An engine over three prompts of different lengths (past the sliding window), greedy: with cpu_decode the decode
    steps run through cpu.decode_layers (at least one call per token after the prefill's, and exactly where
    decodes_on_cpu said so), without it they never do; the tokens are equal and the log-probabilities within
    _flip_tolerance(dtype) nats (a log-probability moves by at most twice the largest move of its logits, which is a
    few eps of the dtype here: see there). Today bf16 is equal to the bit, fp16 differs by up to ~1.9e-3 (2 eps)
    after a rounding flip. E2B has KV-shared layers, PLE and double-wide MLPs; 31B K=V global layers (no v_proj)
    with their own KV head count."""
    model = _load(checkpoints(family), dtype)
    assert model.text.cpu_decode_layers() is not None  # every layer int4, fused, in the layout the C layers read
    fast, calls, answers = _run_engine(model, monkeypatch, cpu_decode=True)
    assert calls >= TOKENS - 1 and sum(answers) == calls
    plain, plain_calls, plain_answers = _run_engine(model, monkeypatch, cpu_decode=False)
    assert plain_calls == 0 and plain_answers and not any(plain_answers)
    for (ids, logprobs), (plain_ids, plain_logprobs) in zip(fast, plain):
        assert ids == plain_ids
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(plain_logprobs), rtol=0,
                                   atol=_flip_tolerance(dtype))


def _incremental_logits(model, tokens=None, steps: int = 10):
    """On a fresh KVCache: a left-padded 2-row prefill (21 and 6 tokens), then `steps` decode steps feeding `tokens`
    [steps, 2, 1], or where None each step's greedy choice. (each decode step's logits [steps, 2, vocab] (fp32,
    softcapped), the tokens fed)."""
    ids, mask = left_pad([torch.arange(5, 5 + n) for n in (21, 6)])
    assert not mask.all()  # the shorter row is padded on the left
    cache, fed, out = model.make_cache(2, 64), [], []
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]
        for step in range(steps):
            fed.append(logits.argmax(-1, keepdim=True) if tokens is None else tokens[step])
            logits = model(fed[-1], cache=cache, last_only=True)[:, -1]
            out.append(logits)
    return torch.stack(out), torch.stack(fed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_incremental_forward_one_call_decode_equals_per_op(checkpoints, dtype):
    """Model.forward over a KVCache (not the engine's pools): a left-padded prefill, then 10 decode steps through two
    caches, first without cpu_decode (greedy), then with it fed the same tokens (so the inputs do not depend on what
    is compared). The C path is taken on every decode step and never otherwise, and each step's softcapped logits
    agree within _flip_tolerance(dtype) times their largest magnitude (see there: both dtypes are equal to the bit
    today)."""
    model = _load(checkpoints("E2B"), dtype)
    with mock.patch.object(cpu, "decode_layers", wraps=cpu.decode_layers) as spy:
        with override(cpu_decode_layers=False):
            plain, tokens = _incremental_logits(model)
        assert spy.call_count == 0
        fast, _ = _incremental_logits(model, tokens)
        assert spy.call_count == len(tokens)
    assert plain.shape == (len(tokens), 2, VOCAB) and plain.abs().max() > 1
    torch.testing.assert_close(fast, plain, rtol=0, atol=_flip_tolerance(dtype) * plain.abs().max().item())


@pytest.mark.parametrize("case", ["fp32", "unquantized", "fp8 KV"])
def test_declines(checkpoints, monkeypatch, case):
    """Where the C layers do not compute the step as the model does, decodes_on_cpu says no on every forward and the
    engine runs the per-op path (cpu.decode_layers never called) and still generates: fp32 activations (the native
    int4 kernel reads 16-bit inputs only), bf16 weights that are not int4 (nothing for the C products to read), and an
    fp8 KV cache (pools the C attention does not dequantize; here the layers themselves would be taken)."""
    path = checkpoints("E2B")
    engine_args = {}
    if case == "fp32":
        model = _load(path, torch.float32)
        assert model.text.cpu_decode_layers() is not None  # declined for the activations' dtype alone
    elif case == "unquantized":
        model = _load(path, quantization=None)
        assert model.text.cpu_decode_layers() is None
    else:
        model = _load(path)
        assert model.text.cpu_decode_layers() is not None  # declined for the pools alone
        engine_args = dict(kv_cache_dtype="fp8")
    outputs, calls, answers = _run_engine(model, monkeypatch, cpu_decode=True, **engine_args)
    assert calls == 0 and len(answers) >= TOKENS and not any(answers)


# --- gelu_gated --------------------------------------------------------------------------------------------------

def _assert_gelu_close(got, gate, up):
    """Exact where gate > -1.5. Below, 1 + tanh(...) cancels: PyTorch's own activation carries an absolute error of
    ~1.5e-7 there (its vectorized loop even gives exactly 0 near gate = -5, where the tanh gelu is ~-1e-7) and the
    C tanh differs from it in those bits, so the activations may differ by one ulp of the 16-bit dtype relative to
    the result (eps * |result|) or by an absolute 2^-20 (> 1.5e-7 with a margin) times |up|."""
    expected = F.gelu(gate, approximate="tanh") * up
    assert got.dtype == expected.dtype and got.shape == expected.shape
    exact = gate > -1.5
    assert exact.any() and (~exact).any()
    assert torch.equal(got[exact], expected[exact])
    error = (got.float() - expected.float()).abs()[~exact]
    eps = torch.finfo(got.dtype).eps
    bound = torch.maximum(eps * expected.float().abs(), 2.0**-20 * up.float().abs())[~exact]
    assert (error <= bound).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gelu_gated(dtype):
    """Random gates (randn * 4: both tails of the gelu) of a width that is not a multiple of the vector length (the
    scalar tail runs): against F.gelu(gate, "tanh") * up (see _assert_gelu_close). Chunks of a wider product (rows of
    stride 2N, as gate/up of a fused gate_up product) give the contiguous operands' result; operands whose rows are
    not of unit stride (a transposed matrix) or cannot be viewed as rows (a permuted 3-D tensor) are declined."""
    generator = torch.Generator().manual_seed(0)

    def draw(rows, n):
        gate = (torch.randn(rows, n, generator=generator) * 4).to(dtype)
        return gate, torch.randn(rows, n, generator=generator).to(dtype)

    gate, up = draw(7, 4099)
    _assert_gelu_close(cpu.gelu_gated(gate, up), gate, up)

    gate, up = torch.cat(draw(5, 4099), dim=-1).chunk(2, dim=-1)
    assert not gate.is_contiguous() and gate.stride(0) == 2 * 4099
    chunked = cpu.gelu_gated(gate, up)
    assert torch.equal(chunked, cpu.gelu_gated(gate.contiguous(), up.contiguous()))
    _assert_gelu_close(chunked, gate, up)

    transposed = torch.randn(64, 7, generator=generator).to(dtype).t()
    assert cpu.gelu_gated(transposed, transposed) is None
    permuted = torch.randn(3, 4, 64, generator=generator).to(dtype).transpose(0, 1)
    assert cpu.gelu_gated(permuted, permuted) is None
