"""The server's prompt log-probabilities, as lm-evaluation-harness and vLLM's clients read them: completions' `echo`
(the prompt's text and tokens before the output's, the first token's logprob null), scoring-only requests
(`max_tokens: 0`), vLLM's `prompt_logprobs` field on completions and chat; values equal the log-softmax of the served
model's own logits. A tiny random checkpoint with the real tokenizer, fp32 on the CPU."""

from __future__ import annotations

import json
from itertools import accumulate

import httpx2 as httpx
import pytest
import torch

from test_server_support import Server, serve_args, write_checkpoint

from gemma4.processing.chat import openai_to_gemma_messages
from gemma4.server.cli import build_app_from_args

TOL = 1e-4
PROMPT = "Question: what is the capital of France?\nAnswer: Paris"


@pytest.fixture(scope="module")
def served(tmp_path_factory, gemma4_tokenizer_dir):
    directory = tmp_path_factory.mktemp("tiny")
    write_checkpoint(directory, gemma4_tokenizer_dir)
    srv = Server(build_app_from_args(serve_args(directory)))
    yield srv, srv.app.state.server
    srv.stop()


def post(srv, path, body, status=200):
    r = httpx.post(f"{srv.url}/v1/{path}", json={"model": "tiny", **body}, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def reference(state, ids) -> torch.Tensor:
    """The log-softmax of the served model's logits at each position of `ids`, one full forward."""
    with torch.no_grad():
        return state.engine.engine.runner.model(torch.tensor([ids]))[0].log_softmax(-1)


def test_lm_eval_scoring_request(served):
    """lm-evaluation-harness's loglikelihood request (max_tokens 0, echo, logprobs 1), with the prompt as text and as
    token ids: the text is the prompt, the first token's logprob and top are null, the others the model's."""
    srv, state = served
    ids = state.tokenizer.encode(PROMPT)
    ref = reference(state, ids)
    for prompt, text in ((PROMPT, PROMPT), ([ids], state.tokenizer.decode(ids))):
        r = post(srv, "completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1,
                                      "temperature": 0})
        [choice] = r["choices"]
        lp = choice["logprobs"]
        assert choice["text"] == text and choice["finish_reason"] == "length"
        assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
        tokens = [state.tokenizer.decode([t]) for t in ids]
        assert lp["tokens"] == tokens
        assert lp["text_offset"] == list(accumulate((len(t) for t in tokens[:-1]), initial=0))
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        expected = torch.tensor([ref[i - 1, ids[i]].item() for i in range(1, len(ids))])
        torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), expected, rtol=0, atol=TOL)
        for i, top in enumerate(lp["top_logprobs"][1:], start=1):
            value, best = ref[i - 1].max(-1)
            [(token, logprob)] = top.items()
            assert token == state.tokenizer.decode([int(best)]) and abs(logprob - value.item()) <= TOL


def test_echo_with_generated_tokens(served):
    """max_tokens 2 (lm-eval's other form): the prompt, then the generated text; the logprobs those of the prompt
    then those of the same request without echo, text offsets past the prompt's text; streamed, the prompt comes
    with the first chunk and the whole equals the plain answer."""
    srv, state = served
    ids = state.tokenizer.encode(PROMPT)
    body = {"prompt": PROMPT, "max_tokens": 2, "logprobs": 1, "temperature": 0, "ignore_eos": True}
    plain = post(srv, "completions", body)["choices"][0]
    echoed = post(srv, "completions", dict(body, echo=True))["choices"][0]
    assert echoed["text"] == PROMPT + plain["text"]
    lp, plain_lp = echoed["logprobs"], plain["logprobs"]
    assert lp["tokens"][len(ids):] == plain_lp["tokens"] and len(plain_lp["tokens"]) == 2
    assert lp["token_logprobs"][len(ids):] == plain_lp["token_logprobs"]
    assert lp["top_logprobs"][len(ids):] == plain_lp["top_logprobs"]
    assert lp["text_offset"][len(ids):] == [len(PROMPT) + at for at in plain_lp["text_offset"]]
    prompt_only = post(srv, "completions", dict(body, max_tokens=0, echo=True))["choices"][0]["logprobs"]
    assert lp["token_logprobs"][:len(ids)] == prompt_only["token_logprobs"]
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny", **body, "echo": True, "stream": True},
                   timeout=60)
    chunks = [json.loads(line[6:])["choices"][0] for line in r.text.splitlines() if line.startswith("data: {")]
    assert chunks[0]["text"].startswith(PROMPT) and chunks[0]["logprobs"]["token_logprobs"][0] is None
    assert "".join(c["text"] for c in chunks) == echoed["text"]
    assert [v for c in chunks for v in c["logprobs"]["token_logprobs"]] == lp["token_logprobs"]
    assert [at for c in chunks for at in c["logprobs"]["text_offset"]] == lp["text_offset"]


