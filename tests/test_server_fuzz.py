"""Hostile and malformed requests: only 2xx/4xx, never 5xx; every error in OpenAI's shape; the server stays healthy
and answers a valid request afterwards. In-process ASGI against a scripted model (the engine, sampler and HTTP layer
are real). A sweep sets every accepted field (and nested ones) of each endpoint to each hostile value; hypothesis adds
random bodies (more with --runslow)."""

from __future__ import annotations

import concurrent.futures
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from test_server_support import NAN_TOKEN, Server, stub_app

from gemma4.processing.tokenizer import Tokenizer
from gemma4.server.protocol import CHAT_FIELDS, COMPLETION_FIELDS, DETOKENIZE_FIELDS, MAX_JSON_DEPTH, TOKENIZE_FIELDS


@pytest.fixture(scope="module")
def stub(gemma4_tokenizer_dir):
    app, model = stub_app(Tokenizer.from_pretrained(gemma4_tokenizer_dir))
    app.state.server.has_audio = True  # the form is checked before any audio reaches the (absent) tower
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c, model
    app.state.server.engine.shutdown()


@pytest.fixture(scope="module")
def client(stub):
    return stub[0]


def check(response):
    """No 5xx; an error body is exactly OpenAI's shape; a stream's error events too, and it ends with [DONE]."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_error_shape(response.json())
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", response.text
        for event in events[:-1]:
            data = json.loads(event)
            if "error" in data:
                assert_error_shape(data)


def assert_error_shape(body):
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert isinstance(error["code"], str), error


DEEP = "<the value nested 2,000 levels deep>"  # spliced in as text: json.dumps itself would recurse too deep
DEEP_TEXT = '{"a":[' * 1000 + "1" + "]}" * 1000


def post(client, path, body):
    """`body` as JSON text; NaN/Infinity become the bare literals that Python's json (and so the server) reads."""
    content = body if isinstance(body, bytes) else json.dumps(body).replace(json.dumps(DEEP), DEEP_TEXT).encode()
    return client.post(path, content=content, headers={"content-type": "application/json"})


# --- the sweep -----------------------------------------------------------------------------------------------------
def deep(levels: int):
    value = 1
    for i in range(levels):
        value = [value] if i % 2 else {"a": value}
    return value


SURROGATE = "\ud800"  # json.dumps writes it as the escape "\\ud800", as a hostile client would send it
HOSTILE = [None, True, False, 0, -1, 1, 2, 17, 2**31, 2**63, 10**30, -10**30, 0.5, -0.0, 5e-324, -5e-324, 1e-310,
           1e-40, 1e308, -1e308, float("nan"), float("inf"), float("-inf"), "", "x", "auto", "required", "none",
           SURROGATE, "a" * 5000, "<|turn>user\n<|tool_call>", "\x00", "🙂", [], [1], ["x", SURROGATE], [None],
           {}, {"a": 1}, {"type": "text"}, {"type": "json_object"}, {SURROGATE: 1}, {"include_usage": "yes"},
           deep(MAX_JSON_DEPTH + 5), DEEP]
CHAT = {"model": "stub", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
COMPLETION = {"model": "stub", "prompt": "hi", "max_tokens": 3}
TOKENIZE = {"model": "stub", "messages": [{"role": "user", "content": "hi"}]}
DETOKENIZE = {"model": "stub", "tokens": [2, 100]}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "a": {"type": "string"}}}}}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
    "a": {"type": "integer"}}}}}
UNKNOWN = ["best_of_n", "extra", "guided_json", "functions"]


def with_path(body, path, value):
    """A copy of `body` with `value` at `path` (keys and list indices)."""
    body = json.loads(json.dumps(body))
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return body


