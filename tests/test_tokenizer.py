"""Tokenizer: loading, ids identical to transformers, decode, special ids, clear errors.

The first tests build a tiny `tokenizers` vocabulary with Gemma 4's control tokens at their real ids, so
they run anywhere; the parity tests use the real vocabulary through `gemma4_tokenizer_dir`.
"""

import json

import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from gemma4.processing.tokenizer import GEMMA4_TOKENS, Tokenizer

SPECIAL = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>",
           49: "<tool_call|>", 50: "<|tool_response>", 51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>",
           100: "<|channel>", 101: "<channel|>", 105: "<|turn>", 106: "<turn|>", 110: "<|image>", 111: "<image|>",
           112: "<|image|>", 113: "<|audio>", 114: "<audio|>", 115: "<|audio|>", 116: "<|video|>"}
CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
    "unk_token": "<unk>", "mask_token": "<mask>", "padding_side": "left",
    "extra_special_tokens": {"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
                             "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"},
}
TEMPLATE = "{{ bos_token }}{% for m in messages %}<|turn>{{ m['role'] }}\n{{ m['content'] }}<turn|>\n{% endfor %}"


def _tiny_backend() -> HFTokenizer:
    names = {**{i: f"<unused{i}>" for i in range(120)}, **SPECIAL, 4: "<mask>"}
    vocab = {token: i for i, token in names.items()}
    for offset, ch in enumerate("abcdefghijklmnopqrstuvwxyz▁\n!?.,"):
        vocab[ch] = 120 + offset
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL.values()])
    backend.add_tokens([AddedToken("<mask>", special=False, normalized=False)])
    return backend


@pytest.fixture()
def tiny_dir(tmp_path):
    _tiny_backend().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    return tmp_path


def test_tiny_load_encode_decode(tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    ids = tok.encode("hi<|tool_call>")
    assert ids[0] == tok.bos_token_id == 2 and ids[-1] == 48
    assert tok.encode("hi", add_special_tokens=False) == ids[1:-1]
    assert tok.decode(ids) == "<bos>hi<|tool_call>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    assert tok.decode([4, 7], skip_special_tokens=True) == "<unused7>"  # the config's <mask> is skipped too
    assert tok.batch_decode([ids, [1]], skip_special_tokens=True) == ["hi", ""]
    assert tok.batch_encode(["hi", "a"]) == [tok.encode("hi"), tok.encode("a")]
    assert (tok.eos_token_id, tok.pad_token_id, tok.padding_side) == (1, 0, "left")
    assert tok.apply_chat_template([{"role": "user", "content": "yo"}]) == "<bos><|turn>user\nyo<turn|>\n"
    assert tok.apply_chat_template([{"role": "user", "content": "yo"}], tokenize=True)[:2] == [2, 105]


def test_tiny_special_ids(tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    expected = {"turn_start": 105, "turn_end": 106, "channel_start": 100, "channel_end": 101, "think": 98,
                "tool_start": 46, "tool_end": 47, "tool_call_start": 48, "tool_call_end": 49,
                "tool_response_start": 50, "tool_response_end": 51, "string_delimiter": 52, "image_start": 110,
                "image_end": 111, "image_token": 112, "audio_start": 113, "audio_end": 114, "audio_token": 115,
                "video_token": 116}
    assert set(expected) == set(GEMMA4_TOKENS)
    assert {stem: getattr(tok, f"{stem}_id") for stem in expected} == expected
    assert tok.token_to_id("<|tool_call>") == 48 and tok.id_to_token(106) == "<turn|>"
    assert tok.token_to_id("<nope>") is None
    assert tok.stop_token_ids == [1, 106, 50]
    assert tok.special_tokens_map["image_token"] == "<|image|>"


def test_torch_and_numpy_ids(tiny_dir):
    torch = pytest.importorskip("torch")
    tok = Tokenizer.from_pretrained(tiny_dir)
    ids = tok.encode("ab")
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)
    assert tok.batch_decode(torch.tensor([ids, ids]), skip_special_tokens=True) == ["ab", "ab"]


def test_chat_template_sources(tiny_dir):
    (tiny_dir / "chat_template.jinja").unlink()
    assert Tokenizer.from_pretrained(tiny_dir).chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_pretrained(tiny_dir).apply_chat_template([{"role": "user", "content": "x"}])
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps({**CONFIG, "chat_template": TEMPLATE}))
    assert Tokenizer.from_pretrained(tiny_dir).chat_template == TEMPLATE
    (tiny_dir / "chat_template.json").write_text(json.dumps({"chat_template": "X{{ bos_token }}"}))
    assert Tokenizer.from_pretrained(tiny_dir).apply_chat_template([{"role": "user", "content": "x"}]) == "X<bos>"
    named = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    (tiny_dir / "chat_template.json").unlink()
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps({**CONFIG, "chat_template": named}))
    tok = Tokenizer.from_pretrained(tiny_dir)
    tool = {"type": "function", "function": {"name": "f"}}
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "D"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tools=[tool]) == "T"


