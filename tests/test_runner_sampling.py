"""The engine's runner samples on the model's device: batchable rows together (`sample_batch`, one call per step),
the others through `sample_token` row by row, and only token ids come back to the host."""

import torch

from test_engine import model, prompts  # noqa: F401 - the tiny E2B model fixture

import gemma4.engine.runner as runner_module
from gemma4.engine.engine import LLMEngine
from gemma4.engine.runner import ModelRunner
from gemma4.engine.sampling import SamplingParams, batchable, sample_token

STOPS = [1, 106]
MIXED = [
    SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[]),  # greedy
    SamplingParams(max_tokens=8, temperature=0, seed=3, stop_token_ids=[]),  # greedy (a seed changes nothing)
    SamplingParams(max_tokens=8, temperature=1.0, top_k=50, seed=11, stop_token_ids=[]),  # seeded, batchable
    SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, min_p=0.05, seed=12, stop_token_ids=[]),
    SamplingParams(max_tokens=8, temperature=1.0, stop_token_ids=[]),  # unseeded: a random draw, no stop to hit
    SamplingParams(max_tokens=8, temperature=0.8, repetition_penalty=1.3, presence_penalty=0.5, seed=13,
                   stop_token_ids=[]),  # penalties: sample_token
    SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.5, stop_token_ids=[]),  # greedy + penalty
    SamplingParams(max_tokens=8, temperature=0, logprobs=3, stop_token_ids=[]),  # greedy + logprobs
    SamplingParams(max_tokens=8, temperature=1.0, logprobs=0, seed=14, stop_token_ids=[]),  # sampled + logprobs
    SamplingParams(max_tokens=8, temperature=1.0, min_tokens=3, seed=15, stop_token_ids=STOPS),  # sample_token,
]  # then (3 tokens in) sample_batch
UNSEEDED = 4


class CheckingRunner(ModelRunner):
    """Checks every step: each row that sample_token should serve (and every greedy row) gets exactly what
    sample_token gives on the same logits, from a copy of the row's generator; sample_batch runs at most once."""

    def __init__(self, model, blocks):
        super().__init__(model, blocks)
        self.checked = self.batch_calls = 0

    def forward(self, batch, ahead=None):
        self.logits, hidden = super().forward(batch, ahead)
        return self.logits, hidden

    def launch(self, batch, ahead=None):
        device = self.device
        before = [(item.samples, list(item.seq.output_ids),
                   None if item.seq.params.seed is None else item.seq.generator_on(device).get_state())
                  for item in batch]
        calls = runner_module.sample_batch.calls
        launched = super().launch(batch, ahead)
        results = launched.all_results()
        fast = [b for b, (samples, out, _) in zip(batch, before)
                if samples and batchable(b.seq.params, len(out), b.seq.stop_ids)]
        assert runner_module.sample_batch.calls - calls == (1 if fast else 0)
        self.batch_calls += runner_module.sample_batch.calls - calls
        for row, (item, (samples, out, state)) in enumerate(zip(batch, before)):
            seq = item.seq
            if not samples:
                assert results[row] is None
                continue
            if item in fast and not seq.params.greedy:
                continue  # drawn by sample_batch: checked for reproducibility below
            generator = None if state is None else torch.Generator(device).set_state(state)
            expected = sample_token(self.logits[row].clone(), seq.params, torch.tensor(seq.prompt_ids), out,
                                    seq.stop_ids, generator)
            assert results[row] == expected
            self.checked += 1
        return launched


def counting(monkeypatch):
    """Count sample_batch calls (the runner's binding)."""
    real = runner_module.sample_batch

    def sample_batch(logits, params, generators, token_masks=None, nan_id=None, out=None):
        sample_batch.calls += 1
        assert len(logits) == len(params) == len(generators)
        return real(logits, params, generators, token_masks, nan_id, out)

    sample_batch.calls = 0
    monkeypatch.setattr(runner_module, "sample_batch", sample_batch)


def run_mixed(model, batch):
    engine = LLMEngine(model, max_num_seqs=len(batch), max_model_len=64, max_num_batched_tokens=48)
    engine.runner = CheckingRunner(model, engine.blocks)
    outputs = engine.generate(batch, MIXED)
    return outputs, engine.runner


def test_mixed_batch_matches_sample_token_and_reproduces(model, monkeypatch):
    counting(monkeypatch)
    batch = prompts(len(MIXED), seed=6)
    first, runner = run_mixed(model, batch)
    assert runner.checked == 6 * 8 + 3 and runner.batch_calls >= 8  # every greedy/penalty/logprobs/min_tokens token
    second, _ = run_mixed(model, batch)
    seeded = [i for i in range(len(MIXED)) if i != UNSEEDED]
    assert [first[i] for i in seeded] == [second[i] for i in seeded]
    # ...and each seeded row drawn alone gives the same tokens as in the mixed batch.
    for i in (2, 3, 5, 9):
        alone = LLMEngine(model, max_num_seqs=1, max_model_len=64).generate([batch[i]], MIXED[i])[0]
        assert alone == first[i]
    assert all(len(out) == 8 for out in first)
    assert not set(first[9][:3]) & set(STOPS)  # min_tokens held the stops back


def test_no_full_logits_reach_the_host(model, monkeypatch):
    """forward's logits are the model's own output (a view, no host copy); no vocab-sized tensor is copied to the
    host or turned into a list while the engine steps."""
    vocab = model.config.text_config.vocab_size
    moved = []
    for name in ("cpu", "tolist", "numpy"):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            moved.append((_name, self.numel()))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    outputs = []
    hook = model.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        # No prefix cache: its split prefills would put a prefill chunk beside decodes (two model calls a step).
        engine = LLMEngine(model, max_num_seqs=4, max_model_len=64, enable_prefix_caching=False)
        forward = engine.runner.forward
        results = []
        engine.runner.forward = lambda batch, ahead=None: results.append(forward(batch, ahead)) or results[-1]
        engine.generate(prompts(4, seed=8), [MIXED[0], MIXED[2], MIXED[4], MIXED[0]])
    finally:
        hook.remove()
    assert results and len(results) == len(outputs)
    for (logits, _), (output, _) in zip(results, outputs):  # (logits, hidden states) each
        assert logits.device == model.device
        assert logits.untyped_storage().data_ptr() == output.untyped_storage().data_ptr()
    assert moved and all(numel < vocab for _, numel in moved)
