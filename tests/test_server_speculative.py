"""The server and `gemma4.LLM` with a drafter (speculative decoding: engine/speculative.py), where one engine step
emits several tokens of a sequence: streamed and plain answers, stop strings, stop tokens and max_tokens inside an
accepted run, logprobs, n > 1, and reasoning / tool-call parsing, against the same requests without a drafter.

Drafts come from an oracle (the target's own greedy continuation, or the scripted model's script), so that runs of
several tokens are accepted; each test checks that they were."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from test_server import SCRIPT, TOOLS, _script
from test_server_support import ScriptedModel, Server, serve_args, tiny_config, write_checkpoint

from gemma4.assistant_checkpoint import assistant_config_for, random_assistant, save_assistant
from gemma4.engine.engine import LLMEngine
from gemma4.engine.sampling import SamplingParams
from gemma4.processing.tokenizer import Tokenizer
from gemma4.server.app import create_app
from gemma4.server.cli import build_app_from_args
from gemma4.server.state import build_state

K = 3  # drafts per step: an accepted run is up to 4 tokens


def drafter():
    config = assistant_config_for(tiny_config().text_config, num_layers=1, hidden_size=32, intermediate_size=64)
    return random_assistant(config, dtype=torch.float32, seed=1)


def greedy_oracle(model):
    """Drafts from the target's greedy continuation of each prompt, computed once per prompt by an engine without a
    drafter: every draft of a greedy request is accepted."""
    engine = LLMEngine(model, max_num_seqs=1, max_model_len=512, num_blocks=64, enable_prefix_caching=False)
    reference: dict[tuple, list[int]] = {}
    params = SamplingParams(max_tokens=64, temperature=0, stop_token_ids=[])

    def oracle(seq):
        prompt = tuple(seq.prompt_ids)
        if prompt not in reference:
            reference[prompt] = engine.generate([list(prompt)], params)[0]
        return reference[prompt][len(seq.output_ids):]
    return oracle


class StepLog:
    """Wraps an LLMEngine's step: per step, the number of tokens each sequence got in it."""

    def __init__(self, engine: LLMEngine):
        self.engine, self.steps = engine, []
        step = engine.step

        def logged():
            outputs = step()
            runs: dict[int, int] = {}
            for out in outputs:
                if out.token is not None:
                    runs[out.seq_id] = runs.get(out.seq_id, 0) + 1
            self.steps.append(runs)
            return outputs
        engine.step = logged

    def longest_run(self) -> int:
        """The most tokens one sequence got in one step since the last call, once the engine is idle (a request that
        ended on a stop string may still be running a step when its answer comes back)."""
        deadline = time.monotonic() + 10
        while self.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)
        longest = max((n for runs in self.steps for n in runs.values()), default=0)
        self.steps.clear()
        return longest


def both(servers, run: int = K + 1, **kw):
    """The completion of `kw` by the server without a drafter, then by the one with it, whose longest accepted run
    must be `run` tokens (so that the comparison is not vacuous)."""
    plain, spec, log = servers
    ref = plain.completions.create(**kw)
    log.longest_run()
    got = spec.completions.create(**kw)
    assert log.longest_run() == run
    return ref, got


# --- a random tiny checkpoint: the same requests with and without a drafter ------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, gemma4_tokenizer_dir):
    directory = tmp_path_factory.mktemp("tiny")
    write_checkpoint(directory, gemma4_tokenizer_dir)
    save_assistant(drafter(), directory / "drafter")
    return directory


@pytest.fixture(scope="module")
def servers(checkpoint):
    """(without a drafter, with one: its StepLog)."""
    plain = Server(build_app_from_args(serve_args(checkpoint)))
    spec = Server(build_app_from_args(serve_args(checkpoint, "--speculative-model", str(checkpoint / "drafter"),
                                                 "--num-speculative-tokens", str(K))))
    engine = spec.app.state.server.engine.engine
    engine.speculator.oracle = greedy_oracle(engine.runner.model)
    yield plain.client(timeout=60), spec.client(timeout=60), StepLog(engine)
    plain.stop()
    spec.stop()