def test_missing_and_broken_files(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "empty")
    (tiny_dir / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="No tokenizer_config.json"):
        Tokenizer.from_pretrained(tiny_dir)
    (tiny_dir / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Tokenizer.from_pretrained(tiny_dir)
    (tiny_dir / "tokenizer_config.json").write_text("{}")
    (tiny_dir / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="Cannot load"):
        Tokenizer.from_pretrained(tiny_dir)
    with pytest.raises(TypeError):
        Tokenizer(_tiny_backend(), CONFIG).encode([1, 2])


# ------------------------------------------------------------------------------------- real vocabulary
TEXTS = [
    "Hello, world!",
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\n\nnewlines\r\n\n\n\n",
    "émoji 😀👍🏽🏳️‍🌈 中文 日本語 한국어 русский العربية हिन्दी",
    "<|turn>user\nHi<turn|>\n<|turn>model\n",
    'a<|"|>b<|tool_call>call:f{x:<|"|>y<|"|>}<tool_call|>',
    "<bos><eos><pad><unk><mask>",
    "<|image|><|audio|><|video|><|image><image|>",
    "not a token: <|turn <turn| <|tool_call",
    "code:\n    def f(x):\n        return x ** 2  # comment\n",
    "x" * 300,
    "1234567890 3.14159 -42 1e10",
    "\u00a0\u2003\u200b zero-width and nbsp",
    "Ünïcödé ÀÉÎÕÜ ß ﬁ",
]


@pytest.fixture(scope="module")
def real_pair(gemma4_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return Tokenizer.from_pretrained(gemma4_tokenizer_dir), transformers.AutoTokenizer.from_pretrained(str(gemma4_tokenizer_dir))


def test_ids_match_transformers(real_pair):
    ours, reference = real_pair
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False), text
    assert ours.batch_encode(TEXTS) == [reference.encode(t) for t in TEXTS]


def test_decode_matches_transformers(real_pair):
    ours, reference = real_pair
    for text in TEXTS:
        ids = reference.encode(text)
        assert ours.decode(ids) == reference.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True), text
    special = sorted(reference.added_tokens_decoder)[:200] + [255999, 256000, 258880, 258881, 258882, 258883, 258884]
    mixed = [x for i in special for x in (236781, i)]
    assert ours.decode(mixed, skip_special_tokens=True) == reference.decode(mixed, skip_special_tokens=True)
    batch = [reference.encode(t) for t in TEXTS]
    assert ours.batch_decode(batch, skip_special_tokens=True) == reference.batch_decode(batch, skip_special_tokens=True)


def test_real_special_ids(real_pair):
    ours, reference = real_pair
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (2, 1, 0, 3)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id, reference.unk_token_id)
    assert (ours.image_token_id, ours.audio_token_id, ours.video_token_id) == (258880, 258881, 258884)
    assert (ours.image_start_id, ours.image_end_id, ours.audio_start_id, ours.audio_end_id) == (255999, 258882, 256000, 258883)
    assert (ours.turn_start_id, ours.turn_end_id, ours.channel_start_id, ours.channel_end_id) == (105, 106, 100, 101)
    assert (ours.tool_call_start_id, ours.tool_call_end_id, ours.string_delimiter_id, ours.think_id) == (48, 49, 52, 98)
    assert ours.vocab_size == len(reference)
    assert ours.special_tokens_map == reference.special_tokens_map
