"""End-to-end multimodal parity against transformers 5.24's Gemma4ForConditionalGeneration on tiny random models
(E2B-like: clipped vision tower + audio tower; 26B-like: standardized vision tower, MoE, bidirectional vision mask),
plus gemma4.Processor against transformers' processor pieces, and the error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import gemma4
from gemma4 import kernels
from gemma4.model.multimodal import vision_blocks
from gemma4.processing.audio import process_audio
from gemma4.processing.image import process_images
from gemma4.processing.video import expand_prompt

from reference import VOCAB, reference_model
from test_audio import TINY as AUDIO_TINY
from test_vision import TOWERS

transformers = pytest.importorskip("transformers")

# Multimodal token ids inside the tiny vocabulary (text tokens are drawn below TEXT_MAX).
IDS = dict(boi_token_id=370, eoi_token_id=371, image_token_id=372, video_token_id=373, boa_token_id=374,
           eoa_token_index=375, audio_token_id=376)
BOI, EOI, IMG, BOA, EOA, AUD = 370, 371, 372, 374, 375, 376
TEXT_MAX = 360
EOS = [1, 106]


def config_dict(kind: str, text_config) -> dict:
    """The E2B-like or 26B-like model: text_config(family) (a text config dict) with the towers."""
    if kind == "E2B":
        text, vision, audio = text_config("E2B"), dict(TOWERS["E2B"]), dict(AUDIO_TINY)
    else:
        text, vision, audio = text_config("26B-A4B"), dict(TOWERS["26B"]), None
    vision["model_type"] = "gemma4_vision"
    if audio is not None:
        audio["model_type"] = "gemma4_audio"
    return {"model_type": "gemma4", "text_config": text, "vision_config": vision, "audio_config": audio,
            "eos_token_id": EOS, **IDS}


@pytest.fixture(scope="module", params=["E2B", "26B"])
def pair(request, tmp_path_factory, short_text_config):
    """(kind, the reference, ours) on the text model's shortest layer stack (conftest.short_text_config): the text
    layers only repeat, and the prefill kernel's test runs them in Triton's interpreter."""
    kind = request.param
    ref = reference_model(config_dict(kind, short_text_config), seed=3)
    if ref.model.audio_tower is not None:  # the reference audio tower's SDPA path rejects boolean masks
        ref.model.audio_tower.config._attn_implementation = "eager"
    directory = tmp_path_factory.mktemp(f"mm-{kind}")
    ref.save_pretrained(directory)
    ours = gemma4.Model.from_pretrained(directory, dtype=torch.float32)
    return kind, ref, ours


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / width, 255 * y / height, 128 + 90 * np.sin(x / 5 + y / 9)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def waveform(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16_000 * seconds)) / 16_000
    return (0.3 * np.sin(2 * np.pi * 220 * t * (1 + 0.3 * t)) + 0.02 * rng.standard_normal(t.shape)).astype(
        np.float32)


def text(n: int, rng) -> list[int]:
    return rng.integers(3, TEXT_MAX, n).tolist()


def two_image_row(kind: str, images, rng, seed: int) -> tuple[list[int], dict]:
    """text, image, text, image, text[, audio clip (E2B)], text: the ids for the first two of `images` (processor
    outputs), and the row's media (the images' pixels, the clip's features)."""
    a, b = images.num_soft_tokens[:2]
    row = [2, *text(5, rng), BOI, *[IMG] * a, EOI, *text(4, rng), BOI, *[IMG] * b, EOI, *text(3, rng)]
    media = dict(pixel_values=images.pixel_values, image_position_ids=images.pixel_position_ids)
    if kind == "E2B":
        clip = process_audio([waveform(0.45, seed)], sampling_rate=16_000)
        row += [BOA, *[AUD] * clip.num_soft_tokens[0], EOA, *text(3, rng)]
        media.update(input_features=clip.input_features, input_features_mask=clip.input_features_mask)
    return row, media