PROMPT = [2, 100, 200, 300]
GREEDY = dict(model="tiny", temperature=0, extra_body={"ignore_eos": True})
MESSAGES = [{"role": "user", "content": "Hello there"}]


def streamed(chunks) -> tuple[dict, list]:
    """A completions stream -> ({choice index: text}, chunks)."""
    chunks, texts = list(chunks), {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    return texts, chunks


def test_completions_stream_plain_and_no_drafter_agree_with_logprobs(servers):
    """Greedy: the streamed chunks joined, the plain answer and the answer without a drafter are the same text;
    each token's logprob and top logprobs equal those without a drafter (fp32 rounding)."""
    _, spec, log = servers
    kw = dict(GREEDY, prompt=PROMPT, max_tokens=14, logprobs=2)
    ref, got = both(servers, **kw)
    texts, chunks = streamed(spec.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert log.longest_run() == K + 1
    assert got.choices[0].text == texts[0] == ref.choices[0].text
    assert got.choices[0].finish_reason == ref.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == chunks[-1].usage.completion_tokens == ref.usage.completion_tokens == 14
    ours, theirs = got.choices[0].logprobs, ref.choices[0].logprobs
    assert ours.tokens == theirs.tokens and len(ours.tokens) == 14 and ours.text_offset == theirs.text_offset
    torch.testing.assert_close(ours.token_logprobs, theirs.token_logprobs, rtol=0, atol=1e-4)
    for mine, ref_top in zip(ours.top_logprobs, theirs.top_logprobs):
        assert mine.keys() == ref_top.keys() and len(mine) == 2
        torch.testing.assert_close(list(mine.values()), list(ref_top.values()), rtol=0, atol=1e-4)
    streamed_lp = [lp for c in chunks for choice in c.choices if choice.logprobs
                   for lp in choice.logprobs.token_logprobs]
    assert streamed_lp == ours.token_logprobs


def test_chat_stream_with_logprobs_and_usage(servers):
    plain, spec, log = servers
    kw = dict(GREEDY, messages=MESSAGES, max_tokens=10, logprobs=True, top_logprobs=3)
    ref = plain.chat.completions.create(**kw)
    got = spec.chat.completions.create(**kw)
    chunks = list(spec.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert log.longest_run() == K + 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == got.choices[0].message.content == ref.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens == ref.usage.completion_tokens == 10
    streamed_lp = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    for ours in (got.choices[0].logprobs.content, streamed_lp):
        assert len(ours) == 10
        for mine, theirs in zip(ours, ref.choices[0].logprobs.content):
            assert mine.token == theirs.token and len(mine.top_logprobs) == 3
            assert [t.token for t in mine.top_logprobs] == [t.token for t in theirs.top_logprobs]
            assert abs(mine.logprob - theirs.logprob) < 1e-4


def test_a_stop_string_inside_an_accepted_run(servers):
    """The stop string starts at the 3rd token, which an accepted run of 4 tokens holds (the 1st comes from the
    prefill): the text ends right before it, finish_reason "stop", and usage counts the tokens up to the one that
    completed it, as without a drafter, streamed or not."""
    plain, spec, _ = servers
    kw = dict(GREEDY, prompt=PROMPT, max_tokens=12, logprobs=0)
    full = plain.completions.create(**kw).choices[0]
    text, offsets = full.text, full.logprobs.text_offset
    at = next(j for j in (2, 3) if offsets[j + 1] > offsets[j] and text.find(text[offsets[j]]) == offsets[j])
    stop = text[offsets[at]:offsets[at + 1] + 1]  # this token's text and the next one's first character
    assert text.find(stop) == offsets[at]
    ref, got = both(servers, **kw, stop=[stop])
    texts, chunks = streamed(spec.completions.create(**kw, stop=[stop], stream=True,
                                                     stream_options={"include_usage": True}))
    assert got.choices[0].text == texts[0] == ref.choices[0].text == text[:offsets[at]]
    assert got.choices[0].finish_reason == ref.choices[0].finish_reason == "stop"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert got.usage.completion_tokens == chunks[-1].usage.completion_tokens == ref.usage.completion_tokens == at + 2
    assert got.choices[0].logprobs.tokens == ref.choices[0].logprobs.tokens


@pytest.mark.parametrize("max_tokens", [2, 5, 7])
def test_max_tokens_ends_an_accepted_run(servers, max_tokens):
    """No token past max_tokens: the last run is cut to it (1 from the prefill, then runs of up to 4)."""
    kw = dict(GREEDY, prompt=PROMPT, max_tokens=max_tokens, logprobs=0)
    ref, got = both(servers, min(max_tokens - 1, K + 1), **kw)
    assert got.choices[0].text == ref.choices[0].text and got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == len(got.choices[0].logprobs.tokens) == max_tokens


def test_n_choices(servers):
    """n = 2, greedy: both choices are the text without a drafter; seeded sampling: each choice reproduces itself,
    streamed or not."""
    _, spec, _ = servers
    kw = dict(GREEDY, prompt=PROMPT, max_tokens=9, n=2)
    ref, got = both(servers, **kw)
    assert [c.text for c in got.choices] == [ref.choices[0].text] * 2
    assert got.usage.completion_tokens == 18
    texts, chunks = streamed(spec.completions.create(**kw, stream=True))
    assert texts == {0: ref.choices[0].text, 1: ref.choices[0].text}
    sampled = dict(model="tiny", prompt=PROMPT, max_tokens=9, n=2, temperature=1.0, seed=5,
                   extra_body={"ignore_eos": True, "top_k": 64})
    once = spec.completions.create(**sampled)
    texts, _ = streamed(spec.completions.create(**sampled, stream=True))
    assert texts == {c.index: c.text for c in once.choices} and once.choices[0].text != once.choices[1].text
    assert once.usage.completion_tokens == 18


def test_llm_stop_strings_inside_an_accepted_run(checkpoint):
    """`LLM.generate` and `LLM.stream` with a drafter: a stop string inside an accepted run ends the text, the token
    ids and the logprobs where the drafter-less LLM ends them."""
    from gemma4 import LLM

    plain = LLM(checkpoint, dtype=torch.float32, device="cpu", max_model_len=256)
    fast = LLM(checkpoint, dtype=torch.float32, device="cpu", max_model_len=256,
               speculative_model=checkpoint / "drafter", num_speculative_tokens=K)
    fast.engine.speculator.oracle = greedy_oracle(fast.model)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    full = plain.generate(PROMPT, params, skip_special_tokens=False)[0]
    pieces = [plain.tokenizer.decode(full.token_ids[:n], skip_special_tokens=False) for n in range(13)]
    at = next(j for j in (2, 3) if pieces[j + 1] != pieces[j] and full.text.find(pieces[j + 1][len(pieces[j]):])
              == len(pieces[j]))
    stop = pieces[at + 1][len(pieces[at]):]  # the whole text of token `at`
    cut = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0, stop=[stop])
    ref = plain.generate(PROMPT, cut, skip_special_tokens=False)[0]
    got = fast.generate(PROMPT, cut, skip_special_tokens=False)[0]
    assert ref.text == pieces[at] and ref.finish_reason == "stop" and len(ref.token_ids) == at + 1
    assert (got.text, got.token_ids, got.finish_reason) == (ref.text, ref.token_ids, ref.finish_reason)
    assert [x.token_id for x in got.logprobs] == ref.token_ids
    usage, plain_usage = {}, {}
    assert "".join(fast.stream(PROMPT, cut, False, usage)) == "".join(plain.stream(PROMPT, cut, False, plain_usage))
    assert usage == plain_usage
    assert fast.engine.speculator.num_accepted >= 2 * K


# --- a scripted model: stop tokens, reasoning and tool calls -----------------------------------------------------
class ScriptedVerifier(ScriptedModel):
    """ScriptedModel that also verifies drafts: every position's logits when asked (not only the last), hidden states
    of the model's width, and the token embedding the drafter reads (zeros)."""

    def __init__(self):
        super().__init__()
        self.width = self.config.text_config.hidden_size
        self.text = nn.Module()
        self.text.embed_tokens = lambda ids: torch.zeros(*ids.shape, self.width)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, last_only=False,
                return_hidden=False, **media):
        ends = [input_ids.shape[1]] if last_only else range(1, input_ids.shape[1] + 1)
        scripted = super().forward
        logits = torch.cat([scripted(input_ids[:, :end], position_ids=position_ids[:, :end]) for end in ends], dim=1)
        return (logits, torch.zeros(*logits.shape[:2], self.width)) if return_hidden else logits

    def token_at(self, position: int) -> int:
        """The token the script puts at `position`."""
        return int(super().forward(torch.zeros(1, 1, dtype=torch.long), position_ids=torch.tensor([[position - 1]]))
                   .argmax())


@pytest.fixture(scope="module")
def scripted(gemma4_tokenizer_dir):
    """(a client of the scripted model without a drafter, one with a drafter, the model, tokenizer, StepLog)."""
    tokenizer = Tokenizer.from_pretrained(gemma4_tokenizer_dir)
    model = ScriptedVerifier()  # one model under both engines: it is stateless but for its scripts
    plain = Server(create_app(build_state(model, tokenizer, "stub", max_model_len=2048, max_num_seqs=8)))
    state = build_state(model, tokenizer, "stub", max_model_len=2048, max_num_seqs=8, speculative_model=drafter(),
                        num_speculative_tokens=K)
    engine = state.engine.engine
    engine.speculator.oracle = lambda seq: [model.token_at(len(seq) + j) for j in range(K)]
    spec = Server(create_app(state))
    yield plain.client("x"), spec.client("x"), model, tokenizer, StepLog(engine)
    plain.stop()
    spec.stop()


def test_reasoning_and_tool_calls_streamed(scripted):
    """The reasoning and the tool call arrive in runs of 4 tokens: streamed and not, they parse as they do one
    token at a time (test_server.py), and the stop token after the call ends the answer."""
    _, client, model, tokenizer, log = scripted
    messages = [{"role": "user", "content": "Weather in Paris, quickly?"}]
    _script(model, tokenizer, messages, SCRIPT, 50)
    kw = dict(model="stub", messages=messages, tools=TOOLS,
              extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    r = client.chat.completions.create(**kw)
    assert log.longest_run() == K + 1
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.reasoning_content == "The user wants the weather."
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert r.usage.completion_tokens == len(tokenizer.encode(SCRIPT, add_special_tokens=False)) + 1
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert log.longest_run() == K + 1
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "The user wants the weather."
    assert "".join(d.content or "" for d in deltas) == ""
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_stop_token_and_stop_string_inside_accepted_runs(scripted, stream):
    """<turn|> (a stop token) in the middle of a run ends the answer on it; a stop string inside a run cuts the
    text before it, usage counting the tokens up to the one that completed it: as without a drafter."""
    plain, spec, model, tokenizer, log = scripted
    messages = [{"role": "user", "content": "Say something short"}]
    answer = "Sure: the answer is forty two, as always."
    _script(model, tokenizer, messages, answer, 106, thinking=False, tools=None)
    ids = tokenizer.encode(answer, add_special_tokens=False)
    assert len(ids) % (K + 1) != 0  # the stop token is not the first of a run

    def ask(client, **kw):
        if not stream:
            r = client.chat.completions.create(model="stub", messages=messages, **kw)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
        chunks = list(client.chat.completions.create(model="stub", messages=messages, stream=True,
                                                     stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage.completion_tokens

    log.longest_run()
    assert ask(spec, max_tokens=50) == ask(plain, max_tokens=50) == (answer, "stop", len(ids) + 1)
    assert log.longest_run() == K + 1
    # The token that completes "forty" is not the last of its run (the 1st token, then runs of 4): the tokens
    # after it came in the same step.
    upto = next(n for n in range(len(ids)) if "forty" in tokenizer.decode(ids[:n]))
    assert upto % (K + 1) != 1
    text, reason, used = ask(spec, max_tokens=50, stop=["forty"])
    assert (text, reason, used) == ask(plain, max_tokens=50, stop=["forty"])
    assert text.rstrip() == "Sure: the answer is" and reason == "stop" and used == upto
    assert log.longest_run() == K + 1
