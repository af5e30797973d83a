"""Images and audio through the OpenAI-compatible server (official `openai` client, real uvicorn on loopback) on a
tiny random checkpoint with vision and audio towers and the real tokenizer; results equal a direct
`model.generate(**processor(...))`. No test touches the network: content comes in data URLs / base64, and the URL
policy is tested on its own."""

from __future__ import annotations

import base64
import io
import shutil
import wave
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import torch

from test_audio import TINY as AUDIO_TINY
from test_multimodal import random_image, waveform
from test_server_support import TOKENIZER_FILES, VOCAB, Server, serve_args
from test_vision import TOWERS
from reference import text_config_dict

from gemma4.config import Config
from gemma4 import Model
from gemma4.processing.chat import openai_to_gemma_messages
from gemma4.processing.image import load_image
from gemma4.processing.parse import parse_response
from gemma4.processing.processor import Processor
from gemma4.random_init import randomize_
from gemma4.server import media as media_policy
from gemma4.server.cli import build_app_from_args
from gemma4.server.protocol import APIError


def tiny_multimodal_config() -> Config:
    # The real vocabulary (the tokenizer's special ids), tiny everything else; bidirectional attention among an
    # image's tokens, as 26B-A4B / 31B have it.
    text = dict(text_config_dict("31B"), vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, num_hidden_layers=3,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                use_bidirectional_attention="vision")
    return Config.from_dict({"model_type": "gemma4", "text_config": text,
                             "vision_config": dict(TOWERS["E2B"], model_type="gemma4_vision"),
                             "audio_config": dict(AUDIO_TINY, model_type="gemma4_audio"), "eos_token_id": [1, 106]})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, gemma4_tokenizer_dir):
    directory = tmp_path_factory.mktemp("tiny-mm")
    randomize_(Model(tiny_multimodal_config()), 0).save_pretrained(str(directory))
    for name in TOKENIZER_FILES:
        shutil.copy(gemma4_tokenizer_dir / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def server(checkpoint):
    srv = Server(build_app_from_args(serve_args(checkpoint, "--max-num-batched-tokens", "300",
                                                "--allowed-media-domains", "localhost")))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client(timeout=120)


@pytest.fixture(scope="module")
def direct(checkpoint):
    """The same checkpoint used directly: model.generate(**processor(...)), greedy."""
    model = Model.from_pretrained(str(checkpoint), dtype=torch.float32)
    processor = Processor.from_pretrained(checkpoint)
    tokenizer = processor.tokenizer

    def run(messages, images=(), audio=(), max_tokens=8, image_budget=None, prompt_text=None):
        prompt = prompt_text or tokenizer.apply_chat_template(openai_to_gemma_messages(messages),
                                                              add_generation_prompt=True, enable_thinking=False)
        inputs = processor(text=prompt, images=list(images) or None, audio=[list(audio)] if audio else None,
                           max_soft_tokens=image_budget, add_special_tokens=False)
        inputs.pop("mm_token_type_ids")
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=tokenizer.stop_token_ids)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        stops = set(tokenizer.stop_token_ids)
        end = next((i for i, t in enumerate(new) if t in stops), None)
        tokens = new if end is None else new[:end]
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        content = parse_response(text, complete=end is not None).get("content")
        return content, inputs["input_ids"].shape[1], (len(tokens) + (end is not None))

    return run


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wav_bytes(samples: np.ndarray, rate: int = 16_000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def image_message(url: str, text: str = "What is in this picture?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_image_chat_equals_direct_generate(client, direct):
    url = png_data_url(random_image(90, 130, 1))
    messages = image_message(url)
    content, prompt_len, completion = direct(messages, images=[load_image(url)])
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == content
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_len, completion)
    assert prompt_len > 70  # the image's soft tokens count as prompt tokens

    # Alone above; now with concurrent text requests (and a second image request with a per-request budget).
    small = image_message(png_data_url(random_image(60, 60, 2)), "Describe it.")
    small_expected = direct(small, images=[random_image(60, 60, 2)], image_budget=70)[0]
    with ThreadPoolExecutor(6) as pool:
        texts = [pool.submit(client.chat.completions.create, model="tiny", max_tokens=6, temperature=0,
                             messages=[{"role": "user", "content": f"Tell me about {i}"}]) for i in range(4)]
        images = [pool.submit(client.chat.completions.create, model="tiny", messages=messages, max_tokens=8,
                              temperature=0),
                  pool.submit(client.chat.completions.create, model="tiny", messages=small, max_tokens=8,
                              temperature=0, extra_body={"mm_processor_kwargs": {"max_soft_tokens": 70}})]
        assert all(t.result().choices for t in texts)
        assert images[0].result().choices[0].message.content == content
        assert images[1].result().choices[0].message.content == small_expected


def test_audio_chat_equals_direct_generate(client, direct):
    clip = waveform(0.6, 3)
    data = base64.b64encode(wav_bytes(clip)).decode()
    messages = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                                             {"type": "text", "text": "What do you hear?"}]}]
    from gemma4.processing.audio import decode_audio
    content, prompt_len, completion = direct(messages, audio=[decode_audio(wav_bytes(clip), "wav")])
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == content
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_len, completion)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (content or "")


