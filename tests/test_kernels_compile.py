"""Every Triton kernel compiles for a Hopper GPU (decode kernels with PDL on), checked without one
(tests/sm90_compile.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


def test_kernels_compile_for_sm90():
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(root / "tests" / "sm90_compile.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # 96 launches, and two (plain, gated) for each int4_mma tile a device's config names
    tiles = re.search(r"(\d+) int4_mma tiles named by the configs", done.stdout)
    assert tiles and f"{96 + 2 * int(tiles.group(1))} launches compiled for sm_90" in done.stdout, done.stdout[-3000:]