def assert_vllm_prompt_logprobs(state, field, ids, k):
    """vLLM's prompt_logprobs: null for the first token, then {token id: {logprob, rank, decoded_token}} of the
    prompt token and the k most likely (ranks 1..k)."""
    ref = reference(state, ids)
    assert len(field) == len(ids) and field[0] is None
    for i, entry in enumerate(field[1:], start=1):
        row, own = ref[i - 1], str(ids[i])
        assert abs(entry[own]["logprob"] - row[ids[i]].item()) <= TOL
        # the rank counts the tokens at least as likely (itself too); those within TOL of it may go either way
        assert 1 + (row >= row[ids[i]] + TOL).sum() <= entry[own]["rank"] <= (row >= row[ids[i]] - TOL).sum()
        assert entry[own]["decoded_token"] == state.tokenizer.decode([ids[i]])
        values, best = row.topk(k)
        for rank, (token, value) in enumerate(zip(best.tolist(), values.tolist()), start=1):
            assert abs(entry[str(token)]["logprob"] - value) <= TOL and entry[str(token)]["rank"] == rank
        assert set(entry) == {own, *map(str, best.tolist())}


def test_prompt_logprobs_field(served):
    """vLLM's prompt_logprobs extension: per choice on completions (beside echo's logprobs, each with its own count
    of top tokens), once per response on chat (also with max_tokens 0: no answer, finish_reason length)."""
    srv, state = served
    ids = state.tokenizer.encode(PROMPT)
    [choice] = post(srv, "completions", {"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 2})["choices"]
    assert_vllm_prompt_logprobs(state, choice["prompt_logprobs"], ids, 2)
    assert "prompt_logprobs" not in post(srv, "completions", {"prompt": PROMPT, "max_tokens": 1})["choices"][0]
    # with echo's logprobs too: each keeps its own count
    [choice] = post(srv, "completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1,
                                         "prompt_logprobs": 3})["choices"]
    assert_vllm_prompt_logprobs(state, choice["prompt_logprobs"], ids, 3)
    assert all(len(top) == 1 for top in choice["logprobs"]["top_logprobs"][1:])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = state.tokenizer.apply_chat_template(openai_to_gemma_messages(messages), add_generation_prompt=True,
                                                   enable_thinking=False)
    chat_ids = state.tokenizer.encode(rendered, add_special_tokens=False)
    for max_tokens in (0, 2):
        r = post(srv, "chat/completions", {"messages": messages, "max_tokens": max_tokens, "prompt_logprobs": 0})
        assert r["usage"]["prompt_tokens"] == len(chat_ids)
        assert_vllm_prompt_logprobs(state, r["prompt_logprobs"], chat_ids, 0)
    assert r["usage"]["completion_tokens"] >= 1
    r = post(srv, "chat/completions", {"messages": messages, "max_tokens": 0, "prompt_logprobs": 0})
    assert r["choices"][0]["finish_reason"] == "length" and r["choices"][0]["message"]["content"] == ""
    assert r["usage"]["completion_tokens"] == 0


def test_bad_values_are_refused(served):
    """Out of range, the wrong type, with stream (as vLLM), chat's echo, max_tokens 0 without anything to score: a
    400 naming the field."""
    srv, _ = served
    completion = {"prompt": PROMPT, "max_tokens": 1}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for path, body in (("completions", completion), ("chat/completions", chat)):
        for field, value in [("prompt_logprobs", v) for v in (-1, 21, "2", True, 1.5, [1])] + [
                ("max_tokens", 0), ("max_tokens", -1)]:
            r = post(srv, path, dict(body, **{field: value}), status=400)
            assert r["error"]["param"] == field, (path, field, value, r)
        r = post(srv, path, dict(body, prompt_logprobs=1, stream=True), status=400)
        assert r["error"]["param"] == "prompt_logprobs"
    assert post(srv, "chat/completions", dict(chat, echo=True), status=400)["error"]["param"] == "echo"
    assert post(srv, "completions", dict(completion, echo=True, logprobs=21), status=400)["error"]["param"] == \
        "logprobs"
    assert post(srv, "completions", dict(completion, echo="yes"), status=400)["error"]["param"] == "echo"
