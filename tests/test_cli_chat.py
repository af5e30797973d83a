"""`gemma4 chat`: history, /reset, /exit, thinking shown but kept out of the history."""

import builtins

import pytest

from gemma4.cli import main as cli_main
from test_llm import checkpoint  # noqa: F401  (the tiny full-vocabulary checkpoint fixture)


def test_chat_session(checkpoint, monkeypatch, capsys):  # noqa: F811
    lines = iter(["Hello there", "/reset", "And again", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    prompts = []
    from gemma4 import llm as llm_module

    original = llm_module.LLM.chat_prompt

    def recording_chat_prompt(self, messages, *args, **kwargs):
        prompts.append([dict(m) for m in messages])
        return original(self, messages, *args, **kwargs)

    monkeypatch.setattr(llm_module.LLM, "chat_prompt", recording_chat_prompt)
    assert cli_main(["chat", str(checkpoint), "--system", "Be brief.", "--think", "--max-new-tokens", "4",
                     "--temperature", "0", "--dtype", "float32"]) == 0
    assert [m["role"] for m in prompts[0]] == ["system", "user"]
    # after /reset only the system prompt remains before the new user turn
    assert [m["role"] for m in prompts[1]] == ["system", "user"] and prompts[1][1]["content"] == "And again"
    assert "/reset" in capsys.readouterr().err


def test_chat_ends_on_eof(checkpoint, monkeypatch):  # noqa: F811
    def eof(prompt=""):
        raise EOFError
    monkeypatch.setattr(builtins, "input", eof)
    assert cli_main(["chat", str(checkpoint), "--dtype", "float32"]) == 0
