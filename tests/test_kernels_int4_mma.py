"""The tensor-core int4 GEMV with register operands (kernels/int4_mma.py, Gluon: it runs on GPUs of compute
capability 9.0 or newer only) against the exact dequantized product; the GEMV entry points that dispatch to it
against gemv.py's own int4 kernel; on any machine, its choice of K splits and that the CPU never takes it. Its sm_90
compile is checked without a GPU by test_kernels_compile.py."""

import pytest
import torch

pytest.importorskip("triton")

from gemma4.kernels import gemv, int4_mma, tuning  # noqa: E402
from gemma4.kernels.norm import residual_rms_norm  # noqa: E402
from gemma4.model.quantized import Scheme, quantize  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                         reason="Gluon's int4 MMA GEMV runs on CUDA devices of compute capability 9.0 or newer")


def test_splits_are_the_fewest_that_reach_the_programs():
    """K splits divide the row's 256-input steps evenly: the fewest giving INT4_MMA_PROGRAMS programs, else the most
    up to MAX_SPLIT (31B's shapes at 32-row blocks: gate/up 1, q/k/v 3, down 6)."""
    assert int4_mma._split(1344, 21, 1000) == 1
    assert int4_mma._split(512, 21, 1000) == 3
    assert int4_mma._split(168, 84, 1000) == 6
    assert int4_mma._split(3, 32, 1000) == 16
    assert int4_mma._split(10, 7, 1000) == 7


def test_not_taken_on_the_cpu():
    weight = quantize(torch.randn(8192, 4096).to(torch.bfloat16), Scheme("int", 4, "group", group_size=32))
    assert not int4_mma.takes(weight, torch.randn(1, 1, 4096).to(torch.bfloat16))


def int4(n: int, k: int, group: int = 32, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    weight = torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5
    x = torch.randn(1, 1, k, device="cuda", generator=gen).to(torch.bfloat16)
    return quantize(weight.to(torch.bfloat16), Scheme("int", 4, "group", group_size=group)), x


def exact(x, weight):
    """The fp32 product of the exact dequantized weight, and the sum of |terms| per output (for the bound)."""
    w = weight.dequantize(torch.float32)
    xf = x.float().view(1, -1)
    return (xf @ w.t()).view(-1), (xf.abs() @ w.abs().t()).view(-1)


def assert_rounded_product(out, x, weight):
    """out is the exact product up to fp32 summation order (2^-20 of the summed |terms|, K <= 2^14 terms), rounded
    once to bf16 (half an ulp: at most 2^-8 relative)."""
    ref, magnitude = exact(x, weight)
    bound = 2.0 ** -8 * ref.abs() + 2.0 ** -20 * magnitude
    err = (out.float().view(-1) - ref).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3e}, at most {bound[err.argmax()].item():.3e} there"


@gpu
@pytest.mark.parametrize("n, k, group", [(4096, 256, 32), (1000, 5376, 32), (5376, 8192, 32), (300, 2048, 128),
                                         (33, 1024, 64)])
def test_product_is_the_rounded_exact_product(n, k, group):
    """One split and several (K / 256 steps), rows that no block of 32 divides, groups of 32 to 128."""
    weight, x = int4(n, k, group)
    out = int4_mma.product(x, weight)
    assert out.shape == (1, 1, n) and out.dtype == torch.bfloat16
    assert_rounded_product(out, x, weight)