def build_inputs(kind: str, seed: int = 0) -> dict:
    """A batch of two left-padded prompts mixing text and images (and, for E2B, an audio clip in row 0).

    Row 0: text, image A, text, image B, text[, audio], text. Row 1 (shorter): text, image C, text."""
    rng = np.random.default_rng(seed)
    images = process_images([random_image(64, 120, seed), random_image(90, 60, seed + 1),
                             random_image(50, 50, seed + 2)], max_soft_tokens=70)
    row0, media = two_image_row(kind, images, rng, seed)
    row1 = [2, *text(3, rng), BOI, *[IMG] * images.num_soft_tokens[2], EOI, *text(6, rng)]
    width = max(len(row0), len(row1))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for r, row in enumerate((row0, row1)):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    type_ids = (ids == IMG).long() + 3 * (ids == AUD).long()
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=type_ids, **media)


def test_loads_every_tower_weight(pair):
    kind, ref, ours = pair
    assert set(ours.state_dict()) == set(ref.state_dict()) - {"lm_head.weight"}
    assert (ours.model.audio_tower is not None) == (kind == "E2B")


def positions(inputs) -> torch.Tensor:
    """Position ids counting real tokens only (what gemma4 and transformers' generate use); the reference's plain
    forward would otherwise number left padding too."""
    return (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)


