"""Structured output: a grammar over token ids that a sequence's tokens must follow, through llguidance.

    params = SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object", ...}))

The engine never sees text: `GrammarCompiler` (made from the tokenizer's `tokenizer.json`) turns a request's
`StructuredOutputsParams` into a `GrammarMatcher` at `add_request` (a grammar that cannot be compiled is a ValueError
naming the problem). Each step, the runner asks each constrained sequence's matcher for the set of tokens allowed
next (`fill_masks`: one bit per token, computed on the host by llguidance), the samplers set every other token's
logit to -inf on the model's device (`sampling.apply_token_masks`), and the engine feeds the sampled token back to
the matcher. When the grammar is complete only the sequence's stop tokens are allowed: it ends there.

Why llguidance (not xgrammar): no Python dependencies (xgrammar 0.2.9 requires transformers, which gemma4 uses in
tests only), one abi3 wheel, a tokenizer built from `tokenizer.json` alone, JSON schemas, regexes and Lark grammars
(with special tokens by id, which Gemma's tool-call syntax needs), and masks computed on the host while the device
runs the step's forward.

A constrained sequence never runs ahead of the device (engine.py, "run ahead"): its next mask needs its last token
on the host, so the runner reads its token in the step that sampled it."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import numpy as np
import torch


@dataclass
class StructuredOutputsParams:
    """One constraint on what a request generates (vLLM's StructuredOutputsParams); exactly one of:

    json: a JSON schema (dict or JSON text); json_object: any JSON object; regex: the whole output matches it;
    choice: the output is one of these strings; grammar: a Lark grammar in llguidance's dialect (or GBNF).

    any_whitespace: JSON may hold whitespace between its tokens (llguidance's whitespace_flexible); off by default,
    so the JSON is compact and a model cannot pad it with whitespace forever.
    start_after: a token id; the grammar applies from the token after the first one the sequence generates (Gemma's
    `<channel|>`, which closes the thought channel when thinking is on). Before it the sequence is unconstrained."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    any_whitespace: bool = False
    start_after: int | None = None

    def __post_init__(self):
        if not isinstance(self.json_object, bool) or not isinstance(self.any_whitespace, bool):
            raise ValueError("structured_outputs.json_object and .any_whitespace must be booleans")
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, json_object, regex, choice, grammar; "
                             f"got {', '.join(given) or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (an object or its text), got "
                             f"{type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        if self.start_after is not None and (isinstance(self.start_after, bool)
                                             or not isinstance(self.start_after, int) or self.start_after < 0):
            raise ValueError(f"structured_outputs.start_after must be a token id, got {self.start_after!r}")

    @classmethod
    def from_value(cls, value: "StructuredOutputsParams | dict") -> "StructuredOutputsParams":
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams or a dict, got "
                             f"{type(value).__name__}")
        known = set(cls.__dataclass_fields__)
        if unknown := sorted(set(value) - known):
            raise ValueError(f"unknown structured_outputs field(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        return cls(**value)

    @property
    def kind(self) -> str:
        return next(name for name in ("json", "json_object", "regex", "choice", "grammar") if getattr(self, name))

    def texts(self):
        """Every string of the constraint (a schema's keys and values, the choices, the regex or grammar text)."""
        stack = [self.json if self.json is not None else self.choice or self.regex or self.grammar or ""]
        while stack:
            node = stack.pop()
            if isinstance(node, str):
                yield node
            elif isinstance(node, dict):
                stack += [*node.keys(), *node.values()]
            elif isinstance(node, (list, tuple)):
                stack += node

    def llguidance_grammar(self, forcing: bool = True) -> str:
        """The grammar in llguidance's input format. `forcing` False: as a Lark grammar with llguidance's
        no_forcing option, for grammars whose text spells a special token (see GrammarCompiler.compile)."""
        if self.json is not None or self.json_object:
            schema = {"type": "object"} if self.json_object else self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(schema, dict):
                raise ValueError("structured_outputs.json must be a JSON schema: an object")
            if forcing:
                return llguidance.LLMatcher.grammar_from_json_schema(
                    schema, defaults={"whitespace_flexible": self.any_whitespace})
            options = {"whitespace_flexible": self.any_whitespace, **schema.get("x-guidance", {})}
            lark = "start: %json " + json.dumps({**schema, "x-guidance": options})
        elif self.regex is not None:
            if forcing:
                return llguidance.grammar_from("regex", self.regex)
            lark = f"start: /{llguidance.regex_to_lark(self.regex)}/"
        elif self.choice is not None:
            lark = llguidance.grammar_from("choice", json.dumps(list(self.choice)))
        else:
            lark = llguidance.grammar_from("grammar", self.grammar)
        return lark if forcing else '%llguidance {"no_forcing": true}\n' + lark


_TOKENIZERS: dict[bytes, llguidance.LLTokenizer] = {}  # by tokenizer.json's digest: building one takes seconds
_TOKENIZERS_LOCK = threading.Lock()


def _llguidance_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    backend = getattr(tokenizer, "backend", tokenizer)  # gemma4's Tokenizer or a `tokenizers.Tokenizer`
    text = backend.to_str()
    key = hashlib.sha256(text.encode()).digest()
    with _TOKENIZERS_LOCK:
        if key not in _TOKENIZERS:
            # The EOS given here is llguidance's "end" token: the matcher clears it from every mask and allows the
            # sequence's own stop tokens instead (GrammarMatcher.fill).
            eos = getattr(tokenizer, "eos_token_id", None)
            _TOKENIZERS[key] = llguidance.LLTokenizer(text, eos_token=eos if eos is not None else 1)
        return _TOKENIZERS[key]


class GrammarCompiler:
    """Compiles StructuredOutputsParams into GrammarMatchers over one tokenizer's ids. The llguidance tokenizer is
    built at the first compile (seconds for Gemma's 262,144 tokens, once per process and tokenizer); compiled
    grammars are kept (least recently used first out), so the n choices of a request and repeated schemas compile
    once. Thread-safe: a server compiles off its event loop, the engine thread copies the compiled matcher."""

    CACHE_SIZE = 128

    def __init__(self, tokenizer):
        self._source = tokenizer
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._special_texts: re.Pattern | None = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = _llguidance_tokenizer(self._source)
        return self._tokenizer

    def _spells_special_token(self, spec: StructuredOutputsParams) -> bool:
        """Whether a string of `spec` holds the text of a special token. llguidance tokenizes text the grammar
        forces with the tokenizer, which reads such text as the special token, a token the grammar (text) then
        refuses; without forcing, the text is written with ordinary tokens."""
        if self._special_texts is None:
            backend = getattr(self._source, "backend", self._source)
            texts = [t.content for i, t in backend.get_added_tokens_decoder().items()
                     if self.tokenizer.is_special_token(i)]
            self._special_texts = re.compile("|".join(map(re.escape, sorted(texts, key=len, reverse=True))))
        return any(self._special_texts.search(text) for text in spec.texts())

    def compile(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The compiled grammar of `spec` (a matcher at its start; callers copy it). ValueError naming the problem
        when the grammar or schema cannot be compiled."""
        grammar = spec.llguidance_grammar(forcing=not self._spells_special_token(spec))
        with self._lock:
            if grammar in self._compiled:
                self._compiled.move_to_end(grammar)
                return self._compiled[grammar]
        tokenizer = self.tokenizer
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        matcher = None if error else llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher is not None and matcher.is_error():
            error = matcher.get_error()
        if error:
            raise ValueError(f"cannot compile the structured output's {spec.kind.replace('_', ' ')}: "
                             f"{error.strip()}")
        with self._lock:
            self._compiled[grammar] = matcher
            while len(self._compiled) > self.CACHE_SIZE:
                self._compiled.popitem(last=False)
        return matcher

    def matcher(self, spec: StructuredOutputsParams, stop_ids) -> GrammarMatcher:
        return GrammarMatcher(self.compile(spec).deep_copy(), self.tokenizer, frozenset(stop_ids), spec.start_after)


def mask_words(vocab_size: int) -> int:
    """int32 words of a token mask over `vocab_size` tokens (one bit per token, token t at bit t % 32 of word
    t // 32: llguidance's layout)."""
    return (vocab_size + 31) // 32


class GrammarMatcher:
    """One sequence's place in its grammar: the tokens allowed next (`fill`) and the tokens taken (`accept`)."""

    def __init__(self, matcher: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer, stop_ids: frozenset[int],
                 start_after: int | None = None):
        self.matcher, self.stop_ids, self.start_after = matcher, stop_ids, start_after
        self.started = start_after is None
        self.vocab_size = tokenizer.vocab_size
        self._grammar_eos = list(tokenizer.eos_tokens)
        self.error: str | None = None

    @property
    def active(self) -> bool:
        """Whether the next token is constrained (False before `start_after`, and once the sequence has failed)."""
        return self.started and self.error is None

    @property
    def complete(self) -> bool:
        """The grammar is satisfied: the sequence may (and, once nothing else fits, must) end on a stop token."""
        return self.started and self.matcher.is_accepting()

    @property
    def mask_words(self) -> int:
        """The int32 words llguidance writes a mask into."""
        return mask_words(self.vocab_size)

    def fill(self, words: np.ndarray) -> None:
        """Write the mask of the next token into `words` (int32 [>= self.mask_words]): the grammar's tokens, and the
        sequence's stop tokens where the grammar is complete, never llguidance's own EOS otherwise."""
        words[:] = 0
        self.matcher.unsafe_compute_mask_ptr(words.ctypes.data, self.mask_words * 4)
        self.finish(words)

    def finish(self, words: np.ndarray) -> None:
        """`fill` after llguidance wrote the grammar's tokens into `words`: the error, if any, and the stop tokens."""
        if self.matcher.is_error():
            self.error = self.matcher.get_error()
            return
        bits = words.view(np.uint32)
        for token in self._grammar_eos:
            bits[token >> 5] &= ~np.uint32(1 << (token & 31))
        if self.matcher.is_accepting():
            for token in self.stop_ids:
                if token >> 5 < len(bits):
                    bits[token >> 5] |= np.uint32(1 << (token & 31))

    def accept(self, token: int) -> None:
        """The sequence took `token` (a stop token ending a complete grammar is not fed to llguidance)."""
        if not self.started:
            self.started = token == self.start_after
        elif self.error is None and not (token in self.stop_ids and self.matcher.is_accepting()):
            if not self.matcher.consume_token(token):
                self.error = self.matcher.get_error() or f"token {token} does not follow the grammar"


class BadWords:
    """vLLM's bad_words as a token mask, in a sequence's matcher slot (so its row is masked, read each step and never
    run ahead, as a grammar's): a banned sequence of one token is never sampled; of several, its last token is not
    where the output so far ends with the rest."""

    def __init__(self, words: list[list[int]], vocab_size: int):
        self.words, self.vocab_size = words, vocab_size
        self.output: list[int] = []
        self.active, self.error = True, None

    @property
    def mask_words(self) -> int:
        return mask_words(self.vocab_size)

    def fill(self, words: np.ndarray) -> None:
        words[:] = -1
        bits = words.view(np.uint32)
        for word in self.words:
            *head, last = word
            if (not head or self.output[-len(head):] == head) and last >> 5 < len(bits):
                bits[last >> 5] &= ~np.uint32(1 << (last & 31))

    def accept(self, token: int) -> None:
        self.output.append(token)


def fill_masks(matchers: list[GrammarMatcher | BadWords | None], vocab_size: int) -> torch.Tensor | None:
    """The token masks of a step's rows, int32 [len(matchers), >= mask_words(vocab_size)] on the host (bit t of a
    row: token t may come next; bits past a tokenizer's vocabulary are 0), -1 (every token) for rows without an
    active matcher; None when no row has one. A matcher in error leaves its row empty (the runner fails it). Grammar
    rows are computed together, on llguidance's threads (outside the GIL)."""
    rows = [row for row, m in enumerate(matchers) if m is not None and m.active]
    if not rows:
        return None
    width = max(mask_words(vocab_size), *(matchers[row].mask_words for row in rows))
    words = np.full((len(matchers), width), -1, dtype=np.int32)
    together = [row for row in rows if isinstance(matchers[row], GrammarMatcher) and matchers[row].mask_words == width]
    if len(together) > 1:
        words[together] = 0
        _executor().unsafe_compute_mask_ptr([(matchers[row].matcher, row) for row in together], words.ctypes.data,
                                            width * 4, len(matchers))
        for row in together:
            matchers[row].finish(words[row])
    else:
        together = []
    for row in sorted(set(rows) - set(together)):
        matchers[row].fill(words[row])
    return torch.from_numpy(words)


@functools.cache
def _executor() -> llguidance.LLExecutor:
    """llguidance's thread pool for masks of several rows (a process-wide one, as its own helpers use)."""
    return llguidance.LLExecutor()
