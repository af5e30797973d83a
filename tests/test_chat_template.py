"""Chat template rendering: identical text and ids to transformers; OpenAI -> Gemma conversion; errors."""

import json

import pytest

from gemma4.processing.chat import (
    ChatTemplateError,
    collect_media,
    function_to_tool_schema,
    openai_to_gemma_messages,
    render_chat_template,
)
from gemma4.processing.tokenizer import Tokenizer

S = '<|"|>'

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Unit"},
                "days": {"type": "integer", "description": "Forecast days", "nullable": True},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search_flights",
        "description": "Search flights.",
        "parameters": {
            "type": "object",
            "properties": {
                "route": {
                    "type": "object",
                    "description": "Where",
                    "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
                    "required": ["from", "to"],
                },
                "passengers": {
                    "type": "array",
                    "description": "Travellers",
                    "items": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                        "required": ["name"],
                    },
                },
                "tags": {"type": "array", "items": {"type": "string"}},
                "max_price": {"type": "number", "nullable": True},
                "direct": {"type": "boolean"},
            },
            "required": ["route"],
        },
        "response": {"type": "object", "description": "Matching flights"},
    },
}
NO_PARAMS = {"type": "function", "function": {"name": "get_time", "description": "Current time."}}

CALL_WEATHER = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}

CONVERSATIONS = {
    "single_user": dict(messages=[{"role": "user", "content": "Hello!"}]),
    "system": dict(messages=[{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hi"}]),
    "developer": dict(messages=[{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]),
    "multi_turn": dict(
        messages=[
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ]
    ),
    "thinking_on": dict(messages=[{"role": "user", "content": "Why is the sky blue?"}], enable_thinking=True),
    "thinking_with_system": dict(
        messages=[{"role": "system", "content": "You are a physicist."}, {"role": "user", "content": "Why?"}],
        enable_thinking=True,
    ),
    "no_generation_prompt": dict(
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
        add_generation_prompt=False,
    ),
    "assistant_thinking_stripped": dict(
        messages=[
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "<|channel>thought\nsecret<channel|>Visible answer"},
            {"role": "user", "content": "Q2"},
        ]
    ),
    "tools_simple": dict(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER]),
    "tools_nested": dict(messages=[{"role": "user", "content": "Book"}], tools=[WEATHER, SEARCH, NO_PARAMS]),
    "tools_and_system_and_thinking": dict(
        messages=[{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Go"}],
        tools=[SEARCH],
        enable_thinking=True,
    ),
    "tool_call_and_response": dict(
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [CALL_WEATHER],
                "tool_responses": [{"name": "get_weather", "response": {"temp": 21, "sky": "clear"}}],
            },
        ],
        tools=[WEATHER],
    ),
    "tool_chain": dict(
        messages=[
            {"role": "user", "content": "Plan a trip"},
            {
                "role": "assistant",
                "reasoning_content": "First the weather.",
                "tool_calls": [CALL_WEATHER],
                "tool_responses": [{"name": "get_weather", "response": {"temp": 21}}],
            },
            {
                "role": "assistant",
                "reasoning_content": "Now flights.",
                "tool_calls": [
                    {
                        "function": {
                            "name": "search_flights",
                            "arguments": {
                                "route": {"from": "LHR", "to": "CDG"},
                                "passengers": [{"name": "Ann", "age": 30}],
                                "direct": True,
                                "max_price": None,
                                "tags": ["cheap", "morning"],
                            },
                        }
                    }
                ],
                "tool_responses": [{"name": "search_flights", "response": ["AF1", "BA2"]}],
            },
        ],
        tools=[WEATHER, SEARCH],
        enable_thinking=True,
    ),
    "tool_response_then_answer": dict(
        messages=[
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "tool_calls": [CALL_WEATHER],
                "tool_responses": [{"name": "get_weather", "response": "sunny"}],
                "content": "It is sunny.",
            },
            {"role": "user", "content": "Thanks"},
        ],
        tools=[WEATHER],
    ),
    "old_reasoning_dropped": dict(
        messages=[
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "reasoning_content": "old thoughts", "tool_calls": [CALL_WEATHER]},
            {"role": "user", "content": "Q2"},
        ],
        tools=[WEATHER],
    ),
    "string_arguments": dict(
        messages=[
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": "city:<|\"|>Rome<|\"|>"}}]},
        ],
        tools=[WEATHER],
    ),
    "image": dict(
        messages=[{"role": "user", "content": [{"type": "image", "url": "a.png"}, {"type": "text", "text": "Describe."}]}]
    ),
    "audio_video": dict(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Listen "},
                    {"type": "audio", "url": "a.wav"},
                    {"type": "video", "url": "v.mp4"},
                    {"type": "text", "text": " and watch"},
                ],
            }
        ]
    ),
    "template_like_text": dict(
        messages=[
            {"role": "user", "content": "{{ bos_token }} {% if x %}y{% endif %} <|turn>user\n<turn|> {#c#}"},
            {"role": "assistant", "content": "{{ raise_exception('no') }}"},
            {"role": "user", "content": "<|tool_call>call:x{}<tool_call|>"},
        ]
    ),
    "unicode_whitespace": dict(
        messages=[{"role": "system", "content": "\n\tsystème 😀\n"}, {"role": "user", "content": "  中文  \n\n  ру́сский 👍🏽 "}]
    ),
    "none_values_dropped": dict(
        messages=[
            {"role": "user", "content": "x", "name": None},
            {"role": "assistant", "content": None, "tool_calls": [CALL_WEATHER]},
        ],
        tools=[WEATHER],
    ),
    "model_role_and_mid_system": dict(
        messages=[
            {"role": "user", "content": "a"},
            {"role": "model", "content": "b"},
            {"role": "system", "content": "late system"},
            {"role": "user", "content": "c"},
        ]
    ),
    "parts_text_in_assistant": dict(
        messages=[
            {"role": "user", "content": [{"type": "text", "text": " hi "}]},
            {"role": "assistant", "content": [{"type": "text", "text": "<|channel>thought\nx<channel|> yo "}]},
            {"role": "user", "content": "again"},
        ],
        enable_thinking=True,
    ),
}


