"""The server's lifecycle and OpenAI details: a disconnected client's request is aborted within an engine step;
`gemma4 serve` drains on SIGTERM and exits 0; completions' prompt lists and text offsets; empty answers; CORS;
/tokenize, /detokenize and /version."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import pytest

from test_server import stub  # noqa: F401  (the fixture: a server over a scripted model)
from test_server_support import Server, serve_args, stub_app, write_checkpoint

from gemma4 import __version__
from gemma4.processing.tokenizer import Tokenizer
from gemma4.server.app import create_app
from gemma4.server.cli import build_app_from_args


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, gemma4_tokenizer_dir):
    directory = tmp_path_factory.mktemp("tiny")
    write_checkpoint(directory, gemma4_tokenizer_dir)
    return directory


@pytest.fixture(scope="module")
def server(checkpoint):
    srv = Server(build_app_from_args(serve_args(checkpoint)))
    yield srv
    srv.stop()


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# --- a client that disconnects -------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_disconnected_request_is_aborted_within_a_step(server, stream):
    """The client sends a long request and closes its socket: the engine ends the sequence before its next step or
    the one after (the step running meanwhile may finish), and every KV block is free again."""
    llm_engine = server.app.state.server.engine.engine
    steps, step = [0], llm_engine.step

    def counted():
        steps[0] += 1
        return step()

    llm_engine.step = counted
    try:
        body = json.dumps({"model": "tiny", "prompt": "Go on", "max_tokens": 900, "ignore_eos": True,
                           "stream": stream}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_for(lambda: steps[0] >= 3)  # decoding
        sock.close()
        at = steps[0]
        assert wait_for(lambda: llm_engine.blocks.usage == 0 and not llm_engine.scheduler.running)
        assert steps[0] - at <= 2, f"{steps[0] - at} steps ran after the disconnect"
    finally:
        del llm_engine.step


# --- SIGTERM ---------------------------------------------------------------------------------------------------------
def _drain(url, send_sigterm, grace, alive):
    """Two requests in flight when SIGTERM comes: a streamed one that ends within the grace period gets its whole
    answer; one that does not is answered 503 when the period ends. New connections are refused meanwhile."""
    cut_off = {}

    def long_request():  # 1000 tokens: it is still running when the grace period ends
        cut_off["response"] = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "Go on", "max_tokens": 1000, "ignore_eos": True})

    thread = threading.Thread(target=long_request)
    thread.start()
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        first = next(lines)
        send_sigterm()
        sent = time.monotonic()
        rest = list(lines)
    events = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
    assert rest[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(e["choices"]) for e in events) == 12
    assert wait_for(lambda: not _healthy(url), 5) and alive()  # refuses connections, still draining
    thread.join(timeout=grace + 15)
    cut = cut_off["response"]
    assert cut.status_code == 503 and "shut down" in cut.json()["error"]["message"], cut.text
    assert grace - 0.5 < time.monotonic() - sent < grace + 10


def _healthy(url):
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_then_main_returns_0(gemma4_tokenizer_dir, monkeypatch):
    """`gemma4 serve` (gemma4.cli.main, in this process, over the scripted model slowed to 10 ms a step) on SIGTERM:
    drains for --shutdown-timeout, shuts the engine down and returns status 0. uvicorn raises the SIGTERM again once
    stopped: this test's own handler would see it if run_serve did not catch it (the process would die by it)."""
    import gemma4.server.cli as serve_cli
    from gemma4.cli import main

    app, model = stub_app(Tokenizer.from_pretrained(gemma4_tokenizer_dir))
    app.state.server.model_names = ["tiny"]
    forward = model.forward
    model.forward = lambda *a, **k: (time.sleep(0.01), forward(*a, **k))[1]
    monkeypatch.setattr(serve_cli, "build_app_from_args", lambda args, model=None: app)
    port, grace, reraised, result = _free_port(), 1.5, [], {}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: reraised.append(signum))
    url = f"http://127.0.0.1:{port}"

    def client():
        try:
            assert wait_for(lambda: _healthy(url), 30)
            _drain(url, lambda: os.kill(os.getpid(), signal.SIGTERM), grace, lambda: "status" not in result)
        except BaseException as e:  # reported by the main thread
            result["error"] = e

    thread = threading.Thread(target=client)
    thread.start()
    try:
        result["status"] = main(["serve", "ckpt", "--port", str(port), "--shutdown-timeout", str(grace)])
    finally:
        signal.signal(signal.SIGTERM, previous)
        thread.join(timeout=30)
    if "error" in result:
        raise result["error"]
    assert result["status"] == 0 and not reraised
    assert app.state.server.engine.stopped and not app.state.server.engine.thread.is_alive()


