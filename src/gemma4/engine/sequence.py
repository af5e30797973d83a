"""A request as the engine sees it: token ids in, token ids out. The engine never sees text."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams, TokenLogprobs, make_generator

_ids = itertools.count()

PENDING = -1  # in output_ids: a token sampled on the device that the host has not read yet (engine.py: run ahead)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # a request is itself: identity, not a field-by-field comparison (O(1) `in` checks)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int] = frozenset()
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache (global blocks and sliding ring)
    block_table: list[int] = field(default_factory=list)  # global-layer KV blocks, in position order
    ring_slot: int = -1  # which sliding-window ring this sequence owns (-1: none)
    block_names: list[bytes] = field(default_factory=list)  # prefix cache: the prompt's full blocks' chained hashes
    snapshot_points: list[int] = field(default_factory=list)  # prefix cache: where to keep the sliding windows next
    own_snapshot: bytes | None = None  # prefix cache: the snapshot it took past its first turn, the first to go once
    # its last one is taken unless another sequence started from it
    split_at: int = 0  # a prefill chunk may end at this position but not cross it (0: anywhere)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    generator: torch.Generator | None = None  # the seed's generator, made where the logits are (generator_on)
    media: object | None = None  # multimodal.SoftTokens: the prompt's image/audio soft tokens, shared by n choices
    kept_rows: list = field(default_factory=list)  # per sampled token, (scores, logits) if params.output_scores/_logits
    matcher: object | None = None  # structured.GrammarMatcher: the structured output's grammar state (None: free)
    hidden: torch.Tensor | None = None  # speculative decoding: the target's final hidden state that gave the last token
    # prompt_logprobs asked and not handed out yet: the scored chunks so far (sampling.prompt_logprobs reads them;
    # runner.py fills them); None otherwise. Such a sequence computes its whole prompt, never from the prefix cache.
    prompt_scores: list | None = None
    _prompt_tensor: torch.Tensor | None = None

    @property
    def pending(self) -> bool:
        """Whether output_ids[-1] is PENDING: the step that samples it is still on the device."""
        return bool(self.output_ids) and self.output_ids[-1] == PENDING

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, index: int) -> int:
        """tokens[index] without building the whole list."""
        prompt = len(self.prompt_ids)
        return self.prompt_ids[index] if index < prompt else self.output_ids[index - prompt]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncached(self) -> int:
        return len(self) - self.num_cached

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    def chunk_size(self, start: int, limit: int) -> int:
        """The longest chunk [start, start + m), m <= limit, that ends at no point inside an image (a vision run
        must be embedded in one forward) nor crosses `split_at`; 0 when the next image does not fit in `limit`
        tokens."""
        end = start + limit
        if start < self.split_at < end:
            end = self.split_at
        runs = self.media.vision_runs if self.media is not None else []
        end = next((a for a, b in runs if a < end < b), end)
        return max(end - start, 0)

    def generator_on(self, device: torch.device) -> torch.Generator | None:
        """The seeded generator (None if unseeded), made on `device` (that of the logits it samples) at first use:
        one generator per sequence, so its draws do not depend on what it is batched with."""
        if self.generator is None and self.params.seed is not None:
            self.generator = make_generator(self.params.seed, device)
        return self.generator

    def prompt_tensor(self, device: torch.device | None = None) -> torch.Tensor:
        """The prompt's ids, made once on `device` (the penalties read them every step)."""
        if self._prompt_tensor is None:
            self._prompt_tensor = torch.tensor(self.prompt_ids, dtype=torch.long, device=device)
        return self._prompt_tensor


@dataclass
class StepOutput:
    """What one engine step produced for one sequence."""

    seq_id: int
    token: int | None  # None when the sequence was aborted, failed, or only scored its prompt (max_tokens 0)
    logprobs: TokenLogprobs | None
    finished: bool
    finish_reason: str | None
    num_output_tokens: int = 0
    error: str | None = None  # why the sequence failed (finish_reason "error"); the engine goes on with the others
    # SamplingParams.prompt_logprobs: each prompt token's (None for the first), on the sequence's first output only
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    def raise_error(self) -> None:
        """GenerationError if the sequence failed in the engine (for callers that report failures by raising)."""
        if self.error is not None:
            raise GenerationError(f"generation failed: {self.error}")


class GenerationError(RuntimeError):
    """A request failed inside the engine (NaN logits, a forward that raised); the engine serves the others."""
