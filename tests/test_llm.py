"""`gemma4.LLM` and the generate/chat CLI on a tiny random model with the real Gemma 4 vocabulary."""

import copy
import re
import shutil

import pytest

from gemma4 import Config, Model
from gemma4.cli import main as cli_main
from gemma4.llm import LLM
from gemma4.processing.detokenize import IncrementalText
from gemma4.random_init import randomize_
from reference import text_config_dict


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, gemma4_tokenizer_dir):
    data = copy.deepcopy(text_config_dict("31B"))
    data.update(vocab_size=262_144, vocab_size_per_layer_input=262_144)
    config = Config.from_dict(data)
    model = randomize_(Model(config), seed=5)
    path = tmp_path_factory.mktemp("tiny-full-vocab")
    model.save_pretrained(path, generation_config={"temperature": 1.0, "top_p": 0.95, "top_k": 64,
                                                   "eos_token_id": [1, 106, 50], "pad_token_id": 0})
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(gemma4_tokenizer_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint, dtype="float32")


GREEDY = {"temperature": 0.0, "max_tokens": 12}


def test_batching_does_not_change_greedy_results(llm):
    prompts = ["The capital of France is", [2, 818, 5279, 529], "Once upon a time, in a land far away,", "Hi"]
    together = llm.generate(prompts, GREEDY)
    for prompt, result in zip(prompts, together):
        alone = llm.generate(prompt, GREEDY)[0]
        assert alone.token_ids == result.token_ids
        assert alone.text == result.text
    assert together[1].prompt_tokens == 4


def test_stream_concatenates_to_generate(llm):
    streamed = "".join(llm.stream("Tell me a story", GREEDY))
    assert streamed == llm.generate("Tell me a story", GREEDY)[0].text


def test_incremental_text_never_splits_a_character(llm):
    text = "héllo 😀 世界 — ∑ ok"
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    stream = IncrementalText(llm.tokenizer)
    deltas = [stream.add(t) for t in ids] + [stream.finish()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_stop_strings(llm):
    free = llm.generate("Count: one two", {**GREEDY, "max_tokens": 16})[0]
    assert len(free.text) > 6
    stop = free.text[3:6]
    stopped = llm.generate("Count: one two", {**GREEDY, "max_tokens": 16, "stop": [stop]})[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    streamed = "".join(llm.stream("Count: one two", {**GREEDY, "max_tokens": 16, "stop": [stop]}))
    assert streamed == stopped.text


def test_seeded_sampling_and_logprobs(llm):
    params = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_tokens": 8, "seed": 11, "logprobs": 2}
    a, b = llm.generate(["Hello", "Hello"], params)
    assert a.token_ids == b.token_ids  # same seed, same tokens, whatever the batch
    assert len(a.logprobs) == len(a.token_ids) and len(a.logprobs[0].top) == 2


def test_chat_returns_a_parsed_turn(llm):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    reply = llm.chat([{"role": "user", "content": "Weather in Paris?"}], tools=tools, enable_thinking=True,
                     params=GREEDY)
    assert set(reply) >= {"role", "content", "reasoning_content", "tool_calls", "finish_reason", "usage"}
    assert reply["usage"]["completion_tokens"] <= 12


def test_defaults_and_errors(llm):
    assert (llm.default_params.temperature, llm.default_params.top_k) == (1.0, 64)
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        llm.generate("x", {"temprature": 0.1})
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate([[]], GREEDY)


def test_cli_generate(checkpoint, capsys):
    assert cli_main(["generate", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "5",
                     "--temperature", "0", "--dtype", "float32"]) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"\[\d+ prompt tokens, 5 new tokens in [\d.]+s, [\d.]+ tok/s after the first\]", summary)


def test_cli_missing_model(capsys):
    assert cli_main(["generate", "/no/such/dir", "--prompt", "x"]) == 1
    assert "no checkpoint directory" in capsys.readouterr().err


def test_cli_reports_a_failed_generation_in_one_line(checkpoint, capsys, monkeypatch):
    """A request the engine fails (here: NaN logits from the model) is a one-line error, not a traceback."""
    from gemma4.pretrained import Model

    forward = Model.forward
    # (logits, hidden states): the engine asks for both
    monkeypatch.setattr(Model, "forward", lambda self, *a, **k: tuple(x * float("nan") for x in forward(self, *a, **k)))
    assert cli_main(["generate", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "5",
                     "--temperature", "0", "--dtype", "float32"]) == 1
    err = capsys.readouterr().err
    assert "gemma4 generate: error: generation failed" in err and "NaN" in err and "Traceback" not in err


def test_chat_parses_with_the_prompt_as_prefix(llm, monkeypatch):
    """A prompt that ends inside an open thought channel: `LLM.chat` reads the answer from there."""
    from gemma4.llm import Completion

    prompt = llm.tokenizer.encode("<|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n", add_special_tokens=False)
    monkeypatch.setattr(llm, "chat_prompt", lambda *a, **k: prompt)
    monkeypatch.setattr(llm, "generate", lambda prompts, params, skip_special_tokens: [
        Completion("Hmm.<channel|>Hello!", [5, 6], "stop", len(prompts[0]))])
    reply = llm.chat([{"role": "user", "content": "Hi"}], enable_thinking=True)
    assert (reply["reasoning_content"], reply["content"]) == ("Hmm.", "Hello!")


def test_model_generate_shares_the_llms_engine(llm):
    """`llm.model.generate` runs on LLM's engine (no second KV pool beside it) and gives LLM's greedy tokens; LLM's
    next call prefills at its own step budget again."""
    import torch

    from gemma4.llm import PREFILL_BUDGET
    ids = [2, 818, 5279, 529]
    out = llm.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert llm.model.__dict__["_engine"].engine is llm.engine
    assert llm.engine.scheduler.budget != PREFILL_BUDGET  # Model.generate set its own
    assert llm.generate(ids, {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True})[0].token_ids == \
        out[0, len(ids):].tolist()
    assert llm.engine.scheduler.budget == PREFILL_BUDGET