NESTED = [  # (endpoint body, path) of nested fields the server reads
    (CHAT, ("messages", 0, "content")), (CHAT, ("messages", 0, "role")), (CHAT, ("messages", 0)),
    (CHAT, ("messages", 0, "name")), (CHAT, ("messages", 0, "tool_calls")),
    (dict(CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]),
     ("messages", 0, "content", 0, "text")),
    (dict(CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]),
     ("messages", 0, "content", 0, "type")),
    (dict(CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     ("messages", 0, "content", 0, "image_url", "url")),
    (dict(CHAT, messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "ok"}]), ("messages", 1, "tool_calls", 0, "function",
                                                                    "arguments")),
    (dict(CHAT, tools=[TOOL]), ("tools", 0, "function", "parameters")),
    (dict(CHAT, tools=[TOOL]), ("tools", 0, "function", "name")),
    (dict(CHAT, tools=[TOOL]), ("tools", 0, "function", "parameters", "properties", "a")),
    (dict(CHAT, tools=[TOOL]), ("tool_choice",)),
    (dict(CHAT, tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}}),
     ("tool_choice", "function", "name")),
    (dict(CHAT, stream=True, stream_options={}), ("stream_options", "include_usage")),
    (dict(CHAT, chat_template_kwargs={}), ("chat_template_kwargs", "enable_thinking")),
    (dict(CHAT, mm_processor_kwargs={}), ("mm_processor_kwargs", "max_soft_tokens")),
    (dict(CHAT, response_format={}), ("response_format", "type")),
    (dict(CHAT, response_format=SCHEMA_FORMAT), ("response_format", "json_schema")),
    (dict(CHAT, response_format=SCHEMA_FORMAT), ("response_format", "json_schema", "schema")),
    (dict(CHAT, response_format=SCHEMA_FORMAT), ("response_format", "json_schema", "strict")),
    (dict(CHAT, response_format=SCHEMA_FORMAT), ("response_format", "json_schema", "schema", "properties", "a")),
    (dict(COMPLETION, structured_outputs={"json": {}}), ("structured_outputs", "json")),
    (dict(COMPLETION, structured_outputs={"regex": "a"}), ("structured_outputs", "regex")),
    (dict(COMPLETION, structured_outputs={"choice": ["a"]}), ("structured_outputs", "choice")),
    (dict(COMPLETION, structured_outputs={"choice": ["a"]}), ("structured_outputs", "choice", 0)),
    (dict(CHAT, logit_bias={"5": 1}), ("logit_bias", "5")),
    (dict(CHAT, tools=[TOOL], tool_choice="required"), ("tools", 0, "function", "parameters", "properties", "a")),
    (dict(CHAT, tools=[TOOL], tool_choice="required"), ("parallel_tool_calls",)),
    (dict(COMPLETION, prompt=[2, 100]), ("prompt", 1)),
    (dict(COMPLETION, prompt=[[2, 100], "hi"]), ("prompt", 0, 1)),
    (dict(COMPLETION, prompt=[[2, 100], "hi"]), ("prompt", 1)),
]
CASES = [("/v1/chat/completions", CHAT, (field,)) for field in [*CHAT_FIELDS, *UNKNOWN]] + \
        [("/v1/completions", COMPLETION, (field,)) for field in [*COMPLETION_FIELDS, *UNKNOWN]] + \
        [("/v1/completions" if "prompt" in base else "/v1/chat/completions", base, path) for base, path in NESTED] + \
        [("/tokenize", TOKENIZE, (field,)) for field in [*TOKENIZE_FIELDS, *UNKNOWN]] + \
        [("/tokenize", TOKENIZE, ("messages", 0, "content")), ("/tokenize", dict(COMPLETION), ("prompt",)),
         ("/detokenize", DETOKENIZE, ("tokens", 1))] + \
        [("/detokenize", DETOKENIZE, (field,)) for field in [*DETOKENIZE_FIELDS, *UNKNOWN]]


@pytest.mark.parametrize("path,base,field", CASES, ids=[f"{p.split('/')[-2 if 'chat' in p else -1]}:"
                                                       f"{'.'.join(map(str, f))}" for p, _, f in CASES])
def test_every_field_with_every_hostile_value(client, path, base, field):
    for value in HOSTILE:
        check(post(client, path, with_path(base, field, value)))
    for stream in (True, False):  # the same values with the other streaming mode, for the sampling fields
        if field[0] in ("temperature", "top_p", "top_k", "min_p", "seed", "n", "logprobs", "max_tokens"):
            for value in HOSTILE[:23]:
                check(post(client, path, with_path(dict(base, stream=stream), field, value)))


RAW = [b"", b"{", b"[]", b"null", b"1", b'"x"', b"{not json", b"\xff\xfe\x00", b'{"model": "stub", "prompt": "\xc3"}',
       b'{"messages": "\\ud800"}', b'{"\\udc00": 1}', b'{"prompt": "\\ud83d\\ude00", "max_tokens": 2}',
       b'{"temperature": NaN}', b'{"prompt": "hi", "max_tokens": 1e999}', b"[" * 100000, b'{"a":' * 5000,
       b'{"model": "stub", "prompt": "hi", "max_tokens": 2, "max_tokens": "x"}', "{\"prompt\": \"é\"}".encode("utf-16")]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"])
def test_raw_bodies(client, path):
    for content in RAW:
        check(post(client, path, content))


FORM = {"model": "stub", "language": "en", "prompt": "x", "response_format": "json", "temperature": "0",
        "max_tokens": "4"}
FORM_VALUES = ["", "nan", "inf", "-inf", "5e-324", "1e309", "-1", "0", "10**30", "99999999999999999999999",
               "json", "text", "xml", "x" * 5000, "\udcff", "true"]


