"""The OpenAI-compatible server, driven by the official `openai` client over loopback."""

from __future__ import annotations

import json

import httpx2 as httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk
from openai.types.completion import Completion

from test_server_support import Server, serve_args, stub_app, write_checkpoint

from gemma4.processing.tokenizer import Tokenizer
from gemma4.server.cli import build_app_from_args


@pytest.fixture(scope="module")
def server(tmp_path_factory, gemma4_tokenizer_dir):
    directory = tmp_path_factory.mktemp("tiny")
    write_checkpoint(directory, gemma4_tokenizer_dir)
    srv = Server(build_app_from_args(serve_args(directory)))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client(timeout=60)


MSG = [{"role": "user", "content": "Hello there"}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_chat_plain_and_usage(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 1 <= r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_plain(client):
    plain = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == (plain.choices[0].message.content or "")
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [plain.choices[0].finish_reason]


def test_completions_n_seed_logprobs(client):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=7, n=2, logprobs=2)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert isinstance(a, Completion) and len(a.choices) == 2
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len(a.choices[0].logprobs.token_logprobs) == a.usage.completion_tokens // 2 or a.choices[0].logprobs
    stream = list(client.completions.create(**kw, stream=True))
    assert {c.choices[0].index for c in stream if c.choices} == {0, 1}


def test_stop_string(client):
    full = client.completions.create(model="tiny", prompt=[2, 100, 200], max_tokens=8, temperature=0)
    text = full.choices[0].text
    if len(text) < 3:
        pytest.skip("the random model wrote too little text")
    stop = text[1:3]
    cut = client.completions.create(model="tiny", prompt=[2, 100, 200], max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt=[2, 100, 200], max_tokens=8, temperature=0,
                                            stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut.choices[0].text


def test_errors(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi " * 2000}])
    assert "maximum context length" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSG, temperature=-1)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}])
    assert "vision" in e.value.message
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(f"{server.url}/v1/audio/transcriptions").status_code == 404


def test_metrics(server, client):
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("gemma4_requests_total", "gemma4_generation_tokens_total", "gemma4_num_requests_waiting",
                 "gemma4_kv_cache_usage_ratio", "gemma4_request_latency_seconds_bucket"):
        assert name in text


def test_api_key(tmp_path_factory, gemma4_tokenizer_dir):
    app, _ = stub_app(Tokenizer.from_pretrained(gemma4_tokenizer_dir))
    app.state.server.api_key = "sekret"
    srv = Server(app)
    try:
        bad = srv.client("wrong")
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = srv.client("sekret")
        assert good.models.list().data[0].id == "stub"
    finally:
        srv.stop()


# ------------------------------------------------------------------ reasoning and tools, with a scripted model
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}, "required": ["city"]}}}]
SCRIPT = ('<|channel>thought\nThe user wants the weather.<channel|>'
          '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>')


@pytest.fixture(scope="module")
def stub(gemma4_tokenizer_dir):
    tokenizer = Tokenizer.from_pretrained(gemma4_tokenizer_dir)
    app, model = stub_app(tokenizer)
    srv = Server(app)
    yield srv, model, tokenizer
    srv.stop()


def _script(model, tokenizer, messages, text, stop_id, thinking=True, tools=TOOLS):
    from gemma4.processing.chat import openai_to_gemma_messages
    prompt = tokenizer.apply_chat_template(openai_to_gemma_messages(messages), tools=tools,
                                           add_generation_prompt=True, enable_thinking=thinking)
    start = len(tokenizer.encode(prompt, add_special_tokens=False))
    model.scripts[start] = tokenizer.encode(text, add_special_tokens=False) + [stop_id]
    return prompt


