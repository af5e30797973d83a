"""Every Triton kernel compiles for a Hopper GPU (decode kernels with PDL on), checked without one
(tests/sm90_compile.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


ROOT = Path(__file__).resolve().parents[1]


def compiling(*command: str) -> subprocess.CompletedProcess:
    """Run Python on `command` (a script and its arguments, or -c and code) that compiles kernels for sm_90: outside
    Triton's interpreter, src/ and tests/ importable, no GPU visible (the launches take CPU tensors); skip where
    Triton has no ptxas."""
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_kernels_compile_for_sm90():
    done = compiling(str(ROOT / "tests" / "sm90_compile.py"))
    # 101 launches, and two (plain, gated) for each int4_mma tile a device's config names
    tiles = re.search(r"(\d+) int4_mma tiles named by the configs", done.stdout)
    assert tiles and f"{101 + 2 * int(tiles.group(1))} launches compiled for sm_90" in done.stdout, done.stdout[-3000:]


def test_sass_counts_script():
    """benchmarks/sass_counts.py (static instruction counts, no GPU): a row per compiled kernel, counts read."""
    done = compiling(str(ROOT / "benchmarks" / "sass_counts.py"), "attention", "--preset", "E2B", "--batch", "2",
                     "--context", "64")
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if "_split_kernel" in line]
    assert [row[0].strip() for row in rows] == ["sliding D=256, bf16 cache", "sliding D=256, fp8 cache",
                                                "global D=512, bf16 cache", "global D=512, fp8 cache"]
    assert all(int(row[2].replace(",", "")) > 100 for row in rows)


NORMS_PTX = """
import torch, triton
import sm90_compile
from gemma4.kernels import attention, moe, norm, router, step_inputs
compile_for_sm90 = triton.compile
def compile_and_count(source, target=None, options=None):
    ptx = compile_for_sm90(source, target=target, options=options).asm["ptx"]
    before, _, after = ptx.partition("griddepcontrol.wait")
    print(source.fn.__name__, before.count("ld.global"), after.count("ld.global"))
triton.compile = compile_and_count
sm90_compile.compile_launches(attention, moe, norm, router, step_inputs)
rows, w = torch.randn(2, 256).bfloat16(), torch.randn(256).bfloat16()
norm.rms_norm(rows, w, 1e-6)
norm.residual_rms_norm(rows, rows.clone(), w, 1e-6, w[:1], w, 1e-6)
cos, sin = torch.randn(2, 1, 64).bfloat16(), torch.randn(2, 1, 64).bfloat16()
norm.qk_norm_rope(torch.randn(2, 1, 4, 64).bfloat16(), w[:64], 1e-6, cos, sin)
cache = torch.randn(2, 2, 16, 64).bfloat16()
norm.qkv_norm_rope_store(torch.randn(2, 1, 256).bfloat16(), torch.randn(2, 1, 128).bfloat16(),
                         torch.randn(2, 1, 128).bfloat16(), w[:64], w[:64], 1e-6, cos, sin, cache, cache.clone(),
                         torch.zeros(2, 1, dtype=torch.int64))
moe.moe_residual_norm(rows, rows.clone(), rows.clone(), w, w, w, 1e-6, w[:1], w, 1e-6)
step_inputs.per_layer_inputs(torch.randn(2, 1, 4 * 256).bfloat16(), torch.zeros(2, 1, dtype=torch.int64),
                             torch.randn(8, 4 * 256).bfloat16(), w, 1e-6, 0.025, 16.0)
router.route(torch.randn(2, 128).bfloat16(), torch.rand(128).bfloat16(), 8)
pool, positions = torch.randn(2, 400, 64).bfloat16(), torch.arange(200).expand(2, 200).contiguous()
attention.decode_attention(torch.randn(2, 4, 64).bfloat16(), pool, pool, positions, torch.full((2,), 199),
                           slots=positions.clone(), num_keys=torch.full((2,), 150), num_splits=1, new_key_only=True)
"""


def test_norm_kernels_load_their_weights_before_the_pdl_wait():
    """The norm kernels' weights and the router's per-expert scales (no kernel writes them) are loaded before
    griddepcontrol.wait, the rows after it; decode attention's first block of older keys before it (new_key_only), the
    query and the new key after it: global loads on both sides of the wait in each kernel's sm_90 PTX."""
    done = compiling("-c", NORMS_PTX)
    counts = {name: (int(before), int(after)) for name, before, after in map(str.split, done.stdout.splitlines())}
    assert set(counts) == {"_rms_norm_kernel", "_residual_rms_norm_kernel", "_qk_norm_rope_kernel",
                           "_qkv_norm_rope_store_kernel", "_moe_residual_norm_kernel", "_per_layer_inputs_kernel",
                           "_route_kernel", "_split_kernel"}, done.stdout
    assert all(before > 0 and after > 0 for before, after in counts.values()), counts
