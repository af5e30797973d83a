"""The decode GEMV kernel (gemma4.kernels.gemv) against F.linear; the model routes one-row products through it."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from gemma4 import kernels  # noqa: E402
from gemma4.kernels import gemv as gemv_module  # noqa: E402
from gemma4.kernels.gemv import gemv  # noqa: E402
from gemma4.model.fused import linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(37, 100), (256, 1536), (130, 4100), (8, 2048)])
def test_gemv_equals_linear(n, k, dtype):
    """Ragged N (masked rows), ragged K (a masked last step), K over one BLOCK_K step, and an exact fit."""
    torch.manual_seed(n)
    weight = (torch.randn(n, k) * k**-0.5).to(DEVICE, dtype)
    x = torch.randn(1, 1, k).to(DEVICE, dtype)
    out, ref = gemv(x, weight), F.linear(x, weight)
    assert out.shape == ref.shape == (1, 1, n) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:  # fp32 accumulation in another order, one rounding: at most an ulp apart
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-5)


def test_gemv_tiles_do_not_change_results():
    """Other tiles: same products up to fp32 summation order (rows masked differently, other K steps, several
    groups of rows per program: on the CPU 64 rows a group, so 70 rows end in a ragged second group, and a third
    group is all masked)."""
    torch.manual_seed(0)
    weight, x = torch.randn(70, 600, device=DEVICE) * 600**-0.5, torch.randn(600, device=DEVICE)
    up = torch.randn(70, device=DEVICE)
    ref = F.linear(x, weight)
    for tiles in [(2, 256, 4, 2), (16, 512, 8, 3), (4, 2048, 8, 3), (8, 256, 4, 3, 3), (16, 1024, 4, 3, 2)]:
        torch.testing.assert_close(gemv(x, weight, tiles), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gemv_module.gemv_gated(x, weight, "gelu_pytorch_tanh", up, tiles=tiles),
                                   F.gelu(ref, approximate="tanh") * up, rtol=1e-5, atol=1e-5)


def test_linear_takes_gemv_for_one_row_only(monkeypatch):
    calls = []
    monkeypatch.setattr(gemv_module, "gemv", lambda x, w, norms=None: calls.append(x.shape) or F.linear(x, w))
    weight = torch.randn(8, 16, device=DEVICE)
    with kernels.force():
        linear(torch.randn(1, 1, 16, device=DEVICE), weight)  # a batch-1 decode step
        linear(torch.randn(2, 1, 16, device=DEVICE), weight)  # two rows: cuBLAS
        linear(torch.randn(1, 3, 16, device=DEVICE), weight)  # a prefill: cuBLAS
    assert calls == [(1, 1, 16)]


from gemma4.kernels.gemv import gemv_gated  # noqa: E402
from gemma4.model.common import activation  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "silu"])
@pytest.mark.parametrize("with_multiplier", [False, True])
def test_gemv_gated_equals_eager(dtype, act, with_multiplier):
    """MLP (fused gate/up weight) and PLE (gate weight, up given) forms against the eager ops' rounding: products
    rounded, act(gate) rounded, the product rounded."""
    torch.manual_seed(1)
    width, k = 70, 300  # a ragged last tile of rows, a ragged K
    weight = (torch.randn(width if with_multiplier else 2 * width, k) * k**-0.5 * 2).to(DEVICE, dtype)
    x = torch.randn(1, 1, k).to(DEVICE, dtype)
    up = torch.randn(1, 1, width).to(DEVICE, dtype) if with_multiplier else None
    out = gemv_gated(x, weight, act, up)
    if with_multiplier:
        gate = F.linear(x, weight)
    else:
        gate, up = F.linear(x, weight).chunk(2, dim=-1)
    expected = activation(act)(gate) * up
    assert out.shape == expected.shape == (1, 1, width) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:  # a product an ulp off (summation order) moves act(gate) * up by about an ulp
        torch.testing.assert_close(out.float(), expected.float(), rtol=2**-6, atol=1e-3)
        assert (out == expected).float().mean() > 0.9


from gemma4.kernels import counters  # noqa: E402
from gemma4.kernels.norm import residual_rms_norm  # noqa: E402


def test_takes_gemv_only_where_measured_faster():
    """One row, and not the big 31B matrices cuBLAS reads faster (benchmarks/gemv.py); shapes only (meta tensors)."""
    from gemma4.model.fused import takes_gemv
    row = torch.empty(1, 1, 1, device="meta")
    with kernels.force():
        def takes(n, k):
            return takes_gemv(row.expand(1, 1, k), torch.empty(n, k, device="meta"))
        assert takes(2560, 1536) and takes(1536, 12288) and takes(262144, 2816)  # E2B, E2B's down, an LM head
        assert takes(5376, 8192)  # 31B's q projection: 44M elements
        assert not takes(43008, 5376) and not takes(5376, 21504) and not takes(262144, 5376)  # 31B's MLP, LM head
        assert not takes_gemv(torch.empty(2, 1, 1536, device="meta"), torch.empty(2560, 1536, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["gemv scalar+next", "gemv next", "gated", "gated multiplier no-next"])
@pytest.mark.parametrize("groups", [None, 3])
def test_gemv_with_normed_input_equals_norm_kernel_then_gemv(dtype, variant, groups):
    """The GEMV whose programs apply the residual norms of an earlier product y to their input (norms=) equals the
    norm kernel followed by the plain GEMV: the same outputs and the same residual stream `new` (written by program 0).
    A ragged row (K = 300 of a 512-wide tile) and ragged N; the default row groups and three (on the CPU 64 rows a
    group: the second ragged, the third masked)."""
    tiles = (8, 512, 4, 3, groups) if groups else None
    torch.manual_seed(3)
    n, k = 70, 300

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape) * scale + offset).to(DEVICE, dtype)

    y, residual = rand(1, 1, k), rand(1, 1, k, scale=4.0)
    norm_weight, next_weight = rand(k, scale=0.5, offset=1.0), rand(k, scale=0.5, offset=1.0)
    scalar = torch.tensor([0.37], device=DEVICE, dtype=dtype) if "scalar" in variant else None
    has_next = "no-next" not in variant
    new = torch.full_like(residual, float("nan"))
    norms = (residual, norm_weight, 1e-6, scalar, next_weight if has_next else None, 1e-5, new)
    want_new, want_next = residual_rms_norm(residual, y, norm_weight, 1e-6, scalar,
                                            next_weight if has_next else None, 1e-5)
    gemv_input = want_next if has_next else want_new
    if variant.startswith("gemv"):
        weight = rand(n, k, scale=k**-0.5)
        got, want = gemv(y, weight, tiles, norms=norms), gemv(gemv_input, weight)
    else:
        multiplier = rand(1, 1, n) if "multiplier" in variant else None
        weight = rand(n if multiplier is not None else 2 * n, k, scale=k**-0.5 * 2)
        got = gemv_gated(y, weight, "gelu_pytorch_tanh", multiplier, norms=norms, tiles=tiles)
        want = gemv_gated(gemv_input, weight, "gelu_pytorch_tanh", multiplier)
    assert got.shape == want.shape and new.shape == want_new.shape
    if dtype == torch.float32 or DEVICE == "cpu":  # the interpreter sums in one order: bit-equal
        torch.testing.assert_close(new, want_new, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # compiled, the two kernels' fp32 reductions may differ by an ulp before the bf16 rounding
        torch.testing.assert_close(new.float(), want_new.float(), rtol=2**-7, atol=1e-5)
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=1e-3)
        assert (got == want).float().mean() > 0.9


def test_rows_wider_than_a_tile_take_the_norm_kernel_first():
    """Residual norms of a row over NORMED_MAX_K inputs (31B's 5,376, left to the next GEMV since int4_mma takes
    them) that reach gemv.py's kernels: the norms' own kernel, then the plain GEMV, the same bits."""
    torch.manual_seed(4)
    k = gemv_module.NORMED_MAX_K + 256
    y, residual, weight = (torch.randn(*shape).to(DEVICE, torch.bfloat16) for shape in ((1, 1, k), (1, 1, k), (24, k)))
    norm_weight = torch.rand(k).to(DEVICE, torch.bfloat16) + 0.5
    new = torch.empty_like(residual)
    got = gemv(y, weight, norms=(residual, norm_weight, 1e-6, None, norm_weight, 1e-6, new))
    want_new, want_next = residual_rms_norm(residual, y, norm_weight, 1e-6, None, norm_weight, 1e-6)
    assert torch.equal(new, want_new)
    assert torch.equal(got, gemv(want_next, weight))


def test_outgrown_finished_counters_stay_allocated():
    """CUDA graphs captured with a smaller set of counters keep its address: growing the set must not free it (the
    argmax kernel's set grows with the batch buckets an engine captures)."""
    small = counters.finished_counters("test-owner", torch.device("cpu"), 2)
    large = counters.finished_counters("test-owner", torch.device("cpu"), 8)
    assert large.numel() == 8 and any(t.data_ptr() == small.data_ptr() for t in counters._retired)


def test_kernels_beside_take_their_own_counters():
    """Kernels launched `beside` (a second stream, at the same time as kernels of their kind on the first) count their
    programs in counters of their own; after the block the first set again."""
    cpu = torch.device("cpu")
    first = counters.finished_counters("test-beside", cpu, 4)
    with counters.beside():
        second = counters.finished_counters("test-beside", cpu, 4)
        assert counters.finished_counters("test-beside", cpu, 4).data_ptr() == second.data_ptr()
    assert second.data_ptr() != first.data_ptr()
    assert counters.finished_counters("test-beside", cpu, 4).data_ptr() == first.data_ptr()
