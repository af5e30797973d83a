"""The server's structured outputs and OpenAI parameters (docs/serving.md, "Request parameters"): response_format
json_object / json_schema, tool_choice required / named / none, parallel_tool_calls, logit_bias, and each chat
parameter vLLM accepts, through the official `openai` client, on a random tiny model with Gemma's vocabulary (a
grammar makes the output parse whatever the weights) and on a scripted one."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from test_server import _script
from test_server_support import Server, stub_app
from test_structured_output import model as narrow_model  # noqa: F401 (the fixture)

from gemma4.llm import LLM
from gemma4.processing.tokenizer import Tokenizer
from gemma4.server.app import create_app
from gemma4.server.state import build_state

MESSAGES = [{"role": "user", "content": "Describe a city."}]
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "size": {"type": "integer", "minimum": 0, "maximum": 999},
    "kind": {"enum": ["town", "city", "village"]}, "tags": {"type": "array", "items": {"type": "boolean"},
                                                             "minItems": 1, "maxItems": 3}},
    "required": ["name", "kind", "tags"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                         "units": {"enum": ["C", "F"]}},
        "required": ["city", "units"]}}},
    {"type": "function", "function": {"name": "set_alarm", "parameters": {
        "type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                         "loud": {"type": "boolean"}}, "required": ["hour"]}}},
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def tokenizer(gemma4_tokenizer_dir):
    return Tokenizer.from_pretrained(gemma4_tokenizer_dir)


@pytest.fixture(scope="module")
def server(narrow_model, tokenizer):  # noqa: F811
    state = build_state(narrow_model, tokenizer, "tiny", max_model_len=1024, max_num_seqs=16,
                        max_num_batched_tokens=1024)
    srv = Server(create_app(state))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client(timeout=120)


@pytest.fixture(scope="module")
def stub(tokenizer):
    app, model = stub_app(tokenizer)
    srv = Server(app)
    yield srv, model, srv.client("x", timeout=60)
    srv.stop()


# --- response_format -------------------------------------------------------------------------------------------------
def test_json_schema_chat_plain_and_streamed(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=response_format, n=3,
                                       temperature=1.0, seed=4, max_tokens=120)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    chunks = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=response_format,
                                            temperature=1.0, seed=5, max_tokens=120, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), SCHEMA)


def test_json_object_and_vllm_structured_outputs_on_completions(client):
    r = client.completions.create(model="tiny", prompt="JSON:", max_tokens=200, temperature=1.0, seed=1,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].finish_reason in ("stop", "length")
    if r.choices[0].finish_reason == "stop":  # an object without bounds may not end within max_tokens
        assert isinstance(json.loads(r.choices[0].text), dict)
    r = client.completions.create(model="tiny", prompt="Pick:", max_tokens=20, temperature=1.0, seed=2, n=4,
                                  extra_body={"structured_outputs": {"choice": ["alpha", "beta gamma"]}})
    assert all(c.text in ("alpha", "beta gamma") and c.finish_reason == "stop" for c in r.choices)
    r = client.completions.create(model="tiny", prompt="Code:", max_tokens=20, temperature=1.0, seed=3,
                                  extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}})
    assert len(r.choices[0].text) == 6 and r.choices[0].text[3] == "-"


# --- tool_choice -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parallel", [True, False])
def test_tool_choice_required_always_yields_a_declared_call(client, parallel):
    for seed in range(4):
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=parallel, temperature=1.0, seed=seed,
                                           max_tokens=200)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        assert parallel or len(choice.message.tool_calls) == 1
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_tool_choice_named_streamed(client):
    chunks = list(client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, temperature=1.0, seed=9, max_tokens=200, stream=True,
        tool_choice={"type": "function", "function": {"name": "set_alarm"}}))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert {tc.function.name for tc in calls if tc.function.name} == {"set_alarm"}
    first = "".join(tc.function.arguments or "" for tc in calls if tc.index == 0)
    jsonschema.validate(json.loads(first), PARAMETERS["set_alarm"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_errors(client):
    with pytest.raises(openai.BadRequestError) as e:  # two constraints on one answer
        client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                       response_format={"type": "json_object"})
    assert e.value.body["param"] == "tool_choice"
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 9, "maximum": 1}}, "required": ["n"]}}}]
    with pytest.raises(openai.BadRequestError) as e:  # a schema the grammar cannot hold
        client.chat.completions.create(model="tiny", messages=MESSAGES, tools=bad, tool_choice="required")
    assert e.value.body["param"] == "tools" and "minimum" in e.value.message


def test_tool_choice_none_forbids_the_call_token(stub, tokenizer):
    """The scripted model writes a call; with tool_choice none its first token (`<|tool_call>`) is banned, so
    no call comes back."""
    srv, model, client = stub
    messages = [{"role": "user", "content": "Call it anyway"}]
    script = '<|tool_call>call:get_weather{city:<|"|>Rome<|"|>}<tool_call|>'
    _script(model, tokenizer, messages, script, 50, thinking=False, tools=None)
    none = client.chat.completions.create(model="stub", messages=messages, tools=TOOLS, tool_choice="none",
                                          max_tokens=40)
    assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason != "tool_calls"
    assert "<|tool_call>" not in none.choices[0].message.content
    _script(model, tokenizer, messages, script, 50, thinking=False, tools=TOOLS)
    auto = client.chat.completions.create(model="stub", messages=messages, tools=TOOLS, max_tokens=40)
    assert auto.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_parallel_tool_calls_false_returns_one_call(stub, tokenizer):
    srv, model, client = stub
    # a prompt far longer than the other scripted ones: the stub's scripts are keyed by where they start
    messages = [{"role": "user", "content": "Two calls: " + "the weather and an alarm, " * 40}]
    script = ('<|tool_call>call:get_weather{city:<|"|>Rome<|"|>,units:<|"|>C<|"|>}<tool_call|>'
              '<|tool_call>call:set_alarm{hour:7}<tool_call|>')
    _script(model, tokenizer, messages, script, 50, thinking=False, tools=TOOLS)
    kw = dict(model="stub", messages=messages, tools=TOOLS, max_tokens=80)
    assert len(client.chat.completions.create(**kw).choices[0].message.tool_calls) == 2
    one = client.chat.completions.create(**kw, parallel_tool_calls=False).choices[0].message.tool_calls
    assert [c.function.name for c in one] == ["get_weather"]
    chunks = list(client.chat.completions.create(**kw, parallel_tool_calls=False, stream=True))
    names = [tc.function.name for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])
             if tc.function.name]
    assert names == ["get_weather"]


def test_thinking_then_the_schema(stub, tokenizer):
    """Thinking on: the thought is free, the answer after `<channel|>` follows the schema."""
    srv, model, client = stub
    messages = [{"role": "user", "content": "Yes or no?"}]
    _script(model, tokenizer, messages, "<|channel>thought\nHmm, <b>maybe</b>.<channel|>Perhaps!", 106,
            thinking=True, tools=None)
    r = client.chat.completions.create(
        model="stub", messages=messages, max_tokens=40, extra_body={"chat_template_kwargs": {"enable_thinking": True}},
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {"enum": ["yes", "no"]}}})
    message = r.choices[0].message
    assert message.reasoning_content == "Hmm, <b>maybe</b>." and json.loads(message.content) in ("yes", "no")


# --- the OpenAI chat parameters (docs/serving.md's table) -------------------------------------------------------------
def test_logit_bias_in_both_samplers(client, tokenizer):
    """+100 on one token makes greedy (batched sampler) and greedy with logprobs (row sampler) write only it."""
    [token] = tokenizer.encode("blue", add_special_tokens=False)
    for extra in ({}, {"logprobs": True, "top_logprobs": 2}):
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0,
                                           logit_bias={str(token): 100}, **extra)
        assert r.choices[0].message.content == "blue" * 4


def test_each_chat_parameter(client):
    base = dict(model="tiny", messages=MESSAGES, max_tokens=6)
    # n, seed
    a = client.chat.completions.create(**base, n=3, temperature=1.0, seed=11)
    b = client.chat.completions.create(**base, n=3, temperature=1.0, seed=11)
    assert len(a.choices) == 3 and [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    # logprobs / top_logprobs
    r = client.chat.completions.create(**base, temperature=0, logprobs=True, top_logprobs=3)
    assert all(len(x.top_logprobs) == 3 for x in r.choices[0].logprobs.content)
    # stop
    full = client.chat.completions.create(**base, temperature=0).choices[0].message.content
    if len(full) >= 3:
        cut = client.chat.completions.create(**base, temperature=0, stop=[full[1:3]]).choices[0]
        assert cut.message.content == full[:1] and cut.finish_reason == "stop"
    # penalties: accepted in range, refused out of it
    for name, value in (("presence_penalty", 1.5), ("frequency_penalty", -1.0)):
        assert client.chat.completions.create(**base, temperature=0, **{name: value}).choices
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**base, **{name: 2.5})
    assert client.chat.completions.create(**base, temperature=0, extra_body={"repetition_penalty": 1.3}).choices
    # max_completion_tokens wins over max_tokens
    nine = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=9, temperature=0)
    two = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=9, max_completion_tokens=2,
                                         temperature=0)
    assert two.usage.completion_tokens == min(2, nine.usage.completion_tokens)
    # stream_options.include_usage
    plain = client.chat.completions.create(**base, temperature=0)
    chunks = list(client.chat.completions.create(**base, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens and not chunks[-1].choices
    # user: accepted, not used
    assert client.chat.completions.create(**base, user="someone").choices


# --- gemma4.LLM -------------------------------------------------------------------------------------------------------
def test_llm_generate_and_chat_with_a_schema(narrow_model, gemma4_tokenizer_dir, monkeypatch):  # noqa: F811
    llm = LLM(narrow_model, tokenizer=gemma4_tokenizer_dir, max_batch_size=4, max_model_len=512)
    params = {"structured_outputs": {"json": SCHEMA}, "max_tokens": 120, "temperature": 1.0, "top_k": 64}
    for completion in llm.generate(["A city:", "Another city:"], params):
        jsonschema.validate(json.loads(completion.text), SCHEMA)
    reply = llm.chat(MESSAGES, params=params)
    jsonschema.validate(json.loads(reply["content"]), SCHEMA)
    added = []
    add = llm.engine.add_request
    monkeypatch.setattr(llm.engine, "add_request", lambda ids, p, *a: added.append(p) or add(ids, p, *a))
    llm.chat(MESSAGES, params={**params, "max_tokens": 3}, enable_thinking=True)
    assert added[-1].structured_outputs.start_after == llm.tokenizer.channel_end_id
