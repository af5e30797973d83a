"""Vision tower + embed_vision parity against transformers 5.24 on tiny random configs of both tower widths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma4.config import TextConfig, VisionConfig
from gemma4.model.common import MultimodalEmbedder
from gemma4.model.vision import VisionTower, image_features

transformers = pytest.importorskip("transformers")

# E2B-like: clipped linears, no standardisation. 26B-like: standardize, grouped KV heads, no clips.
TOWERS = {
    "E2B": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, head_dim=16, position_embedding_size=64, use_clipped_linears=True,
                standardize=False),
    "26B": dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=12, position_embedding_size=64, use_clipped_linears=False,
                standardize=True),
}
TEXT_HIDDEN = 24


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter and buffer varied values so that any dropped term changes the output.

    Clip bounds get finite values near the activations' scale so that clipping really happens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("input_min", "output_min"):
                t.fill_(-(0.5 + torch.rand((), generator=g).item()))
            elif leaf in ("input_max", "output_max"):
                t.fill_(0.5 + torch.rand((), generator=g).item())
            elif leaf in ("inv_freq", "original_inv_freq", "inv_timescales", "softcap"):
                continue  # derived constants, not checkpoint state
            elif leaf == "std_scale" or (leaf == "weight" and "norm" in name):
                t.copy_(1.0 + 0.3 * torch.randn(t.shape, generator=g))
            elif leaf == "weight" and t.ndim == 2:
                t.copy_(torch.randn(t.shape, generator=g) / t.shape[1] ** 0.5)
            else:
                t.copy_(0.5 * torch.randn(t.shape, generator=g))


def build_pair(kind: str, seed: int = 0):
    cfg = dict(TOWERS[kind], model_type="gemma4_vision")
    ref_cfg = transformers.Gemma4VisionConfig(**cfg)
    ref_cfg._attn_implementation = "eager"
    text_cfg = transformers.Gemma4TextConfig(hidden_size=TEXT_HIDDEN)
    ref_tower = transformers.Gemma4VisionModel(ref_cfg).eval()
    ref_embed = transformers.models.gemma4.modeling_gemma4.Gemma4MultimodalEmbedder(ref_cfg, text_cfg).eval()
    randomize(ref_tower, seed)
    randomize(ref_embed, seed + 1)

    ours_cfg = VisionConfig.from_dict(cfg)
    tower = VisionTower(ours_cfg).eval()
    embed = MultimodalEmbedder(ours_cfg, TextConfig(hidden_size=TEXT_HIDDEN)).eval()
    for mine, ref in ((tower, ref_tower), (embed, ref_embed)):
        ref_state = ref.state_dict()
        assert set(mine.state_dict()) == set(ref_state)
        mine.load_state_dict(ref_state, strict=True)
    return ref_tower, ref_embed, tower, embed


def patch_batch(grids, max_soft_tokens, seed=0, k=3, patch=16):
    """Processor-shaped inputs for patch grids [(W, H), ...]: random pixels, row-major positions, -1 padding."""
    rng = np.random.default_rng(seed)
    p = max_soft_tokens * k * k
    pixels = np.zeros((len(grids), p, 3 * patch * patch), np.float32)
    pos = np.full((len(grids), p, 2), -1, np.int64)
    for i, (w, h) in enumerate(grids):
        n = w * h
        pixels[i, :n] = rng.random((n, 3 * patch * patch))
        xs, ys = np.meshgrid(np.arange(w), np.arange(h), indexing="xy")
        pos[i, :n] = np.stack([xs, ys], -1).reshape(n, 2)
    return torch.from_numpy(pixels), torch.from_numpy(pos)


@pytest.mark.parametrize("kind", list(TOWERS))
def test_state_dict_keys_match_checkpoint_layout(kind):
    cfg = dict(TOWERS[kind], model_type="gemma4_vision")
    ref = transformers.Gemma4VisionModel(transformers.Gemma4VisionConfig(**cfg))
    mine = VisionTower(VisionConfig.from_dict(cfg))
    assert list(mine.state_dict()) == list(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert mine.state_dict()[key].shape == value.shape, key


@pytest.mark.parametrize("kind", list(TOWERS))
def test_tower_and_embedder_match_reference(kind):
    ref_tower, ref_embed, tower, embed = build_pair(kind)
    # Very wide, square and tall grids, padded to a 12-token budget (P = 108 patches).
    pixels, pos = patch_batch([(18, 3), (6, 6), (3, 12)], max_soft_tokens=12)
    with torch.no_grad():
        ref_hidden = ref_tower(pixel_values=pixels, pixel_position_ids=pos).last_hidden_state
        ours = tower(pixels, pos)
        assert ours.shape == ref_hidden.shape == (6 + 4 + 4, TOWERS[kind]["hidden_size"])
        assert (ours - ref_hidden).abs().max().item() <= 1e-4

        ref_split = torch.split(ref_embed(ref_hidden), [6, 4, 4])
        mine_split = image_features(tower, embed, pixels, pos)
        assert [t.shape[0] for t in mine_split] == [6, 4, 4]
        for a, b in zip(mine_split, ref_split):
            assert a.shape == (b.shape[0], TEXT_HIDDEN)
            assert (a - b).abs().max().item() <= 1e-4


def test_matches_reference_get_image_features_split():
    """Cross-check the per-image split against Gemma4Model.get_image_features on a tiny full model."""
    ref_tower, ref_embed, tower, embed = build_pair("E2B", seed=3)
    pixels, pos = patch_batch([(9, 3), (3, 3)], max_soft_tokens=4, seed=5)

    class Holder(torch.nn.Module):  # just enough of Gemma4Model for its unbound get_image_features
        def __init__(self):
            super().__init__()
            self.vision_tower, self.embed_vision = ref_tower, ref_embed
            self.config = type("C", (), {"vision_config": ref_tower.config})()

    get = transformers.models.gemma4.modeling_gemma4.Gemma4Model.get_image_features
    with torch.no_grad():
        ref = get.__wrapped__(Holder(), pixels, pos).pooler_output if hasattr(get, "__wrapped__") else None
        if ref is None:
            pytest.skip("get_image_features is not unwrappable in this transformers build")
        mine = image_features(tower, embed, pixels, pos)
    assert [t.shape[0] for t in ref] == [t.shape[0] for t in mine] == [3, 1]
    for a, b in zip(mine, ref):
        assert (a - b).abs().max().item() <= 1e-4


def test_clipping_and_standardisation_matter():
    """The random test state must exercise the clip bounds and std_bias/std_scale (else parity proves little)."""
    _, _, tower, _ = build_pair("E2B")
    pixels, pos = patch_batch([(6, 3)], max_soft_tokens=2)
    with torch.no_grad():
        clipped = tower(pixels, pos)
        for m in tower.modules():
            if getattr(m, "clip", False):
                for name in ("input_min", "output_min"):
                    getattr(m, name).fill_(-float("inf"))
                for name in ("input_max", "output_max"):
                    getattr(m, name).fill_(float("inf"))
        assert (tower(pixels, pos) - clipped).abs().max() > 1e-2

    _, _, tower, _ = build_pair("26B")
    with torch.no_grad():
        standardized = tower(pixels, pos)
        tower.std_bias.zero_()
        tower.std_scale.fill_(1.0)
        assert (tower(pixels, pos) - standardized).abs().max() > 1e-2


def test_padding_does_not_change_an_image_tokens():
    """An image's soft tokens do not depend on the batch it is padded into."""
    _, _, tower, _ = build_pair("26B", seed=7)
    pixels, pos = patch_batch([(6, 3), (3, 12)], max_soft_tokens=12, seed=1)
    with torch.no_grad():
        batched = tower(pixels, pos)[:2]
        alone = tower(pixels[:1, :18], pos[:1, :18])
    assert (batched - alone).abs().max().item() <= 1e-4