@gpu
def test_splits_add_in_a_fixed_order():
    """Several splits: the last program adds the partial sums in split order, so calls agree bit for bit; and
    the counters are re-armed (a CUDA-graph replay gives the same output)."""
    weight, x = int4(512, 8192)
    blocks = 512 // tuning.tile("gemv", "INT4_MMA_TILES", x.device)[0]
    assert int4_mma._split(blocks, 8192 // int4_mma.BLOCK_K, tuning.tile("gemv", "INT4_MMA_PROGRAMS", x.device)) > 1
    first = int4_mma.product(x, weight)
    assert all(torch.equal(int4_mma.product(x, weight), first) for _ in range(5))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = int4_mma.product(x, weight)
    for _ in range(3):
        graph.replay()
        assert torch.equal(out, first)


@gpu
def test_entry_points_dispatch_to_it(monkeypatch):
    """gemv and gemv_gated (fused gate/up; with a normed input too) take the MMA kernel for int4 weights of at least
    INT4_MMA_MIN_ELEMENTS weights, the input's norms in their own kernel: the same results as gemv.py's
    kernel (its int4 format with explicit tiles) up to one bf16 rounding of the product."""
    weight, x = int4(2048, 1024)
    gate_up, _ = int4(4096, 1024, seed=1)
    calls = []
    product = int4_mma.product
    monkeypatch.setattr(int4_mma, "product", lambda *a, **k: calls.append(1) or product(*a, **k))
    monkeypatch.setattr(int4_mma, "_tuned", lambda device: dict(tuning.config("gemv", device),
                                                                INT4_MMA_MIN_ELEMENTS=1))
    tiles = (32, 256, 4, 1)
    assert_rounded_product(gemv.gemv(x, weight), x, weight)
    torch.testing.assert_close(gemv.gemv(x, weight), gemv.gemv(x, weight, tiles=tiles), rtol=2 ** -7, atol=1e-3)
    torch.testing.assert_close(gemv.gemv_gated(x, gate_up, "gelu_pytorch_tanh"),
                               gemv.gemv_gated(x, gate_up, "gelu_pytorch_tanh", tiles=tiles), rtol=2 ** -7, atol=1e-3)
    gate, up = gate_up.values[:2048], torch.randn(1, 1, 2048, device="cuda").to(torch.bfloat16)
    gate = type(gate_up)(gate, gate_up.scale[:2048], gate_up.scheme)
    torch.testing.assert_close(gemv.gemv_gated(x, gate, "gelu_pytorch_tanh", up),
                               gemv.gemv_gated(x, gate, "gelu_pytorch_tanh", up, tiles=tiles), rtol=2 ** -7, atol=1e-3)
    # a normed input (the model's gate/up after the attention block): the norms' kernel, then the MMA kernel
    stream, norm_in = torch.randn_like(x), torch.rand(1024, device="cuda").to(torch.bfloat16) + 0.5
    for next_weight in (norm_in, None):
        news = [torch.empty_like(x), torch.empty_like(x)]
        outs = [gemv.gemv_gated(x, gate_up, "gelu_pytorch_tanh", tiles=t,
                                norms=(stream, norm_in, 1e-6, None, next_weight, 1e-6, new))
                for t, new in zip((None, tiles), news)]
        assert torch.equal(news[0], news[1])
        torch.testing.assert_close(outs[0], outs[1], rtol=2 ** -7, atol=1e-3)
    assert len(calls) == 6


def residual_norms(k: int, scalar: bool, has_next: bool, seed: int = 3):
    """An earlier product y and the norms of it a GEMV takes (gemv.py's `norms`): y holds multiples of 1/8 up to 1
    in size, whose squares sum exactly in fp32 in any order, so the first norm and the new residual stream are the
    same bits however a kernel sums them."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    y = (torch.randint(-8, 9, (1, 1, k), device="cuda", generator=gen) / 8).to(torch.bfloat16)
    residual = (rand(1, 1, k) * 4).to(torch.bfloat16)
    norm_weight, next_weight = ((rand(k) * 0.5 + 1).to(torch.bfloat16) for _ in range(2))
    norms = (residual, norm_weight, 1e-6, torch.tensor([0.37], device="cuda").to(torch.bfloat16) if scalar else None,
             next_weight if has_next else None, 1e-5, torch.full_like(residual, float("nan")))
    return y, norms


@gpu
@pytest.mark.parametrize("k, tiles", [(1536, (16, 1, 1000)), (2560, (64, 4, 500, 2)), (5376, (32, 2, 1000)),
                                      (5376, (64, 4, 100))])
@pytest.mark.parametrize("variant", ["next", "scalar", "scalar next", "gated next"])
def test_programs_normalize_their_input(k, tiles, variant):
    """With `norms` each program computes the residual norms of its input itself (E2B's, E4B's and 31B's rows; one
    split and several): the new residual stream bit-equal to the norms' own kernel (residual_rms_norm), and the
    product as that kernel's row times the weight, up to the fp32 order of the next norm's sum of squares (an ulp of
    a few inputs, so a few ulps of the outputs at most)."""
    y, norms = residual_norms(k, "scalar" in variant, "next" in variant)
    residual, norm_weight, eps, scalar, next_weight, next_eps, new = norms
    act = 0 if "gated" in variant else None
    weight, _ = int4(4096 if act is None else 8192, k, seed=4)
    want_new, want_next = residual_rms_norm(residual, y, norm_weight, eps, scalar, next_weight, next_eps)
    row = want_next if next_weight is not None else want_new
    got, want = int4_mma.product(y, weight, act, None, tiles, norms), int4_mma.product(row, weight, act, None, tiles)
    assert torch.equal(new, want_new)
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -6, atol=1e-3)
    assert (got == want).float().mean() > 0.9
    if next_weight is None:  # the row is new itself: no second sum, the same bits
        assert torch.equal(got, want)


@gpu
def test_normed_calls_follow_their_tiles(monkeypatch):
    """A normed call computes its norms in its programs where its tiles' fifth entry says so, else in the norms'
    kernel before it (a normed call without an entry takes the plain call's tiles): the same results either way."""
    weight, _ = int4(8192, 2560, seed=5)
    y, norms = residual_norms(2560, False, True)
    kernels = []
    norm_kernel = gemv._normed_input
    monkeypatch.setattr(gemv, "_normed_input", lambda *a: kernels.append(1) or norm_kernel(*a))
    outs = []
    for entry in ([32, 2, 1000, 1, 1], [32, 2, 1000, 1, 0], None):
        by_shape = {"8192x2560 gated": [32, 2, 1000]} | ({"8192x2560 gated normed": entry} if entry else {})
        monkeypatch.setattr(int4_mma, "_tuned", lambda device, b=by_shape: dict(
            tuning.config("gemv", device), INT4_MMA_BY_SHAPE=b))
        outs.append(gemv.gemv_gated(y, weight, "gelu_pytorch_tanh", norms=norms))
    assert kernels == [1, 1]
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=2 ** -6, atol=1e-3)
    assert torch.equal(outs[1], outs[2])


def test_by_shape_entries_decide_before_the_defaults(monkeypatch):
    """INT4_MMA_BY_SHAPE's entry for a call (its shape, gated, normed) gives its tiles, or gemv.py's kernels (null);
    a call without one runs at the default tiles from INT4_MMA_MIN_ELEMENTS weights."""
    by_shape = {"4096x1024 gated normed": [64, 2, 500], "4096x1024": None}
    monkeypatch.setattr(int4_mma, "takes", lambda weight, x: True)
    monkeypatch.setattr(int4_mma, "_tuned", lambda device: dict(
        INT4_MMA_TILES=(32, 1), INT4_MMA_PROGRAMS=1000, INT4_MMA_MIN_ELEMENTS=2048 * 1024,
        INT4_MMA_BY_SHAPE=by_shape))
    x = torch.zeros(1, 1, 1024, dtype=torch.bfloat16)
    big, small = (quantize(torch.zeros(n, 1024).to(torch.bfloat16), Scheme("int", 4, "group", group_size=32))
                  for n in (4096, 1024))
    assert int4_mma.shape_key(big.shape, True, True) == "4096x1024 gated normed"
    assert int4_mma.launch_tiles(big, x, gated=True, normed=True) == (64, 2, 500)
    assert int4_mma.launch_tiles(big, x) is None
    assert int4_mma.launch_tiles(big, x, gated=True) == (32, 1, 1000)
    assert int4_mma.launch_tiles(small, x, gated=True) is None
    assert int4_mma.launch_tiles(big, x, normed=True) is None  # no entry of its own: the plain call's
    assert gemv._mma_tiles(big, x, True, True) == (64, 2, 500)
    assert not any(int4_mma.fuses_norms(t) for t in ((64, 2, 500), (64, 2, 500, 2), (64, 2, 500, 2, 0)))
    assert int4_mma.fuses_norms((64, 2, 500, 1, 1))


@gpu
@pytest.mark.parametrize("n, k", [(4096, 256), (1000, 5376), (2 * 1536, 2560)])
def test_prefetching_two_steps_changes_no_bit(n, k):
    """Two steps in flight (one step: the prefetches past the end masked) load the same words into the same sums:
    the products of one step ahead, bit for bit, plain and gated, one split and several."""
    weight, x = int4(n, k, seed=2)
    for tiles in ((32, 1, 1000), (64, 2, 100), (16, 1, 2000)):
        for act in (None, 0):
            assert torch.equal(int4_mma.product(x, weight, act, tiles=(*tiles, 2)),
                               int4_mma.product(x, weight, act, tiles=tiles))


def tuned_tiles() -> list[tuple[int, ...]]:
    """Every (BLOCK_N, warps, target programs[, steps prefetched]) that a device's INT4_MMA_BY_SHAPE names, and the
    defaults."""
    found = set()
    for table in tuning.every_device("gemv").values():
        found.add((*table["INT4_MMA_TILES"], table["INT4_MMA_PROGRAMS"]))
        found.update(tuple(t) for t in table.get("INT4_MMA_BY_SHAPE", {}).values() if t)
    return sorted(found)


@gpu
@pytest.mark.parametrize("tiles", tuned_tiles())
def test_every_tuned_tile_gives_the_same_products(tiles):
    """Each tile the configs name (rows a program, warps, K splits): the rounded exact product, with several splits
    and with rows that no block divides; the gated epilogue (fused gate/up) as at the default tiles, up to the fp32
    summation order."""
    for n, k in ((1000, 5376), (4096, 1536), (300, 2048)):
        weight, x = int4(n, k)
        assert_rounded_product(int4_mma.product(x, weight, tiles=tiles), x, weight)
    gate_up, x = int4(2 * 1536, 2560, seed=1)
    torch.testing.assert_close(int4_mma.product(x, gate_up, 0, tiles=tiles), int4_mma.product(x, gate_up, 0),
                               rtol=2 ** -7, atol=1e-3)