def test_reasoning_and_tool_calls_end_to_end(stub):
    srv, model, tokenizer = stub
    client = srv.client("x")
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    _script(model, tokenizer, messages, SCRIPT, 50)
    kw = dict(model="stub", messages=messages, tools=TOOLS, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "The user wants the weather." == choice.message.reasoning
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.reasoning_content or "" for d in deltas if hasattr(d, "reasoning_content")) == \
        "The user wants the weather."
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls[0].id and calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The tool's result continues the conversation in Gemma's format.
    follow = messages + [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    prompt = _script(model, tokenizer, follow, "It is 21 degrees in Paris.", 106)
    assert '<|tool_response>response:get_weather{temperature:21}<tool_response|>' in prompt
    r2 = client.chat.completions.create(model="stub", messages=follow, tools=TOOLS,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert r2.choices[0].message.content == "It is 21 degrees in Paris." and r2.choices[0].finish_reason == "stop"


def test_tool_choice_named_forces_the_call(stub):
    """The named tool's grammar holds the answer to the call syntax: a scripted call of it comes through."""
    srv, model, tokenizer = stub
    client = srv.client("x")
    messages = [{"role": "user", "content": "Forced call please"}]
    _script(model, tokenizer, messages, '<|tool_call>call:get_weather{city:<|"|>Rome<|"|>}<tool_call|>', 50,
            thinking=False)
    r = client.chat.completions.create(model="stub", messages=messages, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert r.choices[0].finish_reason == "tool_calls"
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Rome"}


def test_load_test_script(server):
    import argparse
    import asyncio
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "load_test.py"
    spec = importlib.util.spec_from_file_location("load_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = argparse.Namespace(url=server.url, model=None, requests=8, concurrency=4, max_tokens=4, timeout=60)
    report = asyncio.run(module.main(args))
    assert report["requests"] == 8 and report["tokens_per_s"] > 0


def test_a_prompt_ending_inside_a_thought_channel(stub, monkeypatch):
    """Newer chat templates open `<|channel>thought\n` after the generation prompt (after tool results with
    thinking on): the answer starts inside the channel, so the server parses it with the prompt as prefix —
    reasoning stays reasoning and `<channel|>` is honoured, streamed and not."""
    from gemma4.processing.chat import openai_to_gemma_messages

    srv, model, tokenizer = stub
    render = tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template",
                        lambda *a, **k: render(*a, **k) + "<|channel>thought\n")
    messages = [{"role": "user", "content": "Are you thinking?"}]
    prompt = render(openai_to_gemma_messages(messages), add_generation_prompt=True,
                    enable_thinking=True) + "<|channel>thought\n"
    start = len(tokenizer.encode(prompt, add_special_tokens=False))
    model.scripts[start] = tokenizer.encode("Let me see.<channel|>Yes.", add_special_tokens=False) + [106]
    client = srv.client("x")
    kw = dict(model="stub", messages=messages, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    message = client.chat.completions.create(**kw).choices[0].message
    assert (message.content, message.reasoning_content) == ("Yes.", "Let me see.")
    deltas = [c.choices[0].delta for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Yes."
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Let me see."


def test_llm_and_server_give_the_same_greedy_tokens(tmp_path_factory, gemma4_tokenizer_dir):
    """One engine under both: the same checkpoint's greedy completion and chat answer through `gemma4.LLM` and
    through the server are the same text."""
    from gemma4.llm import LLM

    directory = tmp_path_factory.mktemp("same")
    write_checkpoint(directory, gemma4_tokenizer_dir)
    llm = LLM(directory, dtype="float32")
    srv = Server(build_app_from_args(serve_args(directory)))
    try:
        client = srv.client(timeout=60)
        for prompt in ("Once upon a time", "The capital of France is"):
            ours = llm.generate(prompt, {"temperature": 0.0, "max_tokens": 12}, skip_special_tokens=False)[0]
            served = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
            assert served.choices[0].text == ours.text and served.usage.completion_tokens >= len(ours.token_ids)
        messages = [{"role": "user", "content": "Hello there"}]
        reply = llm.chat(messages, params={"temperature": 0.0, "max_tokens": 12})
        served = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        assert served.choices[0].message.content == reply["content"]
    finally:
        srv.stop()
