"""Hostile and malformed requests: only 2xx/4xx, never 5xx, and the server stays healthy (in-process ASGI)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from test_server_support import stub_app

from gemma4.processing.tokenizer import Tokenizer

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                      st.text(max_size=20))
json_any = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)
KEYS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
        "min_p", "seed", "stop", "n", "stream", "stream_options", "logprobs", "top_logprobs", "tools", "tool_choice",
        "presence_penalty", "frequency_penalty", "chat_template_kwargs", "reasoning_effort", "min_tokens"]
part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio", "video_url", "x"])},
                             optional={"text": json_any, "image_url": st.one_of(json_any, st.fixed_dictionaries(
                                 {"url": st.sampled_from(["file:///etc/passwd", "http://127.0.0.1/x",
                                                          "data:image/png;base64,!!", "https://evil.example/a"])})),
                                 "input_audio": json_any})
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "bad"])},
                                optional={"content": st.one_of(json_any, st.lists(part, max_size=3)),
                                          "tool_calls": json_any, "tool_call_id": json_any, "name": json_any})
overrides = st.dictionaries(st.sampled_from(KEYS), json_any, max_size=5)
body = st.one_of(
    st.builds(lambda msgs, extra: {"model": "stub", "messages": msgs, "max_tokens": 4, **extra},
              st.lists(message, max_size=3), overrides),
    st.builds(lambda prompt, extra: {"model": "stub", "prompt": prompt, "max_tokens": 4, **extra},
              json_any, overrides),
    json_any)
raw = st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode))


@pytest.fixture(scope="module")
def client(gemma4_tokenizer_dir):
    app, _ = stub_app(Tokenizer.from_pretrained(gemma4_tokenizer_dir))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    app.state.server.engine.shutdown()


def check(response):
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert "message" in response.json()["error"]


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), data=body)
def test_fuzz_json(client, path, data):
    try:
        content = json.dumps(data).encode()
    except ValueError:
        return
    check(client.post(path, content=content, headers={"content-type": "application/json"}))


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/audio/transcriptions",
                             "/nope"]), content=raw)
def test_fuzz_raw_bytes(client, path, content):
    check(client.post(path, content=content))


def test_still_healthy(client):
    assert client.get("/health").json() == {"status": "ok"}
    r = client.post("/v1/completions", json={"model": "stub", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200


def test_oversized_body_is_refused(client, monkeypatch):
    import gemma4.server.app as app_module

    monkeypatch.setattr(app_module, "MAX_BODY_BYTES", 1000)
    big = json.dumps({"model": "stub", "prompt": "x" * 5000, "max_tokens": 2}).encode()
    response = client.post("/v1/completions", content=big)
    assert response.status_code == 413 and "larger than 1000 bytes" in response.json()["error"]["message"]

    def chunks():  # no content-length: refused while streaming in
        for _ in range(10):
            yield b" " * 500
    response = client.post("/v1/completions", content=chunks())
    assert response.status_code == 413
    assert client.get("/health").status_code == 200
