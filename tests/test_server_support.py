"""Shared fixtures of the server tests (no tests here): a tiny random checkpoint with the real tokenizer, a
scripted stub model, and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time

import httpx2 as httpx
import torch
import uvicorn
from torch import nn

from reference import text_config_dict

from gemma4.config import Config
from gemma4 import Model
from gemma4.random_init import randomize_
from gemma4.server.app import create_app
from gemma4.server.cli import add_serve_arguments, build_app_from_args
from gemma4.server.state import build_state

VOCAB = 262144
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tiny_config() -> Config:
    text = dict(text_config_dict("31B"), vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, num_hidden_layers=3,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    return Config.from_dict({"model_type": "gemma4", "text_config": text, "vision_config": None,
                             "audio_config": None, "eos_token_id": [1, 106]})


def write_checkpoint(directory, tokenizer_dir) -> None:
    model = randomize_(Model(tiny_config()), 0)
    model.save_pretrained(str(directory))
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, directory / name)


def serve_args(model_dir, *extra: str):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args([str(model_dir), "--dtype", "fp32", "--max-model-len", "1024",
                              "--served-model-name", "tiny", *extra])


NAN_TOKEN = -1  # in a script: that step's logits are NaN (a sequence that cannot be sampled)


class ScriptedModel(nn.Module):
    """Same forward signature as Model; its logits spell `scripts[start]` for a generation starting at position
    `start` (the prompt's length), then `<turn|>`. Ignores the cache."""

    def __init__(self):
        super().__init__()
        self.config = tiny_config()
        self.generation_config = {}
        self.anchor = nn.Parameter(torch.zeros(1))
        self.scripts: dict[int, list[int]] = {}
        self.dtype, self.device = torch.float32, torch.device("cpu")

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, last_only=False,
                return_hidden=False, score=None, **media):
        logits = torch.full((input_ids.shape[0], 1, VOCAB), -30.0)
        for row, position in enumerate(position_ids[:, -1].tolist()):
            target = position + 1
            starts = [s for s in self.scripts if s <= target]
            token = 106
            if starts:
                script = self.scripts[max(starts)]
                if target - max(starts) < len(script):
                    token = script[target - max(starts)]
            if token == NAN_TOKEN:
                logits[row] = float("nan")
            else:
                logits[row, 0, token] = 30.0
        out = (logits, torch.zeros(input_ids.shape[0], 1, 1)) if return_hidden else (logits,)
        if score is not None:  # prompt logprobs (Gemma4.score_tokens' shapes): each prompt token sure, rank 1
            _, targets, top = score
            count = len(targets)
            out += ((torch.zeros(count), torch.ones(count, dtype=torch.long), targets[:, None].repeat(1, top),
                     torch.zeros(count, top)),)
        return out if len(out) > 1 else out[0]


def stub_app(tokenizer):
    model = ScriptedModel()
    state = build_state(model, tokenizer, "stub", max_model_len=2048, max_num_seqs=8)
    return create_app(state), model


class Server:
    """A real uvicorn server in a thread on 127.0.0.1 and a free port."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "unused", **kwargs):
        """An OpenAI client of this server that never retries (a test sees each failure)."""
        import openai
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.app.state.server.engine.shutdown()
