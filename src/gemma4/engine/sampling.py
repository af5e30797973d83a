"""Sampling: per-request parameters and a pure function from logits to the next token.

Order of operations (as in transformers and vLLM): the token mask (a structured output's, or bad_words'),
allowed_token_ids and logit_bias -> penalties -> temperature -> top-k -> top-p -> min-p -> draw. Logprobs reported
are those of the model's distribution (log-softmax of the logits before penalties and temperature, as vLLM reports
them), within the token mask and after logit_bias. Prompt logprobs are the model's raw distribution (no mask, no
logit_bias: they score tokens nobody sampled), as vLLM's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import kernels
from .structured import StructuredOutputsParams

# Gemma 4's generation_config.json: temperature 1.0, top_p 0.95, top_k 64; stop on <eos>, <turn|>, <|tool_response>.
GEMMA4_DEFAULTS = {"temperature": 1.0, "top_p": 0.95, "top_k": 64}
GEMMA4_STOP_IDS = (1, 106, 50)

# Below this a temperature is greedy (as vLLM's _SAMPLING_EPS): logits / 1e-40 overflow fp32 to inf, and softmax
# then gives NaN. A top_p below MIN_TOP_P keeps the most likely token alone either way (any token of a 262,144-way
# distribution has mass >= 1/262,144 when it is the most likely), but below fp32's range it would read as 0 and
# drop every token; it is raised to MIN_TOP_P.
MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-6
MAX_LOGPROBS = 20  # the most tokens logprobs and prompt_logprobs report at a position besides their own (vLLM's)


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # transformers' rule, over prompt and output
    presence_penalty: float = 0.0  # OpenAI's rules, over the output
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # None: the checkpoint's own stop ids
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: plus the top n
    # vLLM's prompt_logprobs: None: none; 0: each prompt token's own (the first has none); n: plus the top n there.
    # With them max_tokens may be 0: the request scores its prompt and ends (finish_reason "length").
    prompt_logprobs: int | None = None
    min_tokens: int = 0
    # Keep each step's processed scores / raw logits row [V] on the Sequence (Model.generate's output_scores /
    # output_logits); such a row takes the per-row sampler.
    output_scores: bool = False
    output_logits: bool = False
    # token id -> a number added to its logit, as OpenAI's logit_bias ([-100, 100]; -inf bans the token)
    logit_bias: dict[int, float] | None = None
    # vLLM's allowed_token_ids: only these ids may be sampled (every other logit is -inf)
    allowed_token_ids: list[int] | None = None
    # vLLM's bad_words, as token sequences (the server tokenizes the words): none is ever completed in the output (its
    # last token is banned where the output ends with the rest; structured.BadWords)
    bad_words: list[list[int]] | None = None
    # a grammar the output must follow (structured.py); a dict is read as StructuredOutputsParams' fields
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.logit_bias is not None:
            self.logit_bias = _checked_logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            if not _token_ids(self.allowed_token_ids):
                raise ValueError(f"allowed_token_ids must be a non-empty list of token ids, got "
                                 f"{self.allowed_token_ids!r}")
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.bad_words is not None:
            words = self.bad_words
            if not isinstance(words, (list, tuple)) or not all(_token_ids(word) for word in words):
                raise ValueError(f"bad_words must be a list of non-empty token id sequences, got {words!r}")
            self.bad_words = [list(word) for word in words] or None
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_value(self.structured_outputs)
            if self.bad_words is not None:
                raise ValueError("bad_words cannot be combined with structured_outputs (the grammar decides which "
                                 "tokens may come)")
            if self.allowed_token_ids is not None:
                raise ValueError("allowed_token_ids cannot be combined with structured_outputs: both constrain the "
                                 "tokens")
            if self.min_tokens:
                raise ValueError("min_tokens cannot be combined with structured_outputs: the grammar decides where "
                                 "the output ends")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        scoring = 0 if self.prompt_logprobs is not None else 1  # max_tokens 0: the prompt is scored, nothing more
        for name, kind, least in (("max_tokens", "a positive integer (0 only with prompt_logprobs)", scoring),
                                  ("min_tokens", "a non-negative integer", 0),
                                  ("top_k", "a non-negative integer (0 = off)", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be {kind}, got {value!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        # repetition_penalty divides seen logits: a tiny one overflows fp32.
        ranges = {"temperature": (0, 100), "min_p": (0, 1), "repetition_penalty": (0.01, 100),
                  "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2), "logprobs": (0, MAX_LOGPROBS),
                  "prompt_logprobs": (0, MAX_LOGPROBS)}
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be None or an integer, got {value!r}")
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
        if self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0
        self.top_p = max(self.top_p, MIN_TOP_P)

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingParams":
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - names):
            raise ValueError(f"unknown sampling parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**data)

    @classmethod
    def defaults_for(cls, checkpoint_dir: str | Path | None, **overrides) -> "SamplingParams":
        """The checkpoint's generation_config.json defaults, then `overrides`."""
        values = dict(GEMMA4_DEFAULTS)
        path = Path(checkpoint_dir, "generation_config.json") if checkpoint_dir else None
        if path is not None and path.is_file():
            config = json.loads(path.read_text())
            values = {k: config[k] for k in ("temperature", "top_p", "top_k") if k in config}
            if not config.get("do_sample", True):
                values["temperature"] = 0.0
        return cls.from_dict({**values, **overrides})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _token_ids(ids) -> bool:
    """Whether `ids` is a non-empty list (or tuple) of token ids: non-negative integers, not booleans."""
    return isinstance(ids, (list, tuple)) and bool(ids) and \
        all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)


