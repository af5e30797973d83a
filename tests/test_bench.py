"""`gemma4 bench` end to end on the CPU with a tiny stand-in for the preset (the real presets are for GPUs): every
figure is measured for both engines, printed as a table and written as JSON; bad arguments are one-line errors."""

import json
import math

import pytest
import torch

from gemma4 import cli
from gemma4.config import Config
from reference import text_config_dict


@pytest.fixture
def tiny_presets(monkeypatch):
    import gemma4.random_init as random_init

    monkeypatch.setattr(random_init, "random_config",
                        lambda preset, num_layers=None, text_only=False: Config.from_dict(text_config_dict("E2B")))


def test_bench_measures_both_engines(tiny_presets, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--device", "cpu", "--preset", "E2B", "--batch", "1", "2", "--context", "12",
                     "--steps", "2", "--repeat", "1", "--concurrency", "2", "--serve-in", "6", "--serve-out", "3",
                     "--prefill", "20", "--prefill-chunk", "8", "--compare", "transformers", "--out", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "| decode tok/s | b2 ctx12 |" in table and "| serving output tok/s | c2 6/3 |" in table
    rows = json.loads(out.read_text())["rows"]
    assert {(r["metric"], r["shape"]) for r in rows} == {
        ("decode tok/s", "b1 ctx12"), ("decode tok/s", "b2 ctx12"), ("serving output tok/s", "c2 6/3"),
        ("prefill tok/s", "20"), ("TTFT s", "20")}
    # Every figure is one clocked span (decode: first token to last within one generation), so always positive.
    assert all(math.isfinite(r["gemma4"]) and math.isfinite(r["transformers"]) for r in rows)
    assert all(r["gemma4"] > 0 and r["transformers"] > 0 for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--preset", "E3B", "--device", "cpu"], "unknown preset"),
    (["--preset", "E2B"] + ([] if not torch.cuda.is_available() else ["--device", "nope"]), ""),
])
def test_bench_bad_arguments_are_one_line_errors(argv, message, capsys):
    code = cli.main(["bench", "--batch", "1", "--concurrency", "0", "--prefill"] + argv)
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("gemma4 bench: error:") and message in err and "Traceback" not in err
