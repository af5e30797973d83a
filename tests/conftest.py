import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests import their shared helpers (reference.py)


# ---- BEGIN gemma4_tokenizer_dir fixture (chat/tokenizer tests) ----
import os as _os

import pytest as _pytest


@_pytest.fixture(scope="session")
def gemma4_tokenizer_dir() -> Path:
    """The Gemma 4 tokenizer files: $GEMMA4_TOKENIZER_DIR, else <repo>/../shared/tokenizer; skips if absent."""
    env = _os.environ.get("GEMMA4_TOKENIZER_DIR")
    directory = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "tokenizer"
    if not (directory / "tokenizer.json").is_file():
        _pytest.skip(f"Gemma 4 tokenizer files not found in {directory} (set GEMMA4_TOKENIZER_DIR)")
    return directory
# ---- END gemma4_tokenizer_dir fixture ----


@_pytest.fixture(scope="session")
def short_text_config():
    """family -> a tiny text config of tests/reference.py on the fewest layers that keep the family's switches: a
    sliding then a global layer and, on families with KV sharing, one shared layer of each type after them (whose MLP
    is double-wide on E2B). For tests that run the whole model through Triton's interpreter, whose time grows with
    the layers."""
    from reference import FAMILIES

    def config(family: str) -> dict:
        shared = 2 if FAMILIES[family]["num_kv_shared_layers"] else 0
        return dict(FAMILIES[family], num_hidden_layers=2 + shared, num_kv_shared_layers=shared,
                    layer_types=["sliding_attention", "full_attention"] * (1 + shared // 2))

    return config


# Without a GPU, Triton kernels run in Triton's CPU interpreter; the variable must be set before Triton is imported.
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow (longer fuzzing)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = _pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