def test_transcription(client, direct, checkpoint):
    from gemma4.processing.audio import decode_audio
    from gemma4.processing.tokenizer import Tokenizer
    audio = wav_bytes(waveform(0.8, 4))
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Transcribe this audio."}]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    content, _, _ = direct(None, audio=[decode_audio(audio, "wav")], max_tokens=12, prompt_text=prompt)
    r = client.audio.transcriptions.create(model="tiny", file=("speech.wav", audio), extra_body={"max_tokens": 12})
    assert r.text == (content or "").strip()
    plain = client.audio.transcriptions.create(model="tiny", file=("speech.wav", audio), response_format="text",
                                               language="en", prompt="names: Ada", extra_body={"max_tokens": 4})
    assert isinstance(plain, str)
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model="tiny", file=("speech.wav", b"RIFF not really a wav file"))
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model="tiny", file=("speech.wav", audio), response_format="srt")


def test_media_errors_are_400(server, client):
    def bad(messages, **kw):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, **kw)
        assert e.value.status_code == 400 and e.value.body["message"]
        return e.value.message

    garbage = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nnot an image at all").decode()
    assert "cannot decode" in bad(image_message(garbage))
    assert "base64" in bad(image_message("data:image/png;base64,!!!notbase64"))
    assert "allowed-media-domains" in bad(image_message("https://evil.example/cat.png"))
    assert "scheme" in bad(image_message("file:///etc/passwd"))
    assert "IP address" in bad(image_message("http://127.0.0.1/cat.png"))
    # An allowed name that resolves to a private/loopback address is refused before any request is made.
    assert "non-public" in bad(image_message("http://localhost/cat.png"))
    assert "cannot decode the audio" in bad([{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(b"noise").decode(), "format": "wav"}}]}])
    assert "video" in bad([{"role": "user", "content": [{"type": "video_url", "video_url": {
        "url": "data:video/mp4;base64,AAAA"}}]}])
    # One image's tokens must fit one step's token budget (--max-num-batched-tokens 300 here).
    big = image_message(png_data_url(random_image(480, 480, 5)))
    assert "max-num-batched-tokens" in bad(big, extra_body={"mm_processor_kwargs": {"max_soft_tokens": 560}})
    assert "max_soft_tokens" in bad(big, extra_body={"mm_processor_kwargs": {"max_soft_tokens": 100}})
    # Media tokens count against --max-model-len (1024 here).
    many = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(
        random_image(200, 200, 6))}}] * 5}]
    assert "maximum context length" in bad(many)
    # A literal placeholder in the text does not match the media given.
    assert "placeholder" in bad(image_message(png_data_url(random_image(40, 40, 7)), "two <|image|> here"))
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices  # still serving
    assert server.app.state.server.engine.error is None