@pytest.mark.slow  # ~20 s on 2 busy cores, most of it starting the process (torch, the checkpoint, the tokenizer)
def test_sigterm_drains_then_the_process_exits_0(checkpoint):
    """The same through a real `gemma4 serve` process on the tiny random checkpoint: exit status 0 (and
    --allowed-origins reaches the CORS middleware)."""
    port, grace = _free_port(), 4.0
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "gemma4.cli", "serve", str(checkpoint), "--dtype", "fp32",
                             "--max-model-len", "1024", "--served-model-name", "tiny", "--port", str(port),
                             "--shutdown-timeout", str(grace), "--allowed-origins", "https://app.example"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: proc.poll() is not None or _healthy(url), 60) and proc.poll() is None, \
            proc.stderr.read().decode() if proc.poll() is not None else "not ready after 60 s"
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        r = httpx.options(f"{url}/v1/completions", headers={"Origin": "https://app.example", **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert httpx.options(f"{url}/v1/completions", headers={"Origin": "https://x.example", **preflight}
                             ).status_code == 400
        _drain(url, lambda: proc.send_signal(signal.SIGTERM), grace, lambda: proc.poll() is None)
        assert proc.wait(timeout=15) == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- OpenAI details --------------------------------------------------------------------------------------------------
def _words(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_completion_text_offsets(stub):
    """logprobs.text_offset: where each token's text starts in the completion text, streamed or not."""
    srv, model, tokenizer = stub
    prompt = [2] + [100] * 59  # 60 tokens: its own script
    model.scripts[60] = _words(tokenizer, " one two three, four") + [106]
    body = {"model": "stub", "prompt": prompt, "max_tokens": 20, "logprobs": 1}
    choice = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30).json()["choices"][0]
    text, lp = choice["text"], choice["logprobs"]
    assert text == " one two three, four" and len(lp["tokens"]) == len(lp["text_offset"]) > 1
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    assert all(text[at:].startswith(token) for at, token in zip(lp["text_offset"], lp["tokens"]))
    events = _events(httpx.post(f"{srv.url}/v1/completions", json=dict(body, stream=True), timeout=30))
    assert [at for e in events for c in e["choices"] for at in c["logprobs"]["text_offset"]] == lp["text_offset"]


def _events(response):
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]


def test_completion_prompt_lists(stub):
    """A list of prompts (strings or token-id lists) as vLLM: n choices per prompt, `index` prompt-major, usage
    summed over the prompts; a single token-id list is one prompt."""
    srv, model, tokenizer = stub
    short, long = [2, 100, 101], [2] + [100] * 79  # 3 and 80 tokens: a script each
    model.scripts[3], model.scripts[80] = _words(tokenizer, " short") + [106], _words(tokenizer, " long one") + [106]
    url = f"{srv.url}/v1/completions"
    r = httpx.post(url, json={"model": "stub", "prompt": [short, long], "n": 2, "max_tokens": 8}, timeout=30).json()
    assert [(c["index"], c["text"]) for c in r["choices"]] == [(0, " short"), (1, " short"), (2, " long one"),
                                                              (3, " long one")]
    completion = 2 * len(_words(tokenizer, " short")) + 2 * len(_words(tokenizer, " long one")) + 4  # + stop tokens
    assert r["usage"] == {"prompt_tokens": 83, "completion_tokens": completion, "total_tokens": 83 + completion}
    assert [c["text"] for c in httpx.post(url, json={"model": "stub", "prompt": short}, timeout=30).json()[
        "choices"]] == [" short"]
    texts = [tokenizer.decode(short[1:]), tokenizer.decode(long[1:])]  # as strings: encode adds the BOS again
    assert tokenizer.encode(texts[0]) == short and tokenizer.encode(texts[1]) == long
    r = httpx.post(url, json={"model": "stub", "prompt": texts, "max_tokens": 8}, timeout=30).json()
    assert [(c["index"], c["text"]) for c in r["choices"]] == [(0, " short"), (1, " long one")]
    events = _events(httpx.post(url, json={"model": "stub", "prompt": texts, "n": 2, "max_tokens": 8, "stream": True,
                                           "stream_options": {"include_usage": True}}, timeout=30))
    streamed = {}
    for e in events:
        for c in e["choices"]:
            streamed[c["index"]] = streamed.get(c["index"], "") + c["text"]
    assert streamed == {0: " short", 1: " short", 2: " long one", 3: " long one"}
    assert events[-1]["usage"]["prompt_tokens"] == 83
    for bad_prompt in ([], [[]], [short, 5], [[2, -1]], [[True]], [None], {"a": 1}):
        r = httpx.post(url, json={"model": "stub", "prompt": bad_prompt}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", (bad_prompt, r.text)
    r = httpx.post(url, json={"model": "stub", "prompt": [short] * 17, "n": 16}, timeout=30)
    assert r.status_code == 400 and "256 choices" in r.json()["error"]["message"]


def test_a_stop_string_at_once_gives_empty_text(stub):
    """The first token already holds a stop string: chat content is "" (not null, as vLLM), completion text ""."""
    from gemma4.processing.chat import openai_to_gemma_messages

    srv, model, tokenizer = stub
    messages = [{"role": "user", "content": "Say hello, stop at once"}]
    rendered = tokenizer.apply_chat_template(openai_to_gemma_messages(messages), add_generation_prompt=True,
                                             enable_thinking=False)
    model.scripts[len(_words(tokenizer, rendered))] = _words(tokenizer, "Hello there") + [106]
    model.scripts[120] = _words(tokenizer, "Hello there") + [106]
    chat = {"model": "stub", "messages": messages, "stop": ["Hel"]}
    choice = httpx.post(f"{srv.url}/v1/chat/completions", json=chat, timeout=30).json()["choices"][0]
    assert choice["message"]["content"] == "" and choice["finish_reason"] == "stop"
    deltas = [c["delta"] for e in _events(httpx.post(f"{srv.url}/v1/chat/completions", json=dict(chat, stream=True),
                                                      timeout=30)) for c in e["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == ""
    completion = {"model": "stub", "prompt": [2] + [100] * 119, "stop": "Hel"}
    choice = httpx.post(f"{srv.url}/v1/completions", json=completion, timeout=30).json()["choices"][0]
    assert choice["text"] == "" and choice["finish_reason"] == "stop"


def test_refused_fields(stub):
    """What cannot be applied is refused with a 400 naming the field: a json_schema without its schema, an unknown
    response_format type, a schema llguidance cannot compile, both response_format and structured_outputs, logit_bias
    keys that are no token ids or values out of [-100, 100]."""
    srv, _, _ = stub
    chat = {"model": "stub", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    completion = {"model": "stub", "prompt": "hi", "max_tokens": 2}
    cases = [("chat/completions", chat, "response_format", {"type": "json_schema", "json_schema": {"name": "x"}}),
             ("chat/completions", chat, "response_format", {"type": "yaml"}),
             ("completions", completion, "response_format", {"type": "json_schema", "json_schema": {
                 "name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}),
             ("completions", completion, "structured_outputs", {"regex": "[a-"}),
             ("completions", completion, "structured_outputs", {"json": {}, "whitespace_pattern": " "}),
             ("chat/completions", dict(chat, response_format={"type": "json_object"}), "structured_outputs",
              {"choice": ["a"]}),
             ("completions", completion, "logit_bias", {"x7": 5}),
             ("chat/completions", chat, "logit_bias", {"7": 101}), ("chat/completions", chat, "logit_bias",
                                                                    {"262144": 1})]
    for path, body, field, value in cases:
        r = httpx.post(f"{srv.url}/v1/{path}", json=dict(body, **{field: value}), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (path, field, r.text)
    r = httpx.post(f"{srv.url}/v1/completions", json=dict(completion, response_format={"type": "json_schema",
                   "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}))
    assert "minimum (5) is greater than maximum (1)" in r.json()["error"]["message"]
    for extra in ({"response_format": {"type": "text"}}, {"response_format": {"type": "json_object"}},
                  {"logit_bias": {"7": -100, "8": 100}}, {"structured_outputs": {"choice": ["yes", "no"]}}):
        r = httpx.post(f"{srv.url}/v1/completions", json=dict(completion, **extra), timeout=30)
        assert r.status_code == 200, (extra, r.text)


# --- CORS ------------------------------------------------------------------------------------------------------------
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


def test_cors(stub):
    """A browser's preflight is answered (any origin by default, as vLLM), before and without the API key; the
    API key still guards /v1/*, and its 401 carries the CORS header so the page can read it."""
    from starlette.testclient import TestClient

    srv, _, _ = stub
    state = srv.app.state.server
    r = httpx.options(f"{srv.url}/v1/chat/completions", headers={"Origin": "https://a.example", **PREFLIGHT})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    state.api_key = "sekret"
    try:
        r = httpx.options(f"{srv.url}/v1/chat/completions", headers={"Origin": "https://a.example", **PREFLIGHT})
        assert r.status_code == 200
        r = httpx.get(f"{srv.url}/v1/models", headers={"Origin": "https://a.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"
        r = httpx.get(f"{srv.url}/v1/models", headers={"Origin": "https://a.example",
                                                       "Authorization": "Bearer sekret"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    finally:
        state.api_key = None
    state.allowed_origins = ["https://a.example"]
    try:
        client = TestClient(create_app(state))
        r = client.options("/v1/completions", headers={"Origin": "https://a.example", **PREFLIGHT})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://a.example"
        assert client.options("/v1/completions", headers={"Origin": "https://b.example", **PREFLIGHT}
                              ).status_code == 400
    finally:
        state.allowed_origins = ["*"]


# --- /tokenize, /detokenize, /version --------------------------------------------------------------------------------
def test_tokenize_detokenize_version(stub):
    from gemma4.processing.chat import openai_to_gemma_messages

    srv, _, tokenizer = stub
    url = srv.url
    assert httpx.get(f"{url}/version").json() == {"version": __version__}
    r = httpx.post(f"{url}/tokenize", json={"prompt": "Hello world"}).json()
    ids = tokenizer.encode("Hello world")
    assert r == {"tokens": ids, "count": len(ids), "max_model_len": 2048, "token_strs": None}
    r = httpx.post(f"{url}/tokenize", json={"model": "stub", "prompt": "Hello world", "add_special_tokens": False,
                                            "return_token_strs": True}).json()
    assert r["tokens"] == ids[1:] and r["token_strs"] == [tokenizer.id_to_token(t) for t in ids[1:]]
    messages = [{"role": "user", "content": "Hi"}]
    for generation_prompt in (True, False):
        text = tokenizer.apply_chat_template(openai_to_gemma_messages(messages), enable_thinking=False,
                                             add_generation_prompt=generation_prompt)
        r = httpx.post(f"{url}/tokenize", json={"messages": messages, "add_generation_prompt": generation_prompt})
        assert r.json()["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids}).json() == {"prompt": tokenizer.decode(ids)}
    assert httpx.post(f"{url}/detokenize", json={"tokens": []}).json() == {"prompt": ""}
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]
    refused = [("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": "a", "messages": messages}, "prompt"),
               ("/tokenize", {"prompt": 5}, "prompt"), ("/tokenize", {"messages": []}, "messages"),
               ("/tokenize", {"messages": image}, "messages"), ("/detokenize", {}, "tokens"),
               ("/detokenize", {"tokens": "abc"}, "tokens"), ("/detokenize", {"tokens": [1.5]}, "tokens"),
               ("/detokenize", {"tokens": [True]}, "tokens"), ("/detokenize", {"tokens": [-1]}, "tokens"),
               ("/detokenize", {"tokens": [tokenizer.vocab_size]}, "tokens")]
    for path, body, param in refused:
        r = httpx.post(f"{url}{path}", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, body, r.text)
    assert httpx.post(f"{url}/tokenize", json={"model": "nope", "prompt": "a"}).status_code == 404
    state = srv.app.state.server
    state.api_key = "sekret"
    try:  # one rule, as vLLM: only /v1/* needs the key
        assert httpx.post(f"{url}/tokenize", json={"prompt": "a"}).status_code == 200
        assert httpx.get(f"{url}/version").status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401
    finally:
        state.api_key = None


def test_chat_stream_keeps_every_token_logprob(stub):
    """Streamed chat with logprobs: a token whose text the parser holds back (a thinking or tool-call marker in the
    making) still has its logprob sent, with the next delta: as many entries as completion tokens, as unstreamed."""
    from test_server import SCRIPT, TOOLS, _script
    srv, model, tokenizer = stub
    messages = [{"role": "user", "content": "Weather in Rome, with logprobs?"}]
    _script(model, tokenizer, messages, SCRIPT, 50)
    body = {"model": "stub", "messages": messages, "tools": TOOLS, "logprobs": True, "top_logprobs": 1,
            "chat_template_kwargs": {"enable_thinking": True}}
    whole = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=30).json()
    tokens = whole["usage"]["completion_tokens"]
    events = _events(httpx.post(f"{srv.url}/v1/chat/completions", json=dict(body, stream=True), timeout=30))
    streamed = [e for ev in events for c in ev["choices"] if c.get("logprobs") for e in c["logprobs"]["content"]]
    assert len(whole["choices"][0]["logprobs"]["content"]) == len(streamed) == tokens - 1  # the stop id has none
    assert [e["token"] for e in streamed] == [e["token"] for e in whole["choices"][0]["logprobs"]["content"]]


# --- vLLM's extra request parameters ---------------------------------------------------------------------------------
def _complete(srv, **body):
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": "stub", "max_tokens": 8, **body}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _chat_body(tokenizer, model, text, length, messages=None, **render):
    """A chat whose rendered prompt (add_generation_prompt unless `render` says) is scripted to answer `text`; the
    user's words pad it to about `length` tokens, apart from the other tests' scripts."""
    from gemma4.processing.chat import openai_to_gemma_messages
    messages = messages or [{"role": "user", "content": "word " * length}]
    render = {"add_generation_prompt": True, "enable_thinking": False, **render}
    rendered = tokenizer.apply_chat_template(openai_to_gemma_messages(messages), **render)
    if render.pop("continue_final_message", False):
        rendered = rendered.removesuffix("<turn|>\n")
    ids = _words(tokenizer, rendered)
    model.scripts[len(ids)] = _words(tokenizer, text) + [106]
    return {"model": "stub", "messages": messages, "max_tokens": 8}, len(ids)


def _chat(srv, body, status=200):
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    return r.json()


def _refused(srv, path, body, field, value):
    r = httpx.post(f"{srv.url}/v1/{path}", json=dict(body, **{field: value}), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, (path, field, value, r.text)


def test_stop_token_ids_and_include_stop_str(stub):
    """stop_token_ids end the output on those ids too (finish_reason stop, their text left out), besides the model's
    own; include_stop_str_in_output keeps the matched stop string, streamed or not."""
    srv, model, tokenizer = stub
    prompt = [2] + [100] * 299
    model.scripts[300] = _words(tokenizer, " one two three") + [106]
    two = _words(tokenizer, " two")[0]
    assert _complete(srv, prompt=prompt)["choices"][0]["text"] == " one two three"
    choice = _complete(srv, prompt=prompt, stop_token_ids=[two])["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (" one", "stop")
    body, _ = _chat_body(tokenizer, model, "one two three", 300)
    message = _chat(srv, dict(body, stop_token_ids=[two]))["choices"][0]
    assert (message["message"]["content"], message["finish_reason"]) == ("one", "stop")
    assert _chat(srv, dict(body, stop_token_ids=[]))["choices"][0]["message"]["content"] == "one two three"

    assert _complete(srv, prompt=prompt, stop=[" two"])["choices"][0]["text"] == " one"
    kept = dict(prompt=prompt, stop=[" tw", "zzz"], include_stop_str_in_output=True)
    assert _complete(srv, **kept)["choices"][0]["text"] == " one tw"
    events = _events(httpx.post(f"{srv.url}/v1/completions", json={"model": "stub", "stream": True, **kept}))
    assert "".join(c["text"] for e in events for c in e["choices"]) == " one tw"
    assert _chat(srv, dict(body, stop="two", include_stop_str_in_output=True))["choices"][0]["message"][
        "content"] == "one two"
    completion = {"model": "stub", "prompt": "hi", "max_tokens": 2}
    for value in ([-1], [262144], ["7"], [True], 7, [1.5]):
        _refused(srv, "completions", completion, "stop_token_ids", value)
    _refused(srv, "completions", completion, "include_stop_str_in_output", "yes")


def test_skip_special_tokens(stub):
    """Completions: skip_special_tokens true leaves special tokens out of the text (default false: kept, as before).
    Chat reads them to parse thinking and tool calls: true is accepted, false refused."""
    srv, model, tokenizer = stub
    prompt = [2] + [100] * 339
    model.scripts[340] = _words(tokenizer, " one") + [100] + _words(tokenizer, " two") + [106]
    assert _complete(srv, prompt=prompt)["choices"][0]["text"] == " one<|channel> two"
    assert _complete(srv, prompt=prompt, skip_special_tokens=True)["choices"][0]["text"] == " one two"
    body, _ = _chat_body(tokenizer, model, "Hi", 340)
    assert _chat(srv, dict(body, skip_special_tokens=True))["choices"][0]["message"]["content"] == "Hi"
    _refused(srv, "chat/completions", body, "skip_special_tokens", False)
    _refused(srv, "completions", {"model": "stub", "prompt": "hi"}, "skip_special_tokens", 1)


def test_add_generation_prompt_and_continue_final_message(stub):
    """add_generation_prompt false renders no model turn; continue_final_message leaves the assistant's last message
    open: the model goes on from it (its text is not repeated; the new text keeps its leading space, so that the two
    join); both true, or a last message that is not the assistant's, is a 400; so is chat's echo."""
    srv, model, tokenizer = stub
    base, length = _chat_body(tokenizer, model, "ignored", 380, add_generation_prompt=False)
    assert _chat(srv, dict(base, add_generation_prompt=False))["usage"]["prompt_tokens"] == length
    messages = [{"role": "user", "content": "word " * 420}, {"role": "assistant", "content": "Hello, I am"}]
    body, length = _chat_body(tokenizer, model, " Gemma.", 0, messages, add_generation_prompt=False,
                              continue_final_message=True)
    r = _chat(srv, dict(body, continue_final_message=True, add_generation_prompt=False))
    assert r["choices"][0]["message"]["content"] == " Gemma." and r["usage"]["prompt_tokens"] == length
    r = _chat(srv, dict(body, continue_final_message=True))  # add_generation_prompt not given: as vLLM
    assert r["choices"][0]["message"]["content"] == " Gemma."
    deltas = [c["delta"] for e in _events(httpx.post(f"{srv.url}/v1/chat/completions", json=dict(
        body, continue_final_message=True, stream=True), timeout=30)) for c in e["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == " Gemma."
    _refused(srv, "chat/completions", dict(body, add_generation_prompt=True), "continue_final_message", True)
    _refused(srv, "chat/completions", base, "continue_final_message", True)  # the user's message last
    _refused(srv, "chat/completions", base, "echo", True)
    _refused(srv, "chat/completions", base, "add_generation_prompt", "no")


@pytest.mark.parametrize("rule", [{"temperature": 0}, {"temperature": 0, "logprobs": 1}, {"temperature": 1}],
                         ids=["greedy-batched", "per-row", "sampled"])
def test_allowed_token_ids(stub, rule):
    """Only allowed_token_ids can be sampled, by the batched sampler, the per-row one (logprobs) and when sampling:
    the scripted token is not among them, so the only one allowed comes every step (even the stop id is out)."""
    srv, model, tokenizer = stub
    prompt = [2] + [100] * 459
    model.scripts[460] = _words(tokenizer, " one two three") + [106]
    two = _words(tokenizer, " two")[0]
    choice = _complete(srv, prompt=prompt, max_tokens=3, **rule)["choices"][0]
    assert choice["text"] == " one two three"
    choice = _complete(srv, prompt=prompt, max_tokens=3, allowed_token_ids=[two], **rule)["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (" two two two", "length")
    if "logprobs" in rule:  # the log-softmax within the allowed ids
        assert choice["logprobs"]["token_logprobs"] == [0.0, 0.0, 0.0]
    body, _ = _chat_body(tokenizer, model, "one", 460)
    body.update(rule, **({"logprobs": True} if "logprobs" in rule else {}))  # chat's logprobs: a boolean
    assert _chat(srv, body)["choices"][0]["message"]["content"] == "one"
    r = _chat(srv, dict(body, allowed_token_ids=[two], max_tokens=3))["choices"][0]
    assert (r["message"]["content"], r["finish_reason"]) == ("two two two", "length")
    completion = {"model": "stub", "prompt": "hi", "max_tokens": 2}
    for value in ([], [-1], [262144], "7", [None]):
        _refused(srv, "completions", completion, "allowed_token_ids", value)
    _refused(srv, "completions", dict(completion, response_format={"type": "json_object"}), "allowed_token_ids", [two])


def test_bad_words(stub):
    """bad_words, tokenized as written and after a space (as vLLM): the scripted " two" never comes, on completions
    and chat; the other tokens are the script's until then. Combined with a grammar: a 400 naming it."""
    srv, model, tokenizer = stub
    prompt = [2] + [100] * 459
    model.scripts[460] = _words(tokenizer, " one two three") + [106]
    two = _words(tokenizer, " two")[0]
    choice = _complete(srv, prompt=prompt, max_tokens=3, logprobs=1, bad_words=["two"])["choices"][0]
    assert choice["text"].startswith(" one") and " two" not in choice["text"]
    assert two not in [tokenizer.encode(t, add_special_tokens=False)[0] for t in choice["logprobs"]["tokens"]]
    body, _ = _chat_body(tokenizer, model, "one two", 460)
    r = _chat(srv, dict(body, bad_words=["two"], max_tokens=2))["choices"][0]
    assert r["message"]["content"].startswith("one") and "two" not in r["message"]["content"]
    completion = {"model": "stub", "prompt": "hi", "max_tokens": 2}
    _refused(srv, "completions", dict(completion, response_format={"type": "json_object"}), "bad_words", ["two"])


def test_truncate_prompt_tokens(stub):
    """truncate_prompt_tokens keeps the prompt's last n tokens (usage counts those; the model answers that
    prompt), on completions and chat; n longer than the prompt keeps it whole; n < 1 is a 400."""
    srv, model, tokenizer = stub
    model.scripts[500] = _words(tokenizer, " long") + [106]
    model.scripts[520] = _words(tokenizer, " short") + [106]
    prompt = [2] + [100] * 499
    r = _complete(srv, prompt=prompt, truncate_prompt_tokens=520)
    assert r["choices"][0]["text"] == " long" and r["usage"]["prompt_tokens"] == 500
    r = _complete(srv, prompt=[2] + [100] * 579, truncate_prompt_tokens=520)
    assert r["choices"][0]["text"] == " short" and r["usage"]["prompt_tokens"] == 520
    body, length = _chat_body(tokenizer, model, "ignored", 600)
    assert length > 520
    r = _chat(srv, dict(body, truncate_prompt_tokens=520))
    assert r["choices"][0]["message"]["content"] == "short" and r["usage"]["prompt_tokens"] == 520
    for value in (0, -2, 1.5, "5"):
        _refused(srv, "completions", {"model": "stub", "prompt": "hi"}, "truncate_prompt_tokens", value)


def test_truncate_prompt_tokens_minus_one_keeps_what_the_context_holds(stub):
    """truncate_prompt_tokens=-1 (vLLM): the prompt's last max_model_len - max_tokens tokens (one new token's room
    when max_tokens is not given), where the whole prompt would be refused as too long."""
    srv, model, tokenizer = stub
    limit = srv.app.state.server.max_model_len
    model.scripts[limit - 8] = _words(tokenizer, " cut") + [106]
    prompt = [2] + [100] * (limit + 50)
    _refused(srv, "completions", {"model": "stub", "max_tokens": 8}, "prompt", prompt)
    r = _complete(srv, prompt=prompt, max_tokens=8, truncate_prompt_tokens=-1)
    assert r["choices"][0]["text"] == " cut" and r["usage"]["prompt_tokens"] == limit - 8
    r = _complete(srv, prompt=prompt, max_tokens=None, truncate_prompt_tokens=-1)
    assert r["usage"]["prompt_tokens"] == limit - 1 and r["usage"]["completion_tokens"] == 1
    r = _complete(srv, prompt=[2, 100, 100], max_tokens=2, truncate_prompt_tokens=-1)
    assert r["usage"]["prompt_tokens"] == 3


def test_refused_vllm_fields(stub):
    """vLLM's parameters this server does not apply are a 400 naming them, not silently ignored; their no-op values
    pass."""
    srv, _, _ = stub
    completion = {"model": "stub", "prompt": "hi", "max_tokens": 2}
    for field, value in (("bad_words", [""]), ("bad_words", [3]), ("use_beam_search", True)):
        _refused(srv, "completions", completion, field, value)
        _refused(srv, "chat/completions", {"model": "stub", "messages": [{"role": "user", "content": "hi"}]},
                 field, value)
    _complete(srv, prompt="hi", bad_words=[], use_beam_search=False, spaces_between_special_tokens=True)