def test_processed_images_end_to_end():
    """Real processor output (two budgets' worth of shapes) through both towers."""
    from PIL import Image

    from gemma4.processing.image import process_images

    ref_tower, ref_embed, tower, embed = build_pair("26B", seed=11)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((60, 200), (90, 90))]
    batch = process_images(images, max_soft_tokens=70)
    with torch.no_grad():
        ref = ref_embed(ref_tower(pixel_values=batch.pixel_values,
                                  pixel_position_ids=batch.pixel_position_ids).last_hidden_state)
        mine = image_features(tower, embed, batch.pixel_values, batch.pixel_position_ids)
    assert [t.shape[0] for t in mine] == batch.num_soft_tokens
    assert (torch.cat(mine) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("preset", ["E2B", "E4B", "26B-A4B", "31B"])
def test_official_configs_give_checkpoint_keys_and_shapes(preset):
    """Towers and embedders built from the released configs have exactly the keys and shapes that
    Gemma4ForConditionalGeneration stores under model.vision_tower. / embed_vision. / audio_tower. / embed_audio."""
    import json
    from pathlib import Path

    from gemma4.config import Config
    from gemma4.model.audio import AudioTower

    path = Path("/work/shared/configs") / preset / "config.json"
    if not path.is_file():
        pytest.skip("official configs not available")
    raw = json.loads(path.read_text())
    with torch.device("meta"):
        ref = transformers.Gemma4ForConditionalGeneration(transformers.Gemma4Config(**raw))
        ours_cfg = Config.from_dict(raw)
        parts = {"model.vision_tower.": VisionTower(ours_cfg.vision_config),
                 "model.embed_vision.": MultimodalEmbedder(ours_cfg.vision_config, ours_cfg.text_config)}
        if ours_cfg.audio_config is not None:
            parts["model.audio_tower."] = AudioTower(ours_cfg.audio_config)
            parts["model.embed_audio."] = MultimodalEmbedder(ours_cfg.audio_config, ours_cfg.text_config)
    ref_state = ref.state_dict()
    assert ("model.audio_tower." in parts) == any(k.startswith("model.audio_tower.") for k in ref_state)
    for prefix, module in parts.items():
        expected = {k[len(prefix):]: v.shape for k, v in ref_state.items() if k.startswith(prefix)}
        assert {k: v.shape for k, v in module.state_dict().items()} == expected, prefix
