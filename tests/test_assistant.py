"""The drafter (`gemma4_assistant`) against transformers 5.24's Gemma4AssistantForCausalLM, on tiny fp32 configs of
both head kinds: the reference is written in its own file format, loaded by us, and both draft from identical target
K/V, hidden states and embeddings; logits, the projected hidden states and the greedy draft tokens must agree.

The reference runs in a subprocess (tests/assistant_reference.py) with transformers >= 5.24 (5.23 cannot build the
drafter): the installed one (the test extra's 5.24) if it is that new, else the copy in GEMMA4_TF524 (default
/tmp/tf524, from `pip install --no-deps --target /tmp/tf524 transformers==5.24.0`). Without either the parity tests
skip.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemma4.assistant_checkpoint import load_assistant, random_assistant, random_assistant_config, save_assistant
from gemma4.config import Config, ConfigError
from gemma4.model.assistant import AssistantConfig, SharedKV

TESTS = Path(__file__).parent
TF524 = Path(os.environ.get("GEMMA4_TF524", "/tmp/tf524"))
# fp32 on the CPU; the two sides differ only by float rounding (operation order). Measured: max |diff| of the logits
# (magnitude ~2) and of the projected hidden states 1.1e-6 to 8.0e-6 over the 4 chained steps, seeds 0-2, both kinds.
ATOL, RTOL = 2e-5, 1e-5


def reference_env() -> dict | None:
    """The environment for a subprocess whose transformers builds the drafter, or None."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if (major, minor) >= (5, 24):
        return dict(os.environ)
    if (TF524 / "transformers" / "models" / "gemma4_assistant").is_dir():
        path = os.pathsep.join(p for p in (str(TF524), os.environ.get("PYTHONPATH")) if p)
        return {**os.environ, "PYTHONPATH": path}
    return None


needs_reference = pytest.mark.skipif(
    reference_env() is None,
    reason=f"the drafter's reference needs transformers >= 5.24 (installed: {__import__('transformers').__version__}"
           f", no copy at {TF524}); "
           f"pip install --no-deps --target {TF524} transformers==5.24.0")

TEXT = dict(  # the drafter's decoder: 3 query-only layers, sliding, sliding, global
    model_type="gemma4_text", vocab_size=384, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, global_head_dim=64, sliding_window=8,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"], num_kv_shared_layers=3,
    hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=30.0, max_position_embeddings=4096,
    tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1,
)
SPECS = {
    # 26B / 31B-like: dense head tied to the embedding; K=V global layers with one KV head.
    "dense": dict(text_config=dict(TEXT, attention_k_eq_v=True, num_global_key_value_heads=1),
                  assistant=dict(backbone_hidden_size=64, use_ordered_embeddings=False), global_kv_heads=1),
    # E2B / E4B-like: the clustered head, 16 clusters of 24 tokens, the best 4 scored.
    "clustered": dict(text_config=dict(TEXT), global_kv_heads=2,
                      assistant=dict(backbone_hidden_size=64, use_ordered_embeddings=True, num_centroids=16,
                                     centroid_intermediate_top_k=4)),
}
# 20 target keys of the global layer, the last 12 of the sliding one (past the window of 8 + 1); rows left-padded
# by 0, 5 and 15 tokens (the last row has fewer real keys than the window).
COMMON = dict(batch=3, length=20, sliding_length=12, left_padding=[0, 5, 15], global_head_dim=64, steps=4)