def reference_tower_outputs(ref, inputs):
    """The reference's per-item soft tokens, as gemma4's image_features / audio_features return them."""
    with torch.no_grad():
        images = list(ref.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"]).pooler_output)
        clips = None
        if "input_features" in inputs:
            out = ref.model.get_audio_features(inputs["input_features"], inputs["input_features_mask"])
            clips = [out.pooler_output[i][out.attention_mask[i]] for i in range(len(out.pooler_output))]
    return images, clips


def test_logits_match_reference(pair):
    kind, ref, ours = pair
    inputs = build_inputs(kind)
    assert inputs["input_ids"].shape[1] > 8 * ours.config.text_config.sliding_window  # images span many windows
    with torch.no_grad():
        expected = ref(**inputs, position_ids=positions(inputs), use_cache=False).logits
        got = ours(**inputs)
    valid = inputs["attention_mask"].bool()
    assert (got[valid] - expected[valid]).abs().max().item() <= 1e-4

    # The towers on their own (a failure above that starts here shows up here first).
    import gemma4.model.multimodal as multimodal
    images, clips = reference_tower_outputs(ref, inputs)
    ours_images = multimodal.image_features(ours.model.vision_tower, ours.model.embed_vision,
                                            inputs["pixel_values"], inputs["image_position_ids"])
    assert max((a - b).abs().max().item() for a, b in zip(images, ours_images)) < 1e-5
    if clips is not None:
        ours_clips = multimodal.audio_features(ours.model.audio_tower, ours.model.embed_audio,
                                               inputs["input_features"], inputs["input_features_mask"])
        assert max((a - b).abs().max().item() for a, b in zip(clips, ours_clips)) < 1e-5

    if kind == "26B":
        # The bidirectional vision mask matters: without it (no mm_token_type_ids) the reference differs.
        with torch.no_grad():
            causal = ref(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"},
                         position_ids=positions(inputs), use_cache=False).logits
        assert (causal[valid] - expected[valid]).abs().max().item() > 1e-2


def test_cached_prefill_matches_full_forward(pair):
    kind, _, ours = pair
    inputs = build_inputs(kind, seed=1)
    with torch.no_grad():
        full = ours(**inputs)[:, -1]
        cache = ours.make_cache(2, inputs["input_ids"].shape[1] + 4)
        cached = ours(**inputs, cache=cache, last_only=True)[:, -1]
    assert (full - cached).abs().max().item() < 1e-3  # float noise of another summation order, amplified


def test_prefill_kernel_applies_image_blocks(pair, monkeypatch):
    """The flash prefill kernel (Triton's interpreter on the CPU) with bidirectional image blocks, cache-free and over
    a cache: equal to the reference. Only the 26B-like model, whose logits show that the blocks matter (above); only
    the attention kernel is switched on (the other kernels in the interpreter would take minutes)."""
    pytest.importorskip("triton")
    from gemma4.model.attention import ForwardContext

    kind, ref, ours = pair
    if kind != "26B":
        pytest.skip("the 26B-like model covers the rule")
    post_init = ForwardContext.__post_init__

    def with_prefill_kernel(ctx):
        post_init(ctx)
        ctx.prefill_kernel = not ctx.decode_kernel

    monkeypatch.setattr(ForwardContext, "__post_init__", with_prefill_kernel)
    inputs = build_inputs(kind, seed=2)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = ref(**inputs, position_ids=positions(inputs), use_cache=False).logits
        full = ours(**inputs)
        cache = ours.make_cache(2, inputs["input_ids"].shape[1] + 4)
        cached = ours(**inputs, cache=cache, last_only=True)[:, -1]
    assert (full[valid] - expected[valid]).abs().max().item() <= 1e-4
    assert (cached - expected[:, -1]).abs().max().item() < 1e-3


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_matches_reference(pair, use_cache):
    kind, ref, ours = pair
    if not use_cache and kind == "E2B":
        pytest.skip("the naive path is checked on one model (it re-runs the towers every step)")
    inputs = build_inputs(kind, seed=2)  # E2B, row 1: the model generates a <|video|> id, read as pad (as reference)
    steps = 16 if use_cache else 6  # the naive path re-runs the towers and the whole prompt every step
    with torch.no_grad():
        expected = ref.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    ours_inputs = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    got = ours.generate(**ours_inputs, max_new_tokens=steps, do_sample=False, eos_token_id=EOS, pad_token_id=0,
                        use_cache=use_cache)
    assert got.tolist() == expected.tolist()


def test_placeholders_without_media_read_as_pad(pair):
    """A placeholder id with no media (e.g. one the model generated) embeds as the pad token, as in the reference;
    also through the embedding kernel (placeholder padding and lookup in one launch, Triton's interpreter here), whose
    fused norms and RoPE sum in another order (1e-4, as tests/test_kernels_model.py)."""
    _, ref, ours = pair
    ids = torch.tensor([[2, 40, IMG, 41, AUD, 42, 373, 43]])
    with torch.no_grad():
        expected = ref(input_ids=ids, use_cache=False).logits
        got = ours(ids)
        with kernels.force():
            fused = ours(ids)
    assert (got - expected).abs().max().item() < 1e-5
    assert (fused - expected).abs().max().item() < 1e-4


def test_vision_blocks_are_runs_of_image_tokens():
    is_vision = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert vision_blocks(is_vision).tolist() == [[0, 1, 1, 0, 0, 2, 0, 3, 3, 3], [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]]


# --- errors ------------------------------------------------------------------------------------------------------

def test_more_image_placeholders_than_images(pair):
    kind, _, ours = pair
    inputs = build_inputs(kind)
    one_image = {**inputs, "pixel_values": inputs["pixel_values"][:2], "image_position_ids":
                 inputs["image_position_ids"][:2]}
    one_image.pop("mm_token_type_ids")
    with pytest.raises(ValueError, match=r"<\|image\|> placeholder tokens but the images give"):
        ours(**one_image)


def test_audio_to_a_model_without_audio_tower(pair):
    kind, _, ours = pair
    if kind != "26B":
        pytest.skip("the E2B-like model has an audio tower")
    inputs = build_inputs("E2B")
    inputs["input_ids"] = inputs["input_ids"].clamp(max=VOCAB - 1)
    with pytest.raises(ValueError, match="no audio tower"):
        ours(**inputs)


def test_unknown_media_argument(pair):
    _, _, ours = pair
    with pytest.raises(TypeError, match="pixel_value"):
        ours(torch.tensor([[2, 5, 6]]), pixel_value=torch.zeros(1))


# --- processor ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def processors(gemma4_tokenizer_dir):
    pil = pytest.importorskip("transformers.models.gemma4.image_processing_pil_gemma4")
    fe = pytest.importorskip("transformers.models.gemma4.feature_extraction_gemma4")
    ours = gemma4.Processor.from_pretrained(gemma4_tokenizer_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(gemma4_tokenizer_dir))
    return ours, hf_tok, pil.Gemma4ImageProcessorPil(), fe.Gemma4AudioFeatureExtractor()


def test_processor_matches_transformers_pieces(processors):
    ours, hf_tok, hf_image, hf_audio = processors
    images = [random_image(300, 200, 1), random_image(120, 480, 2), random_image(64, 64, 3)]
    clips = [waveform(1.3, 1), waveform(0.7, 2)]
    texts = ["Describe <|image|> and <|image|>, then transcribe <|audio|>.",
             "What is in <|image|>? And <|audio|>?"]
    out = ours(text=texts, images=images, audio=clips, max_soft_tokens=140, sampling_rate=16_000)

    ref_images = hf_image(images, max_soft_tokens=140, return_tensors="pt")
    assert torch.equal(out["image_position_ids"], ref_images["image_position_ids"])
    assert (out["pixel_values"] - ref_images["pixel_values"]).abs().max().item() <= 1e-6
    ref_audio = hf_audio(clips, return_tensors="pt")
    assert torch.equal(out["input_features_mask"], ref_audio["input_features_mask"])
    assert (out["input_features"] - ref_audio["input_features"]).abs().max().item() <= 1e-4

    # Transformers' processor: expand placeholders, tokenize with padding (left), then mm_token_type_ids.
    n_img = [int(n) for n in ref_images["num_soft_tokens_per_image"]]
    n_aud = [int(m.reshape(-1)[::4].sum()) for m in ref_audio["input_features_mask"]]  # two stride-2 subsamplings
    expanded = [expand_prompt(texts[0], n_img[:2], n_aud[:1])[0],
                expand_prompt(texts[1], n_img[2:], n_aud[1:])[0]]
    ref_text = hf_tok(expanded, padding=True, return_tensors="pt")
    assert hf_tok.padding_side == "left"
    assert torch.equal(out["input_ids"], ref_text["input_ids"])
    assert torch.equal(out["attention_mask"], ref_text["attention_mask"])
    ids = ref_text["input_ids"]
    type_ids = ((ids == hf_tok.convert_tokens_to_ids("<|image|>")).long()
                + 3 * (ids == hf_tok.convert_tokens_to_ids("<|audio|>")).long())
    assert torch.equal(out["mm_token_type_ids"], type_ids)
    assert set(out) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_position_ids",
                        "input_features", "input_features_mask"}