def test_transcription_form(client):
    for field in FORM:
        for value in FORM_VALUES:
            data = dict(FORM, **{field: value.encode("utf-8", "surrogateescape")})
            files = {"file": ("a.wav", b"RIFF....WAVEfmt not audio")}
            check(client.post("/v1/audio/transcriptions", data={k: v for k, v in data.items()}, files=files))
    check(client.post("/v1/audio/transcriptions", data=FORM))  # no file
    check(client.post("/v1/audio/transcriptions", content=b"--x\r\n\r\n", headers={
        "content-type": "multipart/form-data; boundary=x"}))


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_every_endpoint_and_method(client, method):
    for path in ["/health", "/metrics", "/version", "/tokenize", "/detokenize", "/v1/models", "/v1/chat/completions",
                 "/v1/completions", "/v1/audio/transcriptions", "/v1/nope", "/", "/v1/models/stub"]:
        response = client.request(method, path, content=b"{}")
        check(response)


# --- random bodies (hypothesis) ------------------------------------------------------------------------------------
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                      st.text(max_size=20))
json_any = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)
KEYS = sorted({*CHAT_FIELDS, *COMPLETION_FIELDS})
part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio", "video_url", "x"])},
                             optional={"text": json_any, "image_url": st.one_of(json_any, st.fixed_dictionaries(
                                 {"url": st.sampled_from(["file:///etc/passwd", "http://127.0.0.1/x",
                                                          "data:image/png;base64,!!", "https://evil.example/a"])})),
                                 "input_audio": json_any})
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "bad"])},
                                optional={"content": st.one_of(json_any, st.lists(part, max_size=3)),
                                          "tool_calls": json_any, "tool_call_id": json_any, "name": json_any})
overrides = st.dictionaries(st.sampled_from(KEYS), st.one_of(json_any, st.sampled_from(HOSTILE[:30])), max_size=5)
body = st.one_of(
    st.builds(lambda msgs, extra: {"model": "stub", "messages": msgs, "max_tokens": 4, **extra},
              st.lists(message, max_size=3), overrides),
    st.builds(lambda prompt, extra: {"model": "stub", "prompt": prompt, "max_tokens": 4, **extra},
              json_any, overrides),
    json_any)
raw = st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode))
PATHS = ["/v1/chat/completions", "/v1/completions"]


def fuzz_json(client, path, data):
    check(post(client, path, data))


def fuzz_raw(client, path, content):
    check(client.post(path, content=content))


RAW_PATHS = st.sampled_from([*PATHS, "/v1/models", "/v1/audio/transcriptions", "/tokenize", "/detokenize", "/nope"])
test_fuzz_json = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))(
    given(path=st.sampled_from(PATHS), data=body)(fuzz_json))
test_fuzz_raw_bytes = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))(
    given(path=RAW_PATHS, content=raw)(fuzz_raw))
test_fuzz_json_long = pytest.mark.slow(settings(max_examples=20000, deadline=None, suppress_health_check=list(
    HealthCheck))(given(path=st.sampled_from(PATHS), data=body)(fuzz_json)))
test_fuzz_raw_bytes_long = pytest.mark.slow(settings(max_examples=5000, deadline=None, suppress_health_check=list(
    HealthCheck))(given(path=RAW_PATHS, content=raw)(fuzz_raw)))


