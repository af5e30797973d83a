"""Gemma 4 tokenizer: a thin, explicit wrapper around `tokenizers.Tokenizer`.

Loads `tokenizer.json` (the BPE model), `tokenizer_config.json` (bos/eos/pad names, whether bos is added,
multimodal token names) and the chat template (`chat_template.jinja`, `chat_template.json` or the config's
`chat_template` key) from a checkpoint directory or a Hugging Face hub id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers

# Files fetched from the hub: everything the tokenizer and the chat template need, nothing else.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json")

# Gemma 4 control tokens, by attribute stem: `tok.turn_start_id` is the id of "<|turn>".
# Multimodal names are read from tokenizer_config.json when present (see `_CONFIG_TOKEN_KEYS`).
GEMMA4_TOKENS = {
    "turn_start": "<|turn>", "turn_end": "<turn|>", "channel_start": "<|channel>", "channel_end": "<channel|>",
    "think": "<|think|>", "tool_start": "<|tool>", "tool_end": "<tool|>",
    "tool_call_start": "<|tool_call>", "tool_call_end": "<tool_call|>",
    "tool_response_start": "<|tool_response>", "tool_response_end": "<tool_response|>", "string_delimiter": '<|"|>',
    "image_start": "<|image>", "image_end": "<image|>", "image_token": "<|image|>",
    "audio_start": "<|audio>", "audio_end": "<audio|>", "audio_token": "<|audio|>", "video_token": "<|video|>",
}

# tokenizer_config.json key -> attribute stem above.
_CONFIG_TOKEN_KEYS = {
    "boi_token": "image_start", "eoi_token": "image_end", "image_token": "image_token",
    "boa_token": "audio_start", "eoa_token": "audio_end", "audio_token": "audio_token",
    "video_token": "video_token",
}

_BASIC_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")


def _token_content(value: Any) -> str | None:
    """Config entries are either a string or an AddedToken-like dict {"content": ...}."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def read_json_object(path: Path) -> dict:
    """A checkpoint's JSON config file, with a clear error when it is broken."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download it from the checkpoint.") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; re-download it from the checkpoint.")
    return data


def resolve_tokenizer_dir(path_or_repo: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a hub id (`org/name`) downloaded with only the tokenizer files."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists()
    if not looks_like_repo:
        raise FileNotFoundError(f"Tokenizer directory {text!r} does not exist: pass a checkpoint directory or a hub id "
                                "like 'google/gemma-4-E2B-it'.")
    from huggingface_hub import snapshot_download  # imported lazily: only hub ids need it

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=list(TOKENIZER_FILES)))
    except Exception as e:  # offline, unknown repo, gated model, ...
        raise FileNotFoundError(f"{text!r} is not a local directory and could not be fetched from the hub "
                                f"({type(e).__name__}: {e}); pass a checkpoint directory, or log in / go online "
                                "for a hub id.") from e


def _load_chat_template(directory: Path, config: dict) -> str | dict[str, str] | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = directory / "chat_template.json"
    if json_file.is_file():
        template = read_json_object(json_file).get("chat_template")
        if template is not None:
            return template
    template = config.get("chat_template")
    if isinstance(template, list):  # legacy multi-template form: [{"name": ..., "template": ...}, ...]
        return {entry["name"]: entry["template"] for entry in template}
    return template


class Tokenizer:
    """Gemma 4 tokenizer. Ids equal transformers' `AutoTokenizer` for the same files.

    Besides bos/eos/pad/unk_token(_id), every GEMMA4_TOKENS stem has an id attribute: `tok.turn_start_id` is the
    id of "<|turn>" (None when the vocabulary lacks it)."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict | None = None,
                 chat_template: str | dict[str, str] | None = None):
        self.backend = backend
        self.config = dict(config or {})
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = (
            self._config_token(f"{name}_token") for name in ("bos", "eos", "pad", "unk"))
        self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id = (
            self.token_to_id(token) if token else None
            for token in (self.bos_token, self.eos_token, self.pad_token, self.unk_token))
        extra = self.config.get("extra_special_tokens")
        layers = ({key: self._config_token(key) for key in _BASIC_SPECIAL_KEYS},
                  {k: _token_content(v) for k, v in extra.items()} if isinstance(extra, dict) else {},
                  {key: self._config_token(key) for key in _CONFIG_TOKEN_KEYS})
        # Named special tokens, as the chat template sees them (bos_token, eos_token, image_token, ...); a later
        # layer wins, an empty entry never does.
        self.special_tokens_map = {k: v for layer in layers for k, v in layer.items() if v}
        names = self.special_tokens_map
        config_names = {stem: names[key] for key, stem in _CONFIG_TOKEN_KEYS.items() if key in names}
        for stem, token in {**GEMMA4_TOKENS, **config_names}.items():
            setattr(self, f"{stem}_id", self.token_to_id(token))
        # transformers skips the special added tokens of tokenizer.json *and* the named special tokens of the
        # config (e.g. "<mask>", which tokenizer.json does not flag as special).
        self.special_ids = frozenset({tid for tid, tok in backend.get_added_tokens_decoder().items() if tok.special}
                                     | {self.token_to_id(t) for t in self.special_tokens_map.values()} - {None})

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, *, revision: str | None = None) -> Tokenizer:
        directory = resolve_tokenizer_dir(path_or_repo, revision)
        tokenizer_file, config_file = directory / "tokenizer.json", directory / "tokenizer_config.json"
        for file, hint in ((tokenizer_file, "point to a Gemma 4 checkpoint directory that contains it"),
                           (config_file, "copy it from the checkpoint next to tokenizer.json")):
            if not file.is_file():
                raise FileNotFoundError(f"No {file.name} in {directory}: {hint}.")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"Cannot load {tokenizer_file} ({e}); "
                             "re-download the checkpoint's tokenizer files.") from e
        config = read_json_object(config_file)
        special_map = directory / "special_tokens_map.json"
        if special_map.is_file():  # older checkpoints keep bos/eos names here; tokenizer_config.json wins
            config = {**read_json_object(special_map), **config}
        return cls(backend, config, _load_chat_template(directory, config))

    def _config_token(self, key: str) -> str | None:
        return _token_content(self.config.get(key))

    # -------------------------------------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    @property
    def stop_token_ids(self) -> list[int]:
        """Tokens that end a chat generation: eos, end of turn, and the start of a tool response
        (the model stops there and waits for the tool's result)."""
        ids = [self.eos_token_id, self.turn_end_id, self.tool_response_start_id]
        return list(dict.fromkeys(i for i in ids if i is not None))

    @property
    def padding_side(self) -> str:
        return self.config.get("padding_side", "left")

    # --------------------------------------------------------------------------------------- encode / decode
    def _with_bos_eos(self, add_special_tokens: bool) -> Callable[[list[int]], list[int]] | None:
        """With `add_bos_token` / `add_eos_token` in the config, they decide (rather than tokenizer.json's
        post-processor): the function that adds bos/eos to ids, else None."""
        if not add_special_tokens or ("add_bos_token" not in self.config and "add_eos_token" not in self.config):
            return None
        bos = [self.bos_token_id] if self.config.get("add_bos_token") and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if self.config.get("add_eos_token") and self.eos_token_id is not None else []
        return lambda ids: bos + ids + eos

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. "<|turn>") map to their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        wrap = self._with_bos_eos(add_special_tokens)
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens and not wrap).ids
        return wrap(ids) if wrap else ids

    def batch_encode(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        wrap = self._with_bos_eos(add_special_tokens)
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens and not wrap)
        return [wrap(e.ids) if wrap else e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):  # torch tensors and numpy arrays
            ids = ids.tolist()
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self.backend.decode(ids, skip_special_tokens=False)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    def __call__(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode(text, add_special_tokens=add_special_tokens)

    # --------------------------------------------------------------------------------------------- chat
    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template to render: an explicit one, else the checkpoint's (its "tool_use" variant when tools
        are given and the checkpoint ships named templates)."""
        if isinstance(self.chat_template, dict) and chat_template in self.chat_template:
            return self.chat_template[chat_template]  # a named template of the checkpoint
        template = chat_template if chat_template is not None else self.chat_template
        if isinstance(template, dict):
            key = "tool_use" if tools and "tool_use" in template else "default"
            if key not in template:
                raise ValueError(f"The checkpoint has chat templates {sorted(template)} but no 'default' one: "
                                 "pass chat_template=NAME.")
            return template[key]
        if not template:
            raise ValueError("This tokenizer has no chat template: pass chat_template=... or load a checkpoint with "
                             "chat_template.jinja.")
        return template

    def apply_chat_template(self, messages: Sequence[dict], tools: Sequence[dict | Any] | None = None,
                            add_generation_prompt: bool = True, tokenize: bool = False, enable_thinking: bool = False,
                            chat_template: str | None = None, **kwargs: Any) -> str | list[int]:
        """Render `messages` with the checkpoint's chat template, exactly as transformers does.

        Returns the prompt text, or its token ids with `tokenize=True` (the template writes `<bos>` itself,
        so no special tokens are added on encoding)."""
        from .chat import render_chat_template

        text = render_chat_template(self.get_chat_template(chat_template, tools), messages, tools=tools,
                                    add_generation_prompt=add_generation_prompt, special_tokens=self.special_tokens_map,
                                    enable_thinking=enable_thinking, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def parse_response(self, response: str | Iterable[int], *, prefix: str | Iterable[int] | None = None,
                       complete: bool = False) -> dict:
        """A generated answer (text, or token ids decoded with their special tokens) as an assistant message
        {"role", "content", "reasoning_content", "tool_calls"}; see `processing.parse.parse_response`.
        `prefix`: the prompt (text or ids) the answer continues, as in transformers' `parse_response`."""
        from .parse import parse_response

        def text(value):
            return value if isinstance(value, str) or value is None else self.decode(value, skip_special_tokens=False)

        return parse_response(text(response), prefix=text(prefix), complete=complete)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"