def test_processor_chat_prompt_and_errors(processors):
    ours, hf_tok, _, _ = processors
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = ours.apply_chat_template(messages)
    assert prompt.count("<|image|>") == 1 and prompt.startswith("<bos>")
    out = ours(text=prompt, images=[random_image(80, 80, 0)], max_soft_tokens=70)
    assert out["input_ids"][0].tolist().count(hf_tok.bos_token_id) == 1  # the template's <bos>, no second one
    assert int((out["input_ids"] == hf_tok.convert_tokens_to_ids("<|image|>")).sum()) == \
        process_images([random_image(80, 80, 0)], max_soft_tokens=70).num_soft_tokens[0]
    with pytest.raises(ValueError, match=r"2 <\|image\|> placeholders but 1 images"):
        ours(text="<|image|> <|image|>", images=[random_image(80, 80, 0)], max_soft_tokens=70)
    with pytest.raises(ValueError, match=r"1 <\|audio\|> placeholders but 0 audio"):
        ours(text="<|audio|>", audio=[])


def test_processor_output_drives_the_model(processors, pair):
    """Processor output goes straight into model(**inputs) and model.generate(**inputs) (vocab remapped to tiny)."""
    ours_proc, hf_tok, _, _ = processors
    kind, ref, model = pair
    out = ours_proc(text=["A <|image|> B", "<|image|> C <|image|> D"],
                    images=[random_image(60, 60, i) for i in range(3)], max_soft_tokens=70)
    ids = out["input_ids"]
    remap = {hf_tok.convert_tokens_to_ids(t): i for t, i in (("<|image|>", IMG), ("<|image>", BOI),
                                                                ("<image|>", EOI))}
    tiny = ids % TEXT_MAX
    for big, small in remap.items():
        tiny[ids == big] = small
    tiny[out["attention_mask"] == 0] = 0
    inputs = {**out, "input_ids": tiny}
    with torch.no_grad():
        expected = ref(**inputs, position_ids=positions(inputs), use_cache=False).logits
        got = model(**inputs)
    valid = inputs["attention_mask"].bool()
    assert (got[valid] - expected[valid]).abs().max().item() <= 1e-4
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    assert generated.shape == (2, ids.shape[1] + 3)