@pytest.fixture(scope="module")
def tokenizers_pair(gemma4_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_pretrained(gemma4_tokenizer_dir)
    reference = transformers.AutoTokenizer.from_pretrained(str(gemma4_tokenizer_dir))
    return ours, reference


def _reference_render(reference, case, tokenize):
    kwargs = dict(case)
    messages = kwargs.pop("messages")
    kwargs.setdefault("add_generation_prompt", True)
    if tokenize:
        return reference.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    return reference.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_matches_transformers(tokenizers_pair, name):
    ours, reference = tokenizers_pair
    case = CONVERSATIONS[name]
    kwargs = {k: v for k, v in case.items() if k != "messages"}
    text = ours.apply_chat_template(case["messages"], **kwargs)
    assert text == _reference_render(reference, case, tokenize=False)
    ids = ours.apply_chat_template(case["messages"], tokenize=True, **kwargs)
    assert ids == _reference_render(reference, case, tokenize=True)


def test_render_details(tokenizers_pair):
    ours, _ = tokenizers_pair
    text = ours.apply_chat_template(CONVERSATIONS["tool_call_and_response"]["messages"], tools=[WEATHER])
    assert f"<|tool_call>call:get_weather{{city:{S}Paris{S}}}<tool_call|>" in text
    assert text.endswith(f"<|tool_response>response:get_weather{{sky:{S}clear{S},temp:21}}<tool_response|><|channel>thought\n<channel|>")
    thinking = ours.apply_chat_template([{"role": "user", "content": "x"}], enable_thinking=True)
    assert thinking.startswith("<bos><|turn>system\n<|think|>") and thinking.endswith("<|turn>model\n")


# ------------------------------------------------------------------------------------ OpenAI conversion
OPENAI_TOOL_CONVERSATION = [
    {"role": "developer", "content": [{"type": "text", "text": "Be helpful."}]},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "reasoning_content": "Two cities.",
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome", "days": 2}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_b", "content": '{"temp": 25, "sky": "sunny"}'},
    {"role": "tool", "tool_call_id": "call_a", "content": "rainy, 12C"},
]


