"""Runtime switches, in one place: one `Options` object, built once from the environment at import and read through
`options()`, never from os.environ inside a forward. Tests and benchmarks swap it with `override(**fields)`."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping
from typing import Literal

# The products whose residual norms may be left to the next GEMV (model/text.py `defers`): the attention's output
# projection, the MLP's down projection, the PLE projection.
DEFERRABLE = frozenset({"o_proj", "down_proj", "per_layer_projection"})


@dataclasses.dataclass(frozen=True)
class Options:
    """Every runtime switch (the table with each one's meaning: docs/architecture.md, "Runtime switches").
    Environment variables exist only for user-facing debugging switches; the others exist to compare two paths and
    are set by tests and benchmarks through `override`."""

    # GEMMA4_KERNELS=0: plain PyTorch ops instead of the Triton (CUDA) kernels and the CPU's C and int8/int4 kernels
    kernels: bool = True
    pdl: bool = True  # GEMMA4_PDL=0: no programmatic dependent launch (Hopper and newer)
    cuda_graphs: bool = True  # GEMMA4_EAGER=1: eager steps instead of CUDA graph replays (decode and prefill)
    prefill_graphs: bool = True  # a lone prefill chunk of up to 512 tokens replayed from a CUDA graph (runner.py)
    defer_norms: frozenset[str] = DEFERRABLE  # the products whose residual norms the next GEMV applies
    # q/k/v and gate/up as one matmul each when loading: "auto" on CUDA only, True on every device, False never
    fuse_projections: Literal["auto"] | bool = "auto"
    # GEMMA4_FP8_ACTIVATIONS=1: products of several rows (prefill, serving batches) with fp8 per-channel weights
    # multiply activations quantized per token to fp8 (W8A8, as the FP8-dynamic scheme says) on the fp8 tensor cores;
    # off: weight-only, activations in the model dtype
    fp8_activations: bool = False
    prefill_kernel: bool = True  # the flash prefill attention kernel; False: SDPA with a boolean mask
    # a CPU decode step's layers in one C call where they take it (TextModel.decodes_on_cpu); False: layer by layer
    cpu_decode_layers: bool = True
    tokenizer_dir: str | None = None  # GEMMA4_TOKENIZER_DIR: where `gemma4 demo` finds a tokenizer without --tokenizer
    # GEMMA4_CACHE: where `gemma4 demo` keeps the random checkpoints it runs on the CPU ($XDG_CACHE_HOME/gemma4)
    cache_dir: str = dataclasses.field(default_factory=lambda: default_cache_dir(os.environ))

    def __post_init__(self):
        object.__setattr__(self, "defer_norms", frozenset(self.defer_norms))  # any iterable of site names
        if not self.defer_norms <= DEFERRABLE:
            raise ValueError(f"defer_norms: unknown sites {sorted(self.defer_norms - DEFERRABLE)}")
        if self.fuse_projections not in ("auto", True, False):
            raise ValueError(f"fuse_projections must be 'auto', True or False, not {self.fuse_projections!r}")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Options:
        def flag(name: str, default: str) -> bool:  # unset, "" and "0" are off
            return environ.get(name, default) not in ("", "0")

        return cls(kernels=flag("GEMMA4_KERNELS", "1"), pdl=flag("GEMMA4_PDL", "1"),
                   cuda_graphs=not flag("GEMMA4_EAGER", "0"), fp8_activations=flag("GEMMA4_FP8_ACTIVATIONS", "0"),
                   tokenizer_dir=environ.get("GEMMA4_TOKENIZER_DIR") or None,
                   cache_dir=environ.get("GEMMA4_CACHE") or default_cache_dir(environ))


def default_cache_dir(environ: Mapping[str, str]) -> str:
    return os.path.join(environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gemma4")


# The one place the options live. Hot paths (kernels.enabled, once per op) read this attribute directly.
current = Options.from_environ()


def options() -> Options:
    """The options in effect."""
    return current


@contextlib.contextmanager
def override(**fields):
    """The options with `fields` replaced, until the block ends (tests, benchmarks); yields them."""
    global current
    previous, current = current, dataclasses.replace(current, **fields)
    try:
        yield current
    finally:
        current = previous
