"""Shared by the tensor-parallel tests (test_tensor_parallel.py, test_tensor_parallel_quantized.py): tiny configs,
prompts, and the comparison of an N-rank `LLM` with the single-process model loaded the same way.

Tolerance: fp32 logits within 1e-4 absolute (rtol 0; softcapped logits are of magnitude ~2 here). A row-parallel
product (o_proj, down_proj, the experts) sums N partial sums instead of one sum over K, and the reduction order of
all-reduce differs again: measured differences are 2e-6 to 1.1e-5 over the families and sizes of
test_tensor_parallel.py, so 1e-4 leaves a margin of ~10 while any wrong shard (a missed all-reduce, a head paired with
the wrong KV head, an expert on the wrong rank) moves logits by O(1). Greedy tokens must be equal; logprobs of the
generated tokens within 1e-4."""

from __future__ import annotations

import torch

from reference import text_config_dict

from gemma4.config import Config
from gemma4.llm import LLM

ATOL = 1e-4
GREEDY = dict(temperature=0.0, max_tokens=8, stop_token_ids=[], logprobs=1)
IMAGE = 372  # the image placeholder id inside the tiny vocabulary (as in test_multimodal.py)


def config_of(family: str) -> Config:
    return Config.from_dict({"model_type": "gemma4", "text_config": text_config_dict(family),
                             "vision_config": None, "audio_config": None, "image_token_id": IMAGE})


def prompts() -> list[list[int]]:
    """Three prompts; the third starts with the second's 40 tokens (a prefix-cache hit: rings copied on every rank)."""
    g = torch.Generator().manual_seed(0)
    first, second = (torch.randint(3, 384, (n,), generator=g).tolist() for n in (5, 40))
    return [first, second, second + torch.randint(3, 384, (9,), generator=g).tolist()]


def outputs(llm: LLM, prompt_lists: list[list[int]]):
    """Token ids and their logprobs per prompt: the first two together, the third after (to hit the cache)."""
    results = llm.generate(prompt_lists[:2], GREEDY) + llm.generate(prompt_lists[2:], GREEDY)
    return [(r.token_ids, [lp.logprob for lp in r.logprobs]) for r in results]


def assert_matches_one_process(llm: LLM, single, expected, media: bool = True) -> None:
    """`llm` (N ranks) gives `single`'s logits, of a batch with a left-padded row and (`media`, where the config's
    image placeholder is IMAGE) of image soft tokens, and the greedy tokens and logprobs `expected` (`outputs`)."""
    ids = torch.randint(3, 384, (2, 21), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # a left-padded row
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids, attention_mask=mask), single(ids, attention_mask=mask),
                                   rtol=0, atol=ATOL)
        if media:  # soft tokens of an image (as the engine passes them: computed once on rank 0) fill placeholders
            ids[0, 4:9] = IMAGE
            filled = torch.zeros_like(ids, dtype=torch.bool)
            filled[0, 4:9] = True
            embeds = (filled, torch.randn(5, 64, generator=torch.Generator().manual_seed(3)))
            torch.testing.assert_close(llm.model(ids, media_embeds=embeds), single(ids, media_embeds=embeds),
                                       rtol=0, atol=ATOL)
    for (got_ids, got_logprobs), (want_ids, want_logprobs) in zip(outputs(llm, prompts()), expected):
        assert got_ids == want_ids
        torch.testing.assert_close(torch.tensor(got_logprobs), torch.tensor(want_logprobs), rtol=0, atol=ATOL)
    assert llm.engine.blocks.hit_tokens > 0  # the third prompt came partly from the prefix cache