def test_openai_tool_conversation_converts():
    converted = openai_to_gemma_messages(OPENAI_TOOL_CONVERSATION)
    assert converted[0] == {"role": "system", "content": "Be helpful."}
    assistant = converted[2]
    assert [c["function"]["arguments"] for c in assistant["tool_calls"]] == [{"city": "Paris"}, {"city": "Rome", "days": 2}]
    assert assistant["reasoning_content"] == "Two cities."
    assert assistant["tool_responses"] == [
        {"name": "get_weather", "response": {"temp": 25, "sky": "sunny"}},
        {"name": "get_weather", "response": "rainy, 12C"},
    ]
    assert len(converted) == 3


def test_openai_tool_conversation_renders_as_one_model_turn(tokenizers_pair):
    ours, reference = tokenizers_pair
    converted = openai_to_gemma_messages(OPENAI_TOOL_CONVERSATION)
    text = ours.apply_chat_template(converted, tools=[WEATHER], enable_thinking=True)
    assert text == reference.apply_chat_template(converted, tools=[WEATHER], enable_thinking=True, tokenize=False, add_generation_prompt=True)
    assert text.endswith(
        "<|turn>model\n<|channel>thought\nTwo cities.<channel|>"
        f"<|tool_call>call:get_weather{{city:{S}Paris{S}}}<tool_call|>"
        f"<|tool_call>call:get_weather{{city:{S}Rome{S},days:2}}<tool_call|>"
        f"<|tool_response>response:get_weather{{sky:{S}sunny{S},temp:25}}<tool_response|>"
        f"<|tool_response>response:get_weather{{value:{S}rainy, 12C{S}}}<tool_response|>"
    )
    # The final answer joins the same model turn, as the model generated it.
    answered = openai_to_gemma_messages(OPENAI_TOOL_CONVERSATION + [{"role": "assistant", "content": "Rainy and sunny."}])
    assert answered[-1]["content"] == "Rainy and sunny." and len(answered) == 3
    text = ours.apply_chat_template(answered + [{"role": "user", "content": "Thanks"}], tools=[WEATHER])
    assert "<tool_response|>Rainy and sunny.<turn|>\n<|turn>user\nThanks<turn|>\n" in text


def test_openai_pre_call_text_and_chains(tokenizers_pair):
    ours, reference = tokenizers_pair
    messages = [
        {"role": "user", "content": "Weather then flights?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL_WEATHER | {"function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "tool_calls": [{"id": "c2", "function": {"name": "search_flights", "arguments": '{"route": {"from": "A", "to": "B"}}'}}]},
        {"role": "tool", "tool_call_id": "c2", "content": '{"flights": []}'},
        {"role": "assistant", "content": "Sunny, no flights."},
    ]
    converted = openai_to_gemma_messages(messages)
    assert [m["role"] for m in converted] == ["user", "assistant", "assistant"]
    assert "content" not in converted[1] and converted[2]["content"] == "Sunny, no flights."
    text = ours.apply_chat_template(converted, tools=[WEATHER, SEARCH], add_generation_prompt=False)
    assert text == reference.apply_chat_template(converted, tools=[WEATHER, SEARCH], tokenize=False)
    assert text.endswith(
        "<|turn>model\n<|tool_call>call:get_weather{}<tool_call|>"
        f"<|tool_response>response:get_weather{{value:{S}sunny{S}}}<tool_response|>"
        f"<|tool_call>call:search_flights{{route:{{from:{S}A{S},to:{S}B{S}}}}}<tool_call|>"
        "<|tool_response>response:search_flights{flights:[]}<tool_response|>Sunny, no flights.<turn|>\n"
    )


def test_openai_media_parts():
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
            ],
        }
    ]
    converted = openai_to_gemma_messages(messages)
    assert [p["type"] for p in converted[0]["content"]] == ["text", "image", "audio"]
    assert collect_media(converted) == [
        {"type": "image", "url": "data:image/png;base64,AAAA"},
        {"type": "audio", "data": "UklGRg==", "format": "wav"},
    ]