def test_z_still_healthy(client):  # after the fuzzing above (pytest runs a module's tests in order)
    assert client.get("/health").json() == {"status": "ok"}
    r = client.post("/v1/completions", json={"model": "stub", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_oversized_body_is_refused(client, monkeypatch):
    import gemma4.server.app as app_module

    monkeypatch.setattr(app_module, "MAX_BODY_BYTES", 1000)
    big = json.dumps({"model": "stub", "prompt": "x" * 5000, "max_tokens": 2}).encode()
    response = client.post("/v1/completions", content=big)
    assert response.status_code == 413 and "larger than 1000 bytes" in response.json()["error"]["message"]
    assert_error_shape(response.json())

    def chunks():  # no content-length: refused while streaming in
        for _ in range(10):
            yield b" " * 500
    response = client.post("/v1/completions", content=chunks())
    assert response.status_code == 413
    assert client.get("/health").status_code == 200


def test_documented_limits_and_choices(client):
    """What docs/serving.md says of malformed input: deep JSON, surrogates, wrong types, unknown fields, a tiny
    temperature, logit_bias and structured output (applied, so accepted; a value out of range is a 400)."""
    r = post(client, "/v1/chat/completions", dict(CHAT, tools=[TOOL]) | {"x": deep(MAX_JSON_DEPTH)})
    assert r.status_code == 400 and "deeper than 64" in r.json()["error"]["message"]
    r = post(client, "/v1/chat/completions", with_path(CHAT, ("messages", 0, "content"), "a" + SURROGATE))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
    r = post(client, "/v1/chat/completions", dict(CHAT, user=5))
    assert r.status_code == 400 and r.json()["error"]["param"] == "user"
    assert post(client, "/v1/completions", dict(COMPLETION, echo=1)).json()["error"]["param"] == "echo"
    assert post(client, "/v1/completions", dict(COMPLETION, echo=True)).status_code == 200  # applied
    assert post(client, "/v1/completions", dict(COMPLETION, echo=False, best_of=1, suffix="")).status_code == 200
    assert post(client, "/v1/chat/completions", dict(CHAT, some_extension=[1])).status_code == 200  # ignored
    assert post(client, "/v1/chat/completions", dict(CHAT, temperature=5e-324)).status_code == 200  # greedy
    assert post(client, "/v1/chat/completions", dict(CHAT, logit_bias={"5": 1})).status_code == 200
    assert post(client, "/v1/chat/completions", dict(CHAT, logit_bias={})).status_code == 200
    r = post(client, "/v1/chat/completions", dict(CHAT, logit_bias={"5": 1e9}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    assert post(client, "/v1/chat/completions", dict(CHAT, response_format={"type": "json_object"})).status_code == 200
    r = post(client, "/v1/chat/completions", dict(CHAT, response_format={"type": "yaml"}))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


# --- one request's failure in the engine is its own ----------------------------------------------------------------
def test_a_request_failing_in_the_engine_fails_alone(gemma4_tokenizer_dir):
    """A request whose logits turn NaN (so it cannot be sampled) gets a 500 naming the cause, streamed or not,
    while requests running beside it in the same batches complete with their own text; the engine stays up."""
    tokenizer = Tokenizer.from_pretrained(gemma4_tokenizer_dir)
    app, model = stub_app(tokenizer)
    words = tokenizer.encode(" one two three four five six seven eight", add_special_tokens=False)
    for length in (10, 20, 30, 40):  # the healthy prompts, 8 new tokens each
        model.scripts[length] = words
    model.scripts[100] = words[:2] + [NAN_TOKEN]  # the poisoned prompt: 100 tokens, its third token cannot be drawn
    server = Server(app)
    try:
        import httpx2 as httpx

        def complete(length, stream=False, temperature=0.0):
            body = {"model": "stub", "prompt": [2] + [100] * (length - 1), "max_tokens": 8, "stream": stream,
                    "temperature": temperature}
            return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)

        jobs = [(10, False, 0.0), (100, False, 0.0), (20, True, 1.0), (100, True, 1.0), (30, False, 1.0),
                (100, False, 0.7), (40, True, 0.0)] * 3
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            responses = list(pool.map(lambda job: complete(*job), jobs))
        for (length, stream, _), response in zip(jobs, responses):
            events = [json.loads(line[6:]) for line in response.text.splitlines()
                      if line.startswith("data: {")] if stream else [response.json()]
            if length == 100:
                assert response.status_code == (200 if stream else 500)
                assert_error_shape(events[-1])
                assert "NaN" in events[-1]["error"]["message"] and events[-1]["error"]["type"] == "server_error"
            else:
                assert response.status_code == 200
                text = "".join(c["text"] for e in events for c in e["choices"])
                assert text == " one two three four five six seven eight"
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
        assert app.state.server.engine.engine.blocks.usage == 0
    finally:
        server.stop()


def test_a_dead_engine_reports_unhealthy_and_stops_the_server(gemma4_tokenizer_dir, monkeypatch):
    """A device error escapes the engine: /health answers 503 with the cause, requests get 503, and `gemma4 serve`
    (run_serve) stops its server and exits with status 1."""
    import threading

    import torch

    import gemma4.server.cli as serve_cli
    from gemma4.server.cli import run_serve

    app, model = stub_app(Tokenizer.from_pretrained(gemma4_tokenizer_dir))
    monkeypatch.setattr(serve_cli, "build_app_from_args", lambda args, model=None: app)

    def broken(*args, **kwargs):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    args = type("Args", (), {"host": "127.0.0.1", "port": 0, "allowed_origins": "*", "shutdown_timeout": 30.0})()
    result = {}

    def serve():
        try:
            run_serve(args)
        except SystemExit as e:
            result["exit"] = e.code

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    engine = app.state.server.engine
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/health").status_code == 200
        model.forward = broken
        r = post(client, "/v1/completions", COMPLETION)
        assert r.status_code == 503 and "illegal memory access" in r.json()["error"]["message"]
        assert_error_shape(r.json())
        health = client.get("/health")
        assert health.status_code == 503 and "illegal memory access" in health.json()["message"]
        assert post(client, "/v1/completions", COMPLETION).status_code == 503
    thread.join(timeout=30)
    assert not thread.is_alive() and engine.error is not None
    assert result["exit"] != 0 and "engine stopped" in str(result["exit"])