def test_url_policy():
    allowed = ["example.com"]
    media_policy.check_url("https://example.com/a.png", allowed)
    media_policy.check_url("http://cdn.example.com/a.png", allowed)
    for url in ("https://example.com.evil.org/a.png", "https://notexample.com/a.png", "ftp://example.com/a",
                "file:///etc/passwd", "/etc/passwd", "https://10.0.0.1/a.png", "https://[::1]/a.png",
                "data:image/png,rawnotbase64", "https:///nohost"):
        with pytest.raises(APIError) as e:
            media_policy.check_url(url, allowed)
        assert e.value.status == 400
    with pytest.raises(APIError, match="non-public"):
        media_policy.check_resolves_public("localhost")
    with pytest.raises(APIError, match="non-public"):
        media_policy.fetch("http://localhost:1/x.png", ["localhost"])  # refused before connecting


def test_fuzz_media_never_5xx(server):
    """Hostile media parts and transcription uploads on a multimodal model: only 2xx/4xx."""
    import httpx2 as httpx
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    tiny_png = png_data_url(random_image(20, 20, 0))
    tiny_wav = base64.b64encode(wav_bytes(waveform(0.2, 0))).decode()
    url = st.one_of(st.sampled_from([tiny_png, "data:image/png;base64,", "data:;base64,AAAA", "data:image/png,x",
                                     "http://localhost/a", "https://sub.localhost/a", "ftp://x", "//x", ""]),
                    st.text(max_size=30), st.integers(), st.none())
    b64 = st.one_of(st.sampled_from([tiny_wav, "", "====", "UklGRg=="]), st.binary(max_size=40).map(
        lambda b: base64.b64encode(b).decode()), st.text(max_size=20), st.integers())
    part = st.one_of(
        st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(
            st.fixed_dictionaries({"url": url}), url)}),
        st.fixed_dictionaries({"type": st.just("input_audio"), "input_audio": st.one_of(
            st.fixed_dictionaries({"data": b64}, optional={"format": st.one_of(
                st.sampled_from(["wav", "mp3", "flac", "xyz", ""]), st.integers())}), b64)}),
        st.fixed_dictionaries({"type": st.sampled_from(["image", "audio", "audio_url", "video"])},
                              optional={"url": url, "data": b64, "audio_url": st.fixed_dictionaries({"url": url})}),
        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}))
    body = st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.just("user"), "content": st.lists(part, min_size=1, max_size=3)}), min_size=1, max_size=2)},
        optional={"mm_processor_kwargs": st.one_of(st.fixed_dictionaries({"max_soft_tokens": st.one_of(
            st.sampled_from([70, 140, 1120]), st.integers(), st.text(max_size=3))}), st.text(max_size=3))})
    form = st.fixed_dictionaries({"file": st.one_of(st.binary(max_size=60), st.just(wav_bytes(waveform(0.2, 1))))},
                                 optional={"response_format": st.sampled_from(["json", "text", "srt", ""]),
                                           "temperature": st.sampled_from(["0", "x", "-1", "3", "nan"]),
                                           "language": st.text(max_size=5), "max_tokens": st.sampled_from(
                                               ["1", "0", "-5", "x", "2"])})

    def check(response):
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert "message" in response.json()["error"]

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=body)
    def chat(data):
        check(httpx.post(f"{server.url}/v1/chat/completions", json={**data, "max_tokens": 1}, timeout=60))

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(fields=form, raw=st.binary(max_size=80))
    def transcribe(fields, raw):
        name = fields.pop("file")
        extra = {"max_tokens": "1", **fields}
        check(httpx.post(f"{server.url}/v1/audio/transcriptions", files={"file": ("a.wav", name)},
                         data=extra, timeout=60))
        check(httpx.post(f"{server.url}/v1/audio/transcriptions", content=raw, timeout=60,
                         headers={"content-type": "multipart/form-data; boundary=xyz"}))

    chat()
    transcribe()
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