def _checked_logit_bias(bias) -> dict[int, float]:
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
    checked = {}
    for token, value in bias.items():
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {token!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or \
                not (-100 <= value <= 100 or value == float("-inf")):
            raise ValueError(f"logit_bias values must be numbers in [-100, 100] (or -inf: banned), got {value!r} "
                             f"for token {token}")
        checked[token] = float(value)
    return checked


def apply_token_masks(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """logits [B, V] with -inf where the rows' token masks (int32 [B, W >= V / 32] on logits' device, bit t % 32 of
    word t // 32 for token t: structured.fill_masks) forbid a token; a new tensor."""
    batch, vocab = logits.shape
    # Little-endian words: byte j of word w holds tokens 32w + 8j .. 32w + 8j + 7, bit k of it token 8(4w + j) + k.
    masks = masks.contiguous().view(torch.uint8)
    known = min(vocab, masks.shape[1] * 8)
    if masks.device.type == "cpu":  # numpy's unpacking is a few times faster than the shifts on a CPU
        import numpy as np
        allowed = torch.from_numpy(np.unpackbits(masks.numpy(), axis=1, count=known, bitorder="little"))
    else:
        shifts = torch.arange(8, dtype=torch.uint8, device=logits.device)
        allowed = ((masks.unsqueeze(-1) >> shifts) & 1).view(batch, -1)[:, :known]
    if known < vocab:  # tokens past the tokenizer's vocabulary are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - known))
    return torch.where(allowed.view(torch.bool), logits, float("-inf"))


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [B, V] plus each row's logit_bias (ids past the vocabulary are ignored); a new tensor when any row
    has one."""
    vocab = logits.shape[1]
    entries = [(row, token, value) for row, p in enumerate(params) if p.logit_bias
               for token, value in p.logit_bias.items() if token < vocab]
    if not entries:
        return logits
    rows, tokens, values = zip(*entries)
    index = torch.tensor([rows, tokens], dtype=torch.long).to(logits.device, non_blocking=True)
    values = torch.tensor(values, dtype=logits.dtype).to(logits.device, non_blocking=True)
    return logits.index_put((index[0], index[1]), values, accumulate=True)


def apply_allowed_tokens(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [B, V] with -inf at every token outside a row's allowed_token_ids (ids past the vocabulary are
    ignored); a new tensor when any row has them."""
    if all(p.allowed_token_ids is None for p in params):
        return logits
    vocab = logits.shape[1]
    entries = [(row, token) for row, p in enumerate(params) if p.allowed_token_ids is not None
               for token in p.allowed_token_ids if token < vocab]
    free = [row for row, p in enumerate(params) if p.allowed_token_ids is None]
    allowed = torch.zeros_like(logits, dtype=torch.bool)
    allowed[free] = True
    if entries:
        index = torch.tensor(entries, dtype=torch.long).to(logits.device, non_blocking=True).T
        allowed = allowed.index_put((index[0], index[1]), torch.tensor(True, device=logits.device))
    return logits.masked_fill(~allowed, float("-inf"))


def adjusted_logits(logits: torch.Tensor, params: list[SamplingParams], masks: torch.Tensor | None) -> torch.Tensor:
    """logits [B, V] (fp32) within the structured outputs' token masks and allowed_token_ids, plus logit_bias: what
    every later rule (penalties, temperature, ...) starts from. `logits` itself is never changed (it may be a CUDA
    graph's output)."""
    if masks is not None:
        logits = apply_token_masks(logits, masks)
    return apply_logit_bias(apply_allowed_tokens(logits, params), params)


def processed_scores(logits: torch.Tensor, params: SamplingParams, prompt_ids: torch.Tensor | None = None,
                     output_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The scores [V] (fp32) the next token is chosen by, as transformers' generate reports them (`output_scores`):
    the penalized logits; when sampling, divided by the temperature, with -inf where top-k, top-p or min-p drop a
    token. Greedy takes their argmax, sampling draws from their softmax. Pure: `logits` is not changed.

    Rows at once: logits [N, V] of rows under the same `params`, with prompt_ids and output_ids [N, L] (-1: no token),
    give [N, V], each row as it would alone."""
    single = logits.dim() == 1
    rows = logits.float().reshape(-1, logits.shape[-1])
    scores, ids = _scores(rows, params, prompt_ids, output_ids)
    if ids is not None:
        scores = torch.full_like(rows, float("-inf")).scatter_(1, ids, scores)
    elif scores is rows:  # no rule applied: a copy all the same (`logits` may be a CUDA graph's buffer)
        scores = scores.clone()
    return scores[0] if single else scores


def _scores(logits: torch.Tensor, params: SamplingParams, prompt_ids: torch.Tensor | None,
            output_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """processed_scores' rules over rows [N, V], kept to the candidates where top-k finds them: (scores [N, k], their
    ids [N, k], most likely first), every other token -inf; else (scores [N, V], None), `logits` itself when no
    rule applies."""
    logits = _penalized(logits, params, prompt_ids, output_ids)
    if params.greedy:
        return logits, None
    ids = order = None
    top_k = params.top_k if params.top_k < logits.shape[-1] else 0
    if top_k:
        top = logits.topk(top_k + 1, dim=-1)  # one more: a token tied with the k-th is kept too
        if bool((top.values[:, -1] < top.values[:, -2]).all()):  # no tie: the k first are the survivors
            logits, ids = top.values[:, :-1], top.indices[:, :-1]
            order = torch.arange(top_k, device=ids.device).expand_as(ids)
    # The same values whether divided before or after top-k picks them (a positive temperature keeps the order).
    scores = logits / params.temperature
    if top_k and ids is None:
        scores = scores.masked_fill(scores < top.values[:, -2:-1] / params.temperature, float("-inf"))
    if params.top_p < 1.0:
        scores = scores.masked_fill(~top_p_kept(scores.softmax(-1), params.top_p, order), float("-inf"))
    if params.min_p > 0:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return scores, ids


def _penalized(logits: torch.Tensor, params: SamplingParams, prompt_ids: torch.Tensor | None,
               output_ids: torch.Tensor | None) -> torch.Tensor:
    """logits [N, V] after the repetition penalty (over prompt_ids and output_ids [N, L], -1: no token) and the
    presence and frequency penalties (over output_ids): a new tensor where one applies, else `logits` itself. Only
    the entries of the tokens seen are read and written."""
    rows, vocab = logits.shape
    repeated = params.repetition_penalty != 1.0
    counted = bool(params.presence_penalty or params.frequency_penalty) and output_ids is not None and \
        output_ids.numel() > 0
    if not (repeated or counted):
        return logits
    logits = logits.clone()
    flat = logits.view(-1)

    def places(ids: torch.Tensor) -> torch.Tensor:  # where each id of each row is in `flat`
        ids = ids.reshape(rows, -1)
        row = torch.arange(rows, device=ids.device)[:, None].expand_as(ids)
        valid = (ids >= 0) & (ids < vocab)
        return (row * vocab + ids)[valid]

    if repeated and (given := [ids.reshape(rows, -1) for ids in (prompt_ids, output_ids) if ids is not None]):
        seen = places(torch.cat(given, dim=1)).unique()
        picked = flat[seen]
        # Make seen tokens less likely whatever their sign: divide positive logits, multiply negative ones.
        flat[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if counted:
        seen, counts = places(output_ids).unique(return_counts=True)
        flat[seen] -= params.frequency_penalty * counts.to(logits.dtype) + params.presence_penalty
    return logits


TOP_P_CANDIDATES = 1024  # top-p sorts this many most likely tokens of a row; the whole row only if they fall short


def top_p_kept(probs: torch.Tensor, top_p: float, order: torch.Tensor | None = None) -> torch.Tensor:
    """Where top-p keeps a token of probs [N, V] (bool): the smallest set of most likely tokens whose mass reaches
    top_p, the token that crosses it included. `order`: the columns of each row from the most likely (probs
    already sorted); else only the TOP_P_CANDIDATES most likely are sorted: when they hold top_p, every later token
    is dropped, as a sort of the whole row would decide, and a row where they do not is sorted whole."""
    vocab = probs.shape[-1]
    if order is None:
        top, order = probs.topk(min(TOP_P_CANDIDATES, vocab), dim=-1)
    else:
        top = probs.gather(-1, order)
    mass = top.cumsum(-1)
    kept = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, mass - top < top_p)
    if order.shape[-1] < vocab:
        short = (mass[:, -1] < top_p).nonzero()[:, 0].tolist()
        if short:
            top, order = probs[short].sort(dim=-1, descending=True)
            kept[short] = torch.zeros_like(top, dtype=torch.bool).scatter_(-1, order, top.cumsum(-1) - top < top_p)
    return kept


@dataclass
class Candidates:
    """Next-token distributions of N rows: row i gives probability probs[i, c] to token ids[i, c] and none to any
    other (ids None: to token c, over the whole vocabulary). An id may repeat with probability 0 (padding)."""

    probs: torch.Tensor  # [N, C] fp32
    ids: torch.Tensor | None  # [N, C] long
    vocab: int

    def rows(self, rows) -> Candidates:
        return Candidates(self.probs[rows], None if self.ids is None else self.ids[rows], self.vocab)

    def prob_at(self, tokens: torch.Tensor | None) -> torch.Tensor:
        """Each row's probabilities of tokens [N, T]: [N, T]; tokens None: of every token, [N, V]."""
        if tokens is None:
            if self.ids is None:
                return self.probs
            return torch.zeros(len(self.probs), self.vocab, device=self.probs.device).scatter_add_(1, self.ids,
                                                                                                   self.probs)
        if self.ids is None:
            return self.probs.gather(1, tokens)
        return (self.probs[:, None, :] * (self.ids[:, None, :] == tokens[:, :, None])).sum(-1)

    def token_at(self, columns: torch.Tensor) -> torch.Tensor:
        """The token of each row's column columns[i]: [N]."""
        return columns if self.ids is None else self.ids.gather(1, columns[:, None])[:, 0]

    def most_likely(self) -> torch.Tensor:
        return self.token_at(self.probs.argmax(-1))

    def draw(self, generators: list[torch.Generator | None]) -> torch.Tensor:
        """A token of each row [N]: a seeded row's from its generator, over its own candidates."""
        return self.token_at(draw_rows(self.probs, generators))


def distributions(logits: torch.Tensor, params: list[SamplingParams], prompt_ids: torch.Tensor | None = None,
                  output_ids: torch.Tensor | None = None) -> Candidates:
    """next_token_distribution of each row of logits [N, V] under its own params[i] (prompt_ids and output_ids
    [N, L], -1: no token; a greedy row's: its argmax alone). The rows that follow the same rule are computed together;
    a group whose top-k finds its candidates keeps to them: over the whole vocabulary only when a group does not."""
    groups: dict[tuple, list[int]] = {}
    for row, p in enumerate(params):
        key = (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
               p.frequency_penalty)
        groups.setdefault(key, []).append(row)
    count, vocab = logits.shape
    parts = []
    for rows in groups.values():
        p, every = params[rows[0]], len(rows) == count
        ids_of = [None if ids is None else ids if every else ids[rows] for ids in (prompt_ids, output_ids)]
        scores, ids = _scores(logits if every else logits[rows], p, *ids_of)
        if p.greedy:
            probs, ids = torch.ones(len(rows), 1, device=logits.device), scores.argmax(-1, keepdim=True)
        else:
            probs = scores.softmax(-1)
        parts.append((rows, Candidates(probs, ids, vocab)))
    if len(parts) == 1:
        return parts[0][1]
    if any(part.ids is None for _, part in parts):
        probs = torch.empty(count, vocab, device=logits.device)
        for rows, part in parts:
            probs[rows] = part.prob_at(None)
        return Candidates(probs, None, vocab)
    width = max(part.ids.shape[1] for _, part in parts)
    probs = torch.zeros(count, width, device=logits.device)
    ids = torch.zeros(count, width, dtype=torch.long, device=logits.device)
    for rows, part in parts:
        probs[rows, :part.ids.shape[1]], ids[rows, :part.ids.shape[1]] = part.probs, part.ids
    return Candidates(probs, ids, vocab)


def next_token_distribution(logits: torch.Tensor, params: SamplingParams, prompt_ids: torch.Tensor | None = None,
                            output_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The probabilities [V] that the next token is drawn from (a one-hot for greedy); rows [N, V] as
    processed_scores takes them. Pure: `logits` is not changed."""
    scores = processed_scores(logits, params, prompt_ids, output_ids)
    if params.greedy:
        return torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).float()
    return scores.softmax(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def draw_rows(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """A token of each row of probs [N, V] (weights that need not sum to 1): [N] long, on probs' device. A seeded row
    draws from its generator, as `draw` would; the others draw together."""
    seeded = [row for row, generator in enumerate(generators) if generator is not None]
    if not seeded:
        return torch.multinomial(probs, 1)[:, 0]
    drawn = torch.empty(len(generators), dtype=torch.long, device=probs.device)
    if free := [row for row, generator in enumerate(generators) if generator is None]:
        drawn[free] = torch.multinomial(probs[free], 1)[:, 0]
    for row in seeded:
        drawn[row] = torch.multinomial(probs[row], 1, generator=generators[row])[0]
    return drawn


def sample_token(logits: torch.Tensor, params: SamplingParams, prompt_ids: torch.Tensor, output_ids: list[int],
                 stop_ids, generator: torch.Generator | None, kept: list | None = None,
                 token_mask: torch.Tensor | None = None) -> tuple[int, TokenLogprobs | None]:
    """The next token of one sequence (and its logprobs if asked): the one sampling step of every generator.
    `kept`: where this step's (scores, raw logits) rows go when the request asks for them (`output_scores`,
    `output_logits`; None for the one not asked). `token_mask`: the structured output's allowed tokens (int32 words
    on logits' device, see apply_token_masks), None when unconstrained."""
    adjusted, scores = token_scores(logits, params, prompt_ids, output_ids, stop_ids, token_mask)
    token = int(scores.argmax()) if params.greedy else draw(scores.softmax(-1), generator)
    if kept is not None and (params.output_scores or params.output_logits):
        # copies: the runner's logits may be a CUDA graph's buffer, rewritten by the next step
        raw = logits.float().clone() if params.output_logits else None
        kept.append((scores if params.output_scores else None, raw))
    return token, token_logprobs(adjusted, token, params.logprobs) if params.logprobs is not None else None


UNSAMPLEABLE = "the model's logits for this sequence are NaN or +inf: it cannot be sampled"


def token_scores(logits: torch.Tensor, params: SamplingParams, prompt_ids: torch.Tensor, output_ids: list[int],
                 stop_ids, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the logits within the token mask and plus logit_bias: what logprobs report; the processed scores the token
    is chosen by: `processed_scores` after min_tokens' ban on the stop tokens), both [V] fp32, for one sequence
    whose output so far is `output_ids`. ValueError on NaN or +inf logits."""
    if bool(torch.isnan(logits).any() | torch.isposinf(logits).any()):
        raise ValueError(UNSAMPLEABLE)
    logits = adjusted_logits(logits.float()[None], [params], None if token_mask is None else token_mask[None])[0]
    if len(output_ids) < params.min_tokens and stop_ids and not params.ignore_eos:
        logits = logits.clone()  # too early to stop: forbid the stop tokens
        logits[list(stop_ids)] = float("-inf")
    output = torch.tensor(output_ids, dtype=torch.long, device=logits.device)
    return logits, processed_scores(logits, params, prompt_ids.to(logits.device), output)


def finish_reason(token: int, num_output: int, params: SamplingParams, stop_ids) -> str | None:
    """The one stop rule: "stop" on a stop token once min_tokens are out, "length" at max_tokens, else None.
    `num_output` counts `token`; `stop_ids` are empty when the request ignores EOS."""
    if token in stop_ids and num_output >= params.min_tokens:
        return "stop"
    return "length" if num_output >= params.max_tokens else None


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the n most likely (token id, logprob), most likely first
    rank: int | None = None  # prompt logprobs: the count of tokens at least as likely as token_id (1: the most likely)


def prompt_logprobs(prompt_ids: list[int], scores: list[tuple]) -> list[TokenLogprobs | None]:
    """Each prompt token's TokenLogprobs (None for the first) from the runner's scored chunks: (index of the first
    prompt token scored, then Gemma4.score_tokens' tensors of its tokens, the top cut to the request's count). A
    chunk computed twice (a preempted sequence) writes the same entries again."""
    out: list[TokenLogprobs | None] = [None] * len(prompt_ids)
    for first, logprob, rank, ids, values in scores:
        for i, (lp, r, top_ids, top_values) in enumerate(zip(logprob.tolist(), rank.tolist(), ids.tolist(),
                                                             values.tolist()), start=first):
            out[i] = TokenLogprobs(prompt_ids[i], lp, list(zip(top_ids, top_values)), r)
    return out


def token_logprobs(logits: torch.Tensor, token: int, n: int) -> TokenLogprobs:
    return rows_logprobs(logits[None], [token], [n])[0]


def rows_logprobs(logits: torch.Tensor, tokens: list[int], ns: list[int]) -> list[TokenLogprobs]:
    """token_logprobs of each row of logits [M, V] (its token, its top n), read in one go."""
    logprobs = logits.float().log_softmax(-1)
    top = logprobs.topk(max(ns), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    return [TokenLogprobs(token, logprob, list(zip(ids[:n], values[:n])))
            for token, logprob, ids, values, n in zip(tokens, chosen, top.indices.tolist(), top.values.tolist(), ns)]


# --- batched sampling on the device (the static-batch fast path) ---------------------------------------------------

def batchable(params: SamplingParams, num_output: int, stop_ids) -> bool:
    """Whether `sample_batch` serves this row now: no penalties, no logprobs or kept scores, and min_tokens not
    holding back a stop."""
    return (params.repetition_penalty == 1.0 and not params.presence_penalty and not params.frequency_penalty
            and params.logprobs is None and not params.output_scores and not params.output_logits
            and (num_output >= params.min_tokens or not stop_ids or params.ignore_eos))


TOP_K_CANDIDATES = 1024  # top-k up to this runs sample_batch on the candidates only


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                 token_masks: torch.Tensor | None = None, nan_id: int | None = None, out: torch.Tensor | None = None):
    """The next token of every row [B] (long, on logits' device) from logits [B, V], without leaving the device.

    The same rules as `next_token_distribution` (temperature -> top-k -> top-p -> min-p -> draw; greedy rows take the
    argmax of the raw logits, identical to `sample_token`), batched over rows with per-row parameters. Only for rows
    that `batchable` accepts. Seeded rows draw from their own generator, one call per seeded row; unseeded rows
    draw together. A seeded draw here may differ from `sample_token`'s (other float summation order); it
    reproduces itself. `token_masks`: the rows' allowed tokens (int32 words on logits' device, every bit set for
    an unconstrained row: structured.fill_masks), None when no row is constrained. With `nan_id`: (the tokens, the
    same with nan_id for the rows whose logits, as the rules read them, hold a NaN: such a row's token is a valid id
    that means nothing); the kernels tell from what they read anyway. `out` [B] long: the tokens are written there
    (by the sampling kernel itself where one runs: the decode graph's input row, which then needs no copy)."""
    sampled = _sample_batch(logits, params, generators, token_masks, nan_id, out)
    tokens = sampled if nan_id is None else sampled[0]
    if out is None or tokens.data_ptr() == out.data_ptr():
        return sampled
    out.copy_(tokens)
    return out if nan_id is None else (out, sampled[1])


def _sample_batch(logits, params, generators, token_masks, nan_id, out):
    logits = adjusted_logits(logits.float(), params, token_masks)
    if all(p.greedy for p in params):
        if kernels.enabled(logits):  # one launch
            from ..kernels.logits import argmax
            return argmax(logits.contiguous(), nan_id, out)
        return _checked(logits.argmax(-1), logits, nan_id)
    vocab = logits.shape[1]
    # Greedy rows take the argmax below: their top-k is moot.
    ks = [1 if p.greedy else p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if max(ks) <= TOP_K_CANDIDATES and all(g is None for g in generators) and kernels.enabled(logits):
        return _sample_batch_fused(logits, params, ks, nan_id, out)
    greedy_tokens = logits.argmax(-1)
    device = logits.device
    greedy = torch.tensor([p.greedy for p in params], device=device)
    temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
    scaled = logits / temperature[:, None]
    # With a top-k on every row (Gemma's default is 64), everything after it runs on the max(k) best candidates of
    # each row, sorted, instead of on the whole vocabulary: the same distribution, without a full-vocab sort.
    candidates = None
    if max(ks) <= TOP_K_CANDIDATES:
        scaled, candidates = scaled.topk(max(ks), dim=-1)  # [B, kmax], descending
        vocab = scaled.shape[1]
    if min(ks) < vocab:
        top = scaled if candidates is not None else scaled.topk(max(ks), dim=-1).values
        kth = top.gather(1, torch.tensor(ks, device=device)[:, None] - 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(-1)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=device)
        sorted_probs, order = (probs, None) if candidates is not None else probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop = mass_before >= top_p[:, None]
        if order is not None:
            drop = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, drop)
        probs = probs.masked_fill(drop, 0.0)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)
        probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    if candidates is None:
        drawn = draw_rows(probs, generators)
    else:
        drawn = candidates.gather(1, torch.multinomial(probs, 1))[:, 0]
        for b, generator in enumerate(generators):
            if generator is not None:  # over the whole vocabulary, as any batch would: a seed's draw is its own
                full = torch.zeros(logits.shape[1], device=device).scatter_(0, candidates[b], probs[b])
                drawn[b] = torch.multinomial(full, 1, generator=generator)[0]
    return _checked(torch.where(greedy, greedy_tokens, drawn), logits, nan_id)


def _checked(tokens: torch.Tensor, logits: torch.Tensor, nan_id: int | None):
    """sample_batch's result from its tokens: with nan_id, also the tokens with nan_id where a row holds a NaN."""
    return tokens if nan_id is None else (tokens, tokens.masked_fill(logits.isnan().any(-1), nan_id))


def _sample_batch_fused(logits: torch.Tensor, params: list[SamplingParams], ks: list[int], nan_id: int | None,
                        out: torch.Tensor | None):
    """sample_batch for rows without seeds, each with a top-k: the candidates by torch.topk, then one kernel for the
    rest (the same rules; the draw inverts the CDF at a uniform number instead of calling torch.multinomial). The
    rows' parameters travel in one host-to-device copy."""
    from ..kernels.logits import sample_candidates

    values, ids = logits.topk(max(ks), dim=-1)  # [B, kmax], descending (temperature > 0 keeps the order)
    table = torch.tensor([[1.0 if p.greedy else p.temperature for p in params], ks, [p.top_p for p in params],
                          [p.min_p for p in params], [float(p.greedy) for p in params]], dtype=torch.float32)
    table = table.to(logits.device, non_blocking=True)
    uniform = torch.rand(len(params), device=logits.device)
    greedy_rows = any(p.greedy for p in params)  # then the argmax's rows are merged in below: a new tensor
    drawn = sample_candidates(values, ids, table[:4], uniform, top_p=any(p.top_p < 1.0 for p in params),
                              nan_id=nan_id, out=None if greedy_rows else out)
    if greedy_rows:
        greedy, best = table[4] > 0, logits.argmax(-1)
        if nan_id is None:
            return torch.where(greedy, best, drawn)
        tokens, checked = drawn  # a greedy row's NaN shows among its candidates too
        return torch.where(greedy, best, tokens), torch.where(greedy & (checked != nan_id), best, checked)
    return drawn