def test_openai_tool_name_fallbacks_and_errors():
    base = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [CALL_WEATHER | {"id": "z"}]}]
    by_name = openai_to_gemma_messages(base + [{"role": "tool", "name": "get_weather", "content": "1"}])
    assert by_name[-1]["tool_responses"] == [{"name": "get_weather", "response": "1"}]
    positional = openai_to_gemma_messages(base + [{"role": "tool", "tool_call_id": "unknown", "content": "[1, 2]"}])
    assert positional[-1]["tool_responses"] == [{"name": "get_weather", "response": [1, 2]}]
    with pytest.raises(ValueError, match="matches no earlier assistant tool call"):
        openai_to_gemma_messages([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "q", "content": "1"}])
    bad_json = [{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{city: Paris"}}]}]
    with pytest.raises(ValueError, match=r"messages\[0\]\.tool_calls\[0\]: arguments are not valid JSON"):
        openai_to_gemma_messages(bad_json)
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        openai_to_gemma_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="unsupported content part type 'file'"):
        openai_to_gemma_messages([{"role": "user", "content": [{"type": "file", "file": {}}]}])


# ---------------------------------------------------------------------------------------------- errors
TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"


def test_errors_are_clear():
    with pytest.raises(ValueError, match="unknown role 'wizard'"):
        render_chat_template(TEMPLATE, [{"role": "wizard", "content": "x"}])
    with pytest.raises(ValueError, match="empty conversation"):
        render_chat_template(TEMPLATE, [])
    with pytest.raises(ChatTemplateError, match="Only users may speak"):
        render_chat_template("{{ raise_exception('Only users may speak') }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="syntax error"):
        render_chat_template("{% if %}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="TypeError"):
        render_chat_template("{{ 'a' + 1 }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):  # the sandbox blocks Python internals
        render_chat_template("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [{"role": "user", "content": "x"}])
    assert issubclass(ChatTemplateError, ValueError)


@pytest.mark.parametrize(
    "tool, message",
    [
        ("get_weather", "must be a dict or a function"),
        ({"name": "f", "parameters": {}}, "wrap it as"),
        ({"type": "function", "function": {"description": "no name"}}, "non-empty string 'name'"),
        ({"type": "function", "function": {"name": "f", "parameters": []}}, "'parameters' must be a JSON-schema object"),
        ({"type": "function", "function": {"name": "f", "parameters": {"properties": [1]}}}, "properties' must be an object"),
        ({"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": "str"}}}}, "property 'a' must be a schema"),
        ({"type": "function", "function": {"name": "f", "parameters": {"required": "a"}}}, "'parameters.required' must be a list"),
        ({"type": "retrieval", "function": {"name": "f"}}, "only 'function' tools"),
    ],
)
def test_malformed_tool_schema(tool, message):
    with pytest.raises(ValueError, match=message):
        render_chat_template(TEMPLATE, [{"role": "user", "content": "x"}], tools=[tool])


def test_template_environment_matches_transformers_semantics():
    template = (
        "{{ {'b': 'é', 'a': [1, none]} | tojson }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true, indent=1) }}|"
        "{% set ns = namespace(n=0) %}{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}|{{ dict(x=1)['x'] }}|{{ strftime_now('%Y') | length }}|"
        "{% generation %}gen{% endgeneration %}\n  {% if true %}\n    kept\n  {% endif %}\n"
    )
    out = render_chat_template(template, [{"role": "user", "content": "x"}])
    assert out == '{"b": "é", "a": [1, null]}|{\n "a": 2,\n "b": 1\n}|3|1|4|gen    kept\n'
    with pytest.raises(ChatTemplateError, match="underscore"):
        render_chat_template("{% set ns = namespace(_x=1) %}", [{"role": "user", "content": "x"}])


def test_callable_tools():
    def get_weather(city: str, days: int | None = None) -> str:
        """Current weather for a city.

        Args:
            city: City name, e.g. Paris
            days: Forecast days
        """

    schema = function_to_tool_schema(get_weather)
    assert schema["function"]["name"] == "get_weather"
    assert schema["function"]["parameters"]["required"] == ["city"]
    assert schema["function"]["parameters"]["properties"]["days"] == {"type": "integer", "nullable": True, "description": "Forecast days"}
    out = render_chat_template("{{ tools[0]['function']['description'] }}", [{"role": "user", "content": "x"}], tools=[get_weather])
    assert out == "Current weather for a city."


def test_render_is_independent_of_inputs_objects():
    class Image:  # a rich object in a media part must not reach the sandbox
        def save(self, path):
            raise AssertionError("template called a method on user data")

    messages = [{"role": "user", "content": [{"type": "image", "image": Image()}]}]
    out = render_chat_template("{{ messages[0]['content'][0]['image'] }}", messages)
    assert out == "<Image>"
    json.dumps(messages[0]["content"][0]["type"])  # the caller's messages are not modified