def test_more_images_than_fit_the_context(pair):
    """Four images at the largest budget (1,120 soft tokens each) overflow the tiny model's 4,096-token context:
    a clear error before any tower runs."""
    _, _, ours = pair
    images = process_images([random_image(900, 900, s) for s in range(4)], max_soft_tokens=1120)
    row = [2]
    for n in images.num_soft_tokens:
        row += [BOI, *[IMG] * n, EOI]
    assert len(row) > ours.config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match="exceeds this model's context"):
        ours.generate(torch.tensor([row]), max_new_tokens=4, pixel_values=images.pixel_values,
                      image_position_ids=images.pixel_position_ids)


def test_video_frames_match_reference(pair):
    """A 3-frame video between text: frames go through the vision tower at the video budget and fill the
    <|video|> slots; on the 26B-like model each frame is its own bidirectional block."""
    kind, ref, ours = pair
    from gemma4.processing.video import process_videos

    VID = IDS["video_token_id"]
    frames = np.stack([np.asarray(random_image(64, 96, s)) for s in range(3)])
    video = process_videos(frames, fps=1.0)
    rng = np.random.default_rng(5)
    row = [2, *text(4, rng)]
    for _ in range(video.num_frames_per_video[0]):
        row += [*text(2, rng), BOI, *[VID] * video.num_soft_tokens_per_frame[0], EOI]
    row += text(3, rng)
    ids = torch.tensor([row])
    media = dict(pixel_values_videos=video.pixel_values_videos, video_position_ids=video.video_position_ids)
    with torch.no_grad():
        expected = ref(input_ids=ids, mm_token_type_ids=2 * (ids == VID).long(),
                       num_frames_per_video=torch.tensor(video.num_frames_per_video), use_cache=False,
                       **media).logits
        got = ours(ids, **media)
    assert (got - expected).abs().max().item() <= 1e-4


def test_processor_takes_audio_as_sample_rate_pairs(processors):
    ours, _, _, _ = processors
    clip = (waveform(0.5, 3), 16_000)
    one = ours(text="Listen: <|audio|>", audio=[clip])
    two = ours(text=["A <|audio|>", "B <|audio|>"], audio=[clip, clip])
    assert one["input_features"].shape[0] == 1 and two["input_features"].shape[0] == 2
    assert torch.equal(one["input_features"][0], two["input_features"][1])


def test_text_only_load_skips_towers_deeper_than_the_text(tmp_path, short_text_config):
    """with_towers=False skips the towers' tensors whatever their layer numbers (a vision tower deeper than the text
    stack once raised IndexError: its K/V projections were read as a KV-shared text layer's)."""
    config = config_dict("E2B", short_text_config)
    config["vision_config"]["num_hidden_layers"] = config["text_config"]["num_hidden_layers"] + 2
    reference_model(config, seed=3).save_pretrained(tmp_path)
    full = gemma4.Model.from_pretrained(tmp_path, dtype=torch.float32)
    text_only = gemma4.Model.from_pretrained(tmp_path, dtype=torch.float32, with_towers=False)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(full(ids), text_only(ids))