def run_reference(kind: str, directory: Path, seed: int = 0, load: Path | None = None) -> dict:
    """The reference's drafts (and, without `load`, its random drafter written to directory / "checkpoint")."""
    spec = {**copy.deepcopy(SPECS[kind]), **COMMON, "seed": seed, **({"load": str(load)} if load else {})}
    (directory / "spec.json").write_text(json.dumps(spec))
    result = subprocess.run([sys.executable, str(TESTS / "assistant_reference.py"), str(directory / "spec.json"),
                             str(directory)], env=reference_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    reference = torch.load(directory / "reference.pt", weights_only=True)
    assert tuple(int(x) for x in reference["version"].split(".")[:2]) >= (5, 24)
    return reference


def key_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Absolute positions of the target's keys (slots of a left-padded row): -1 on padding."""
    return torch.where(attention_mask.bool(), attention_mask.cumsum(-1) - 1, -1)


def draft(model, reference: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our drafting loop on the reference's inputs: (logits, tokens, hidden states) of every step."""
    positions = key_positions(reference["attention_mask"])
    target_kv = {}
    for layer_type, (key, value) in reference["shared_kv"].items():
        target_kv[layer_type] = SharedKV(key, value, positions[:, -key.shape[2]:])  # the sliding K/V: last keys
    token, state = reference["last_token"], reference["hidden"]
    logits, tokens, hiddens = [], [], []
    with torch.no_grad():
        for _ in range(COMMON["steps"]):
            out = model(reference["target_embedding"][token], state, reference["positions"], target_kv)
            token, state = out.logits.argmax(dim=-1), out.hidden
            logits.append(out.logits)
            tokens.append(token)
            hiddens.append(state)
    return torch.cat(logits, 1), torch.cat(tokens, 1), torch.cat(hiddens, 1)


@needs_reference
@pytest.mark.parametrize("kind", list(SPECS))
def test_drafter_matches_reference(kind, tmp_path):
    reference = run_reference(kind, tmp_path)
    model = load_assistant(tmp_path / "checkpoint", dtype=torch.float32, device="cpu")
    assert (model.masked_embedding is not None) == (kind == "clustered")
    logits, tokens, hiddens = draft(model, reference)
    torch.testing.assert_close(logits, reference["logits"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(hiddens, reference["hiddens"], atol=ATOL, rtol=RTOL)
    assert torch.equal(tokens, reference["tokens"])
    if kind == "clustered":  # only the chosen clusters' tokens are scored: the rest share one lower value
        scored = (logits > logits.amin(dim=-1, keepdim=True)).sum(-1)
        assert scored.max() <= 4 * 384 // 16
    # The drafts are not all one token (a constant draft would hide a wrong state carried between steps).
    assert tokens.unique().numel() > 1


@needs_reference
@pytest.mark.parametrize("kind", list(SPECS))
def test_reference_reads_our_random_drafter(kind, tmp_path):
    """A drafter we draw and write (`gemma4 init --assistant`'s path) loads in transformers with every tensor used,
    and drafts as ours does."""
    spec = SPECS[kind]
    config = AssistantConfig.from_dict({"model_type": "gemma4_assistant", "text_config": spec["text_config"],
                                        **spec["assistant"]})
    model = random_assistant(config, torch.float32, seed=5)
    reference = run_reference(kind, tmp_path, load=save_assistant(model, tmp_path / "ours"))
    logits, tokens, hiddens = draft(model, reference)
    torch.testing.assert_close(logits, reference["logits"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(hiddens, reference["hiddens"], atol=ATOL, rtol=RTOL)
    assert torch.equal(tokens, reference["tokens"])


@needs_reference
def test_drafter_round_trips_through_our_writer(tmp_path):
    """Our save_assistant writes what we load back, tensor for tensor (the released layout both ways)."""
    run_reference("clustered", tmp_path)
    model = load_assistant(tmp_path / "checkpoint", dtype=torch.float32, device="cpu")
    again = load_assistant(save_assistant(model, tmp_path / "ours"), device="cpu")
    assert again.config.to_dict()["text_config"] == model.config.to_dict()["text_config"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


@pytest.mark.parametrize("preset", ["E2B", "31B"])
def test_random_drafter_fits_its_target(preset, tmp_path):
    """`gemma4 init --assistant`: the drafter's attention reads the target's last sliding and global K/V shapes."""
    target = Config.preset(preset).text_config
    config = random_assistant_config(preset, num_layers=2)
    text = config.text_config
    assert config.backbone_hidden_size == target.hidden_size
    assert config.use_ordered_embeddings == (preset == "E2B")
    assert text.kv_sharing_modes == ["reuse"] * 2 and text.layer_types == ["sliding_attention", "full_attention"]
    for layer_type in ("sliding_attention", "full_attention"):
        ours, theirs = text.layer_types.index(layer_type), target.layer_types.index(layer_type)
        assert text.layer_head_dims[ours] == target.layer_head_dims[theirs]
        assert text.layer_num_kv_heads[ours] == target.layer_num_kv_heads[theirs]
    subprocess.run([sys.executable, "-m", "gemma4.cli", "init", "--preset", preset, "--assistant", "--num-layers",
                    "2", "--dtype", "fp32", "--out", str(tmp_path)], check=True, capture_output=True)
    model = load_assistant(tmp_path, device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    if model.masked_embedding is not None:  # a clustering of the whole vocabulary
        assert torch.equal(model.masked_embedding.token_ordering.sort().values, torch.arange(target.vocab_size))
    # One drafting step on the target's K/V shapes runs and scores the whole vocabulary.
    kv = {t: SharedKV(torch.randn(1, target.layer_num_kv_heads[i], 5, target.layer_head_dims[i]),
                      torch.randn(1, target.layer_num_kv_heads[i], 5, target.layer_head_dims[i]),
                      torch.arange(5)[None])
          for t in ("sliding_attention", "full_attention") for i in [target.layer_types.index(t)]}
    embeds = torch.randn(1, 1, target.hidden_size)
    out = model(embeds, embeds, torch.tensor([[4]]), kv)
    assert out.logits.shape == (1, 1, target.vocab_size) and out.hidden.shape == (1, 1, target.hidden_size)
    assert torch.isfinite(out.logits).all()


def test_config_rejects_a_partly_shared_drafter():
    data = {"model_type": "gemma4_assistant", "text_config": dict(TEXT, num_kv_shared_layers=2)}
    with pytest.raises(ConfigError, match="num_kv_shared_layers"):
        AssistantConfig.from_dict(data)
    # Left at 0, it means all layers (the reference fills it in).
    config = AssistantConfig.from_dict({**data, "text_config": dict(TEXT, num_kv_shared_layers=0)})
    assert config.text_config.num_kv_shared_layers == 3

