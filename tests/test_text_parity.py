"""The text decoder equals transformers 5.24 (fp32, CPU) on tiny configs of every family."""

import pytest
import torch

from gemma4 import Model
from reference import FAMILIES, VOCAB, multimodal_config_dict, reference_logits, reference_model, text_config_dict

TOL = 1e-4


def random_ids(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_pair(request, tmp_path_factory):
    """(family, transformers model, our model loaded from the checkpoint transformers wrote) — text layout."""
    family = request.param
    reference = reference_model(text_config_dict(family))
    path = tmp_path_factory.mktemp(f"hf-{family}")
    reference.save_pretrained(path)
    ours = Model.from_pretrained(path, dtype=torch.float32)
    return family, reference, ours


def assert_close(ours, ref):
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, f"max |dlogit| = {diff}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_logits_long_sequence(family_pair):
    """Longer than twice the sliding window (8): sliding masks, global layers, KV sharing all matter."""
    family, reference, ours = family_pair
    ids = random_ids(2, 29)
    assert_close(ours(ids), reference_logits(reference, ids))


def test_left_padded_batch(family_pair):
    """Left padding: real positions of each row equal the reference's; padded positions are excluded."""
    family, reference, ours = family_pair
    ids = random_ids(3, 21, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :13] = 0
    ids = ids.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = reference_logits(reference, ids, mask, positions)
    got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert_close(got[real], ref[real])
    # Each row equals the same prompt run alone, unpadded.
    for row in range(3):
        alone = ours(ids[row:row + 1, real[row]])
        assert (alone[0] - got[row, real[row]]).abs().max() <= TOL


def test_multimodal_layout(tmp_path):
    """The `gemma4` (Gemma4ForConditionalGeneration) layout: keys under model.language_model."""
    for family in ("E2B", "26B-A4B"):
        reference = reference_model(multimodal_config_dict(family), seed=3)
        reference.save_pretrained(tmp_path / family)
        ours = Model.from_pretrained(tmp_path / family, dtype="float32")
        ids = random_ids(1, 19, seed=2)
        assert_close(ours(ids), reference_logits(reference, ids))


def test_dropped_term_changes_logits(family_pair):
    """The random weights are varied enough for a test to notice a missing term (here: layer_scalar)."""
    family, reference, ours = family_pair
    ids = random_ids(1, 12)
    before = ours(ids)
    layer = ours.text.layers[1]
    saved = layer.layer_scalar.clone()
    layer.layer_scalar.fill_(1.0)
    try:
        assert (ours(ids) - before).abs().max() > 1e-3
    finally:
        layer.layer_scalar.copy_(saved)
