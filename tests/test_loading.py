"""Checkpoint loading and saving in both layouts, both directions, and the errors users meet."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma4 import Model
from gemma4.cli import main as cli_main
from gemma4.loading import CheckpointError
from reference import VOCAB, multimodal_config_dict, reference_logits, reference_model, text_config_dict


def ids_for_test(length=21):
    return torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("layout", ["text", "multimodal"])
def test_ours_written_transformers_loads(tmp_path, layout):
    import transformers

    family = "E2B"
    config = text_config_dict(family) if layout == "text" else multimodal_config_dict(family)
    reference = reference_model(config, seed=7)
    reference.save_pretrained(tmp_path / "hf")
    ours = Model.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ours.save_pretrained(tmp_path / "ours")
    cls = transformers.Gemma4ForCausalLM if layout == "text" else transformers.Gemma4ForConditionalGeneration
    reloaded = cls.from_pretrained(tmp_path / "ours", dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = ids_for_test()
    assert torch.equal(reference_logits(reloaded, ids), reference_logits(reference, ids))
    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == set(load_file(tmp_path / "hf" / "model.safetensors"))


def test_sharded_checkpoint_with_index(tmp_path):
    reference = reference_model(text_config_dict("26B-A4B"), seed=2)
    reference.save_pretrained(tmp_path / "hf")
    ours = Model.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ours.save_pretrained(tmp_path / "sharded", max_shard_bytes=200_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    again = Model.from_pretrained(tmp_path / "sharded", dtype=torch.float32)
    loaded, saved = again.state_dict(), ours.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    # Equal weights, but buffers at other addresses may take other (SIMD-aligned) code paths: last-bit differences.
    ids = ids_for_test()
    torch.testing.assert_close(again(ids), ours(ids), atol=1e-5, rtol=0)


def test_released_checkpoints_with_kv_weights_on_shared_layers(tmp_path):
    """Released E2B/E4B files store k/v projections for KV-shared layers; they are skipped deliberately."""
    reference = reference_model(text_config_dict("E2B"), seed=4)
    reference.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    shared = reference.config.num_hidden_layers - reference.config.num_kv_shared_layers
    for name in ("k_proj", "v_proj"):
        tensors[f"model.layers.{shared}.self_attn.{name}.weight"] = torch.zeros(32, 64)
    tensors[f"model.layers.{shared}.self_attn.k_norm.weight"] = torch.ones(32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = Model.from_pretrained(tmp_path, dtype=torch.float32)
    ids = ids_for_test()
    assert (ours(ids) - reference_logits(reference, ids)).abs().max() <= 1e-4


def test_bf16_load(tmp_path):
    reference = reference_model(text_config_dict("31B"))
    reference.save_pretrained(tmp_path)
    ours = Model.from_pretrained(tmp_path, dtype="bfloat16")
    assert ours.dtype == torch.bfloat16
    logits = ours(ids_for_test())
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("small")
    reference_model(text_config_dict("31B")).save_pretrained(path)
    return path


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        Model.from_pretrained("/nonexistent/gemma")


def test_truncated_safetensors(tmp_path, small_checkpoint):
    (tmp_path / "config.json").write_text((small_checkpoint / "config.json").read_text())
    data = (small_checkpoint / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Model.from_pretrained(tmp_path)


def test_missing_and_unexpected_tensors(tmp_path, small_checkpoint):
    tensors = load_file(small_checkpoint / "model.safetensors")
    (tmp_path / "config.json").write_text((small_checkpoint / "config.json").read_text())
    dropped = dict(tensors)
    dropped.pop("model.layers.1.mlp.up_proj.weight")
    save_file(dropped, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks 1 tensors.*model.layers.1.mlp.up_proj.weight"):
        Model.from_pretrained(tmp_path)
    save_file({**tensors, "model.layers.1.mystery": torch.zeros(2)}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.1.mystery'"):
        Model.from_pretrained(tmp_path)


def test_wrong_shape(tmp_path, small_checkpoint):
    config = json.loads((small_checkpoint / "config.json").read_text())
    config["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((small_checkpoint / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="has shape"):
        Model.from_pretrained(tmp_path)


def test_no_safetensors(tmp_path, small_checkpoint):
    (tmp_path / "config.json").write_text((small_checkpoint / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="not loaded: convert them to safetensors"):
        Model.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype, device, message", [
    (torch.int8, "cpu", "unsupported dtype"),
    ("float64", "cpu", "unsupported dtype"),
    (torch.bfloat16, "cuda", "no CUDA GPU is visible"),
])
def test_dtype_or_device_the_machine_cannot_run(small_checkpoint, dtype, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=message):
        Model.from_pretrained(small_checkpoint, dtype=dtype, device=device)


@pytest.mark.parametrize("preset", ["E2B", "gemma-4-e2b-it"])  # the names Config.preset reads, one resolver
def test_cli_init_writes_a_loadable_random_checkpoint(tmp_path, capsys, preset):
    assert cli_main(["init", "--preset", preset, "--num-layers", "2", "--text-only", "--out", str(tmp_path)]) == 0
    assert "RANDOM-WEIGHT" in capsys.readouterr().out
    model = Model.from_pretrained(tmp_path, dtype="bfloat16")
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (1536, 2, 262144)
    assert model.config.layout == "text"
    assert torch.isfinite(model(torch.tensor([[2, 10, 20]]))).all()
    assert json.loads((tmp_path / "generation_config.json").read_text())["top_k"] == 64


def test_cli_errors_are_one_line(capsys):
    assert cli_main(["init", "--preset", "7B", "--out", "/tmp/x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown preset" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cli_init_on_a_device_the_machine_lacks_is_one_line(tmp_path, capsys):
    assert cli_main(["init", "--preset", "E2B", "--num-layers", "1", "--device", "cuda", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU" in err
