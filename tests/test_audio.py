"""Audio tower + embed_audio parity against transformers 5.24 on tiny random configs."""

from __future__ import annotations

import pytest
import torch

from gemma4.config import AudioConfig, TextConfig
from gemma4.model.audio import AudioTower, audio_features
from gemma4.model.common import MultimodalEmbedder

from test_vision import randomize

transformers = pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.gemma4.modeling_gemma4")

TEXT_HIDDEN = 24
# subsampling_conv_channels[0] must stay 128 (= mel bins): the checkpoint's projection width assumes it.
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, subsampling_conv_channels=[128, 4],
            conv_kernel_size=5, attention_chunk_size=12, attention_context_left=13, attention_context_right=0,
            attention_logit_cap=50.0, output_proj_dims=40, use_clipped_linears=True, residual_weight=0.5)
GEOMETRIES = {
    "released": {},
    "small-chunks-with-lookahead": dict(attention_chunk_size=4, attention_context_left=6, attention_context_right=2),
    "no-clips-low-cap": dict(use_clipped_linears=False, attention_logit_cap=3.0, hidden_act="gelu_pytorch_tanh"),
}


def build_pair(overrides: dict, seed: int = 0):
    cfg = dict(TINY, **overrides, model_type="gemma4_audio")
    ref_cfg = transformers.Gemma4AudioConfig(**cfg)
    ref_cfg._attn_implementation = "eager"
    ref_tower = transformers.Gemma4AudioModel(ref_cfg).eval()
    ref_embed = modeling.Gemma4MultimodalEmbedder(ref_cfg, transformers.Gemma4TextConfig(hidden_size=TEXT_HIDDEN))
    randomize(ref_tower, seed)
    randomize(ref_embed.eval(), seed + 1)
    ours_cfg = AudioConfig.from_dict(cfg)
    tower = AudioTower(ours_cfg).eval()
    embed = MultimodalEmbedder(ours_cfg, TextConfig(hidden_size=TEXT_HIDDEN)).eval()
    for mine, ref in ((tower, ref_tower), (embed, ref_embed)):
        assert list(mine.state_dict()) == list(ref.state_dict())
        mine.load_state_dict(ref.state_dict(), strict=True)
    return ref_tower, ref_embed, tower, embed


def features(lengths, total, seed=0):
    """Log-mel-like features for clips of `lengths` frames padded to `total`; padded frames are zero, as the
    feature extractor leaves them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), total, 128, generator=g) * 2 - 3
    mask = torch.arange(total)[None] < torch.tensor(lengths)[:, None]
    return x * mask[..., None], mask


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_tower_matches_reference(geometry):
    ref_tower, ref_embed, tower, embed = build_pair(GEOMETRIES[geometry])
    x, mask = features([150, 97, 9], total=150)
    with torch.no_grad():
        ref = ref_tower(x, mask, return_dict=True)
        ours, valid = tower(x, mask)
        assert torch.equal(valid, ref.attention_mask.bool())
        assert valid.sum(-1).tolist() == [38, 25, 3]
        # Padding positions carry no meaning (the reference drops them too); compare the real ones.
        assert ours.shape == ref.last_hidden_state.shape
        assert (ours[valid] - ref.last_hidden_state[valid]).abs().max().item() <= 1e-4

        ref_tokens = ref_embed(ref.last_hidden_state)[ref.attention_mask.bool()]  # what Gemma4Model.forward keeps
        mine = audio_features(tower, embed, x, mask)
        assert [t.shape for t in mine] == [(38, TEXT_HIDDEN), (25, TEXT_HIDDEN), (3, TEXT_HIDDEN)]
        assert (torch.cat(mine) - ref_tokens).abs().max().item() <= 1e-4


def test_unpadded_single_clip_and_padding_independence():
    ref_tower, _, tower, _ = build_pair({}, seed=4)
    x, mask = features([61], total=61, seed=2)
    with torch.no_grad():
        ref = ref_tower(x, mask, return_dict=True).last_hidden_state
        alone, valid = tower(x, mask)
        assert valid.all() and (alone - ref).abs().max().item() <= 1e-4
        padded_x, padded_mask = torch.cat([x, torch.zeros(1, 40, 128)], 1), torch.cat(
            [mask, torch.zeros(1, 40, dtype=torch.bool)], 1)
        padded, padded_valid = tower(padded_x, padded_mask)
    assert (padded[padded_valid] - alone[0]).abs().max().item() <= 1e-4


def test_clips_and_logit_cap_matter():
    _, _, tower, _ = build_pair({}, seed=1)
    x, mask = features([80], total=80)
    with torch.no_grad():
        base, _ = tower(x, mask)
        for m in tower.modules():
            if getattr(m, "clip", None) is True:
                m.input_min.fill_(-float("inf")), m.input_max.fill_(float("inf"))
                m.output_min.fill_(-float("inf")), m.output_max.fill_(float("inf"))
        assert (tower(x, mask)[0] - base).abs().max() > 1e-2


def test_processed_audio_end_to_end():
    """Feature-extractor output through both towers; the kept tokens equal the processor's per-clip counts."""
    import numpy as np

    from gemma4.processing.audio import process_audio

    ref_tower, ref_embed, tower, embed = build_pair({}, seed=9)
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (4_000, 9_999)]
    batch = process_audio(clips, sampling_rate=16_000)
    with torch.no_grad():
        ref = ref_tower(batch.input_features, batch.input_features_mask, return_dict=True)
        ref_tokens = ref_embed(ref.last_hidden_state)[ref.attention_mask.bool()]
        mine = audio_features(tower, embed, batch.input_features, batch.input_features_mask)
    assert [t.shape[0] for t in mine] == batch.num_soft_tokens == [6, 16]
    assert (torch.cat(mine) - ref_tokens).abs().max().item() <= 1e-4
