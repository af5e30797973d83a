"""Structured output in the engine (engine/structured.py): a grammar over token ids holds random weights to JSON
schemas, the tool-call syntax, choices; the mask in both samplers; constrained rows never run ahead; thinking;
logit_bias. A tiny random model with Gemma's full vocabulary and the real tokenizer."""

from __future__ import annotations

import json
import random

import jsonschema
import numpy as np
import pytest
import torch

from reference import text_config_dict
from test_server_support import ScriptedModel

from gemma4 import Config, Model
from gemma4.engine.engine import LLMEngine
from gemma4.engine.sampling import SamplingParams, sample_batch, sample_token
from gemma4.engine.sequence import PENDING
from gemma4.engine.structured import GrammarCompiler, StructuredOutputsParams, fill_masks, mask_words
from gemma4.processing.parse import parse_response
from gemma4.processing.tokenizer import Tokenizer
from gemma4.processing.tool_grammar import tool_call_grammar
from gemma4.random_init import randomize_

VOCAB = 262144
STOPS = [1, 106, 50]


@pytest.fixture(scope="module")
def tokenizer(gemma4_tokenizer_dir):
    return Tokenizer.from_pretrained(gemma4_tokenizer_dir)


@pytest.fixture(scope="module")
def model():
    """Narrow (hidden size 16, two layers): a step's cost is the [batch, 262,144] logits and what follows them."""
    text = dict(text_config_dict("31B"), vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=16,
                intermediate_size=32, num_attention_heads=2, head_dim=8, global_head_dim=16, num_hidden_layers=2,
                layer_types=["sliding_attention", "full_attention"])
    config = Config.from_dict({"model_type": "gemma4", "text_config": text, "vision_config": None,
                               "audio_config": None, "eos_token_id": [1, 106]})
    return randomize_(Model(config), 0).eval()


def engine_for(model, tokenizer, **kwargs):
    kwargs = {"max_num_seqs": 64, "max_model_len": 512, "max_num_batched_tokens": 2048, **kwargs}
    return LLMEngine(model, tokenizer=tokenizer, stop_token_ids=STOPS, **kwargs)


# --- 200 random JSON schemas ----------------------------------------------------------------------------------------
WORDS = ["red", "green", "blue", "a b", 'q"t', "ünï", "x\\y", "", "long enum value"]
NAMES = ["id", "name", "size", "tags", "ok", "kind", "items", "score", "Value", "_x", "a-b", "n2"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A schema whose every instance is short (bounded strings, arrays and nesting): the model must end it within
    max_tokens whatever its weights."""
    kinds = ["integer", "number", "boolean", "enum", "string"] + (["object", "object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 200)}
    if kind == "number":
        low = round(rng.uniform(-10, 10), 2)
        return {"type": "number", "minimum": low, "maximum": round(low + rng.uniform(0.5, 20), 2)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        values = rng.sample(WORDS, rng.randint(1, 4)) + ([rng.randint(0, 9)] if rng.random() < 0.3 else [])
        return {"enum": values}
    if kind == "string":
        high = rng.randint(0, 6)
        return {"type": "string", "minLength": rng.randint(0, high), "maxLength": high}
    if kind == "array":
        low = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": low,
                "maxItems": low + rng.randint(0, 2)}
    names = rng.sample(NAMES, rng.randint(1, 4))
    return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
            "required": [n for n in names if rng.random() < 0.6], "additionalProperties": False}


def test_200_random_schemas_always_validate(model, tokenizer):
    """Sampled (top-k 64, temperature 1) from random weights, batched through one engine: every output parses and
    validates against its schema, and ends on a stop token (the grammar forces it). Not greedy: a grammar bounds
    no number's digits, and greedy random weights can repeat one digit up to max_tokens."""
    rng = random.Random(25)
    schemas = [random_schema_object(rng) for _ in range(200)]
    torch.manual_seed(0)
    engine = engine_for(model, tokenizer)
    prompts = [tokenizer.encode(f"Answer in JSON ({i}):") for i in range(len(schemas))]
    params = [SamplingParams(max_tokens=160, temperature=1.0, top_k=64,
                             structured_outputs=StructuredOutputsParams(json=schema))
                        for schema in schemas]
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    tokens, reasons = {i: [] for i in ids}, {}
    for out in engine.run(ids):
        out.raise_error()
        if out.token is not None:
            tokens[out.seq_id].append(out.token)
        if out.finished:
            reasons[out.seq_id] = out.finish_reason
    for seq_id, schema in zip(ids, schemas):
        *body, stop = tokens[seq_id]
        assert reasons[seq_id] == "stop" and stop in STOPS, (schema, tokenizer.decode(tokens[seq_id]))
        text = tokenizer.decode(body, skip_special_tokens=False)
        jsonschema.validate(json.loads(text), schema)


def random_schema_object(rng: random.Random) -> dict:
    """The top level of a response_format schema: an object."""
    schema = random_schema(rng, 0)
    while schema.get("type") != "object":
        schema = random_schema(rng, 0)
    return schema


# --- the mask in both samplers ---------------------------------------------------------------------------------------
def random_masks(rows: int, vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    allowed = torch.rand(rows, vocab, generator=generator) < 0.01
    allowed[:, 7] = True
    bits = np.packbits(allowed.numpy(), axis=1, bitorder="little")
    words = np.zeros((rows, mask_words(vocab) * 4), dtype=np.uint8)
    words[:, :bits.shape[1]] = bits
    return allowed, torch.from_numpy(words.view(np.int32))


@pytest.mark.parametrize("params", [dict(temperature=0), dict(temperature=1.0, top_k=64),
                                    dict(temperature=0.8, top_p=0.9), dict(temperature=1.0, seed=3)],
                         ids=["greedy", "top_k", "top_p", "seeded"])
def test_both_samplers_draw_only_allowed_tokens(params):
    generator = torch.Generator().manual_seed(1)
    vocab = 1000
    logits = torch.randn(8, vocab, generator=generator) * 5
    allowed, masks = random_masks(8, vocab, generator)
    sp = [SamplingParams(**params) for _ in range(8)]
    generators = [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in sp]
    batched = sample_batch(logits, sp, generators, masks)
    assert allowed[torch.arange(8), batched].all()
    rowwise = [sample_token(logits[b], sp[b], torch.tensor([2]), [], frozenset(), generators[b],
                            token_mask=masks[b])[0] for b in range(8)]
    assert allowed[torch.arange(8), torch.tensor(rowwise)].all()
    if sp[0].greedy:  # the argmax of the allowed logits, in both
        best = logits.masked_fill(~allowed, float("-inf")).argmax(-1)
        assert batched.tolist() == rowwise == best.tolist()
    # masks of every token change nothing
    everything = torch.full_like(masks, -1)
    if sp[0].greedy:
        assert sample_batch(logits, sp, generators, everything).tolist() == logits.argmax(-1).tolist()


def test_logit_bias_in_both_samplers():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 500, generator=generator)
    sp = [SamplingParams(temperature=0, logit_bias={9: 100.0}), SamplingParams(temperature=0),
          SamplingParams(temperature=1.0, logit_bias={5: 100.0, 6: float("-inf")}),
          SamplingParams(temperature=0, logit_bias={int(logits[3].argmax()): -100.0})]
    batched = sample_batch(logits, sp, [None] * 4).tolist()
    rowwise = [sample_token(logits[b], sp[b], torch.tensor([2]), [], frozenset(), None)[0] for b in range(4)]
    second = int(logits[3].topk(2).indices[1])
    assert batched == rowwise == [9, int(logits[1].argmax()), 5, second]
    with pytest.raises(ValueError, match="logit_bias values"):
        SamplingParams(logit_bias={3: 101})
    with pytest.raises(ValueError, match="logit_bias keys"):
        SamplingParams(logit_bias={"3": 1})


# --- the engine ------------------------------------------------------------------------------------------------------
def test_a_complete_grammar_ends_on_a_stop_token(model, tokenizer):
    engine = engine_for(model, tokenizer, max_num_seqs=4)
    choice = StructuredOutputsParams(choice=["yes", "no thanks"])
    outs = engine.generate([tokenizer.encode("Well?")] * 3,
                           [SamplingParams(max_tokens=30, temperature=1.0, seed=s, structured_outputs=choice)
                            for s in range(3)])
    for out in outs:
        assert out[-1] in STOPS and tokenizer.decode(out[:-1]) in ("yes", "no thanks")


def test_unconstrained_rows_are_unchanged_and_constrained_ones_never_run_ahead(model, tokenizer, monkeypatch):
    """Greedy rows beside constrained ones give the tokens they give alone; a constrained sequence never holds a
    PENDING token (its next mask needs its token), and running ahead or not gives it the same tokens."""
    prompts = [tokenizer.encode(text) for text in ("One", "Two three", "Four five six", "Seven")]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    alone = engine_for(model, tokenizer, max_num_seqs=4).generate(prompts[:2], greedy)
    schema = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "boolean"}},
                                           "required": ["a"], "additionalProperties": False})
    constrained = SamplingParams(max_tokens=40, temperature=0, structured_outputs=schema)
    seen_pending = []
    accept = LLMEngine._accept

    def watching(self, launched, results):
        seen_pending.extend(s.pending for s in self.seqs.values() if s.matcher is not None)
        return accept(self, launched, results)

    monkeypatch.setattr(LLMEngine, "_accept", watching)
    ahead = engine_for(model, tokenizer, max_num_seqs=4).generate(prompts, [greedy, greedy, constrained,
                                                                           constrained])
    not_ahead = engine_for(model, tokenizer, max_num_seqs=4, run_ahead=False).generate(
        prompts, [greedy, greedy, constrained, constrained])
    assert ahead[:2] == alone and ahead == not_ahead
    assert seen_pending and not any(seen_pending) and PENDING not in sum(ahead, [])
    assert json.loads(tokenizer.decode(ahead[2][:-1])) in ({"a": True}, {"a": False})


def test_thinking_the_grammar_starts_after_the_channel_closes(tokenizer):
    """With start_after = `<channel|>`, the thought is free (here it writes what no grammar would allow) and the
    grammar holds everything after it; without, the grammar holds the first token already."""
    model = ScriptedModel()
    prompt = tokenizer.encode("<|turn>user\nHi<turn|>\n<|turn>model\n", add_special_tokens=False)
    script = tokenizer.encode("<|channel>thought\nHmm.<channel|>Neither!", add_special_tokens=False)
    model.scripts[len(prompt)] = script
    engine = LLMEngine(model, max_num_seqs=2, max_model_len=128, tokenizer=tokenizer, stop_token_ids=STOPS)
    channel_end = tokenizer.channel_end_id
    thinking = SamplingParams(max_tokens=40, temperature=0, structured_outputs=StructuredOutputsParams(
        choice=["yes", "no"], start_after=channel_end))
    plain = SamplingParams(max_tokens=40, temperature=0, structured_outputs=StructuredOutputsParams(
        choice=["yes", "no"]))
    with_thought, without = engine.generate([prompt, prompt], [thinking, plain])
    split = with_thought.index(channel_end) + 1
    assert with_thought[:split] == script[:split]
    assert tokenizer.decode(with_thought[split:-1]) in ("yes", "no") and with_thought[-1] in STOPS
    assert tokenizer.decode(without[:-1]) in ("yes", "no")


def test_compile_errors_name_the_problem(model, tokenizer):
    engine = engine_for(model, tokenizer, max_num_seqs=2)
    bad = [({"json": {"type": "integer", "minimum": 3, "maximum": 1}}, "minimum"),
           ({"json": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
           ({"regex": "[a-"}, "unclosed character class"), ({"grammar": "start: nope"}, "nope")]
    for spec, problem in bad:
        with pytest.raises(ValueError, match=problem):
            engine.add_request([2, 100], SamplingParams(structured_outputs=spec))
    with pytest.raises(ValueError, match="exactly one"):
        SamplingParams(structured_outputs={"json": {}, "regex": "a"})
    with pytest.raises(ValueError, match="ignore_eos"):
        engine.add_request([2, 100], SamplingParams(ignore_eos=True, structured_outputs={"json_object": True}))
    with pytest.raises(ValueError, match="tokenizer"):
        LLMEngine(model, max_num_seqs=1, max_model_len=64).add_request(
            [2, 100], SamplingParams(max_tokens=8, structured_outputs={"json_object": True}))
    assert not engine.has_unfinished()


def test_text_spelling_a_special_token_is_written_with_ordinary_tokens(tokenizer):
    """llguidance would force `<|turn>` as the special token, which the grammar's text then refuses: such grammars
    compile without forcing, and the text comes out of ordinary tokens."""
    compiler = GrammarCompiler(tokenizer)
    rng = np.random.default_rng(0)
    for spec in (StructuredOutputsParams(choice=["<|turn>user\n<|tool_call>"]),
                 StructuredOutputsParams(json={"const": "a<eos>b"})):
        matcher, ids = compiler.matcher(spec, STOPS), []
        while True:
            words = fill_masks([matcher], VOCAB)[0].numpy()
            allowed = np.nonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[:VOCAB])[0]
            token = int(rng.choice(allowed))
            if token in STOPS:
                break
            ids.append(token)
            matcher.accept(token)
            assert matcher.error is None
        text = tokenizer.decode(ids, skip_special_tokens=False)
        assert text in ("<|turn>user\n<|tool_call>", '"a<eos>b"') and not set(ids) & {105, 48, 1}


# --- the tool-call grammar -------------------------------------------------------------------------------------------
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "units": {"enum": ["C", "F"]}, "alerts": {"type": "boolean"},
        "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "maxItems": 3},
        "where": {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90}},
                  "required": ["lat"]}},
        "required": ["city", "units"]}}},
    {"type": "function", "function": {"name": "ping"}},
    {"type": "function", "function": {"name": "pick", "parameters": {"type": "object", "properties": {
        "choice": {"anyOf": [{"type": "null"}, {"const": "x y"}]}, "odd key": {"type": "boolean"}},
        "required": ["choice", "odd key"]}}},
]


def walk_grammar(compiler, grammar, rng, limit=400, prefer=None):
    """Random allowed tokens until a stop token: the grammar alone decides the text. `prefer` (a rank per token): half
    the time, one of the allowed tokens of the highest rank above 0, if any."""
    matcher, ids = compiler.matcher(StructuredOutputsParams(grammar=grammar), STOPS), []
    for _ in range(limit):
        words = fill_masks([matcher], VOCAB)[0].numpy()
        allowed = np.nonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[:VOCAB])[0]
        short = [t for t in allowed if t in STOPS or t < 50_000] or list(allowed)  # strings end sooner
        ranks = prefer[allowed] if prefer is not None else None
        if ranks is not None and ranks.max() > 0 and rng.random() < 0.5:
            short = allowed[ranks == ranks.max()]
        token = int(rng.choice(short))
        if token in STOPS:
            return ids
        ids.append(token)
        matcher.accept(token)
        assert matcher.error is None
    raise AssertionError("the grammar never ended")


@pytest.mark.parametrize("parallel", [True, False])
def test_tool_grammar_writes_what_the_parser_reads(tokenizer, parallel):
    """Every walk through the tool-call grammar is read by the response parser as calls of the declared tools
    whose arguments validate against their parameters (one call when not parallel)."""
    compiler = GrammarCompiler(tokenizer)
    grammar = tool_call_grammar(TOOLS, tokenizer.tool_call_start_id, tokenizer.tool_call_end_id,
                                tokenizer.string_delimiter_id, parallel=parallel)
    schemas = {t["function"]["name"]: t["function"].get("parameters", {"type": "object",
                                                                       "additionalProperties": False})
               for t in TOOLS}
    rng = np.random.default_rng(7 + parallel)
    for _ in range(40):
        text = tokenizer.decode(walk_grammar(compiler, grammar, rng), skip_special_tokens=False)
        parsed = parse_response(text, complete=True)
        assert parsed["content"] is None and parsed["tool_calls"], text
        assert parallel or len(parsed["tool_calls"]) == 1
        for call in parsed["tool_calls"]:
            jsonschema.validate(call["function"]["arguments"], schemas[call["function"]["name"]])
    named = tool_call_grammar(TOOLS, tokenizer.tool_call_start_id, tokenizer.tool_call_end_id,
                              tokenizer.string_delimiter_id, name="pick", parallel=parallel)
    for _ in range(5):
        calls = parse_response(tokenizer.decode(walk_grammar(compiler, named, rng), skip_special_tokens=False),
                               complete=True)["tool_calls"]
        assert {c["function"]["name"] for c in calls} == {"pick"}
    with pytest.raises(ValueError, match="call syntax"):
        tool_call_grammar([{"type": "function", "function": {"name": "two words"}}], 48, 49, 52)


def test_the_fused_sampler_and_argmax_kernels_keep_to_the_mask():
    """The CUDA path of sample_batch (top-k candidates into the Triton sampler, the argmax kernel), here through
    Triton's interpreter: rows allowing fewer tokens than their top-k (-inf candidates) draw only allowed ones."""
    pytest.importorskip("triton")
    from gemma4 import kernels

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3000, generator=generator) * 3
    allowed, masks = random_masks(4, 3000, generator)
    allowed[:, 8:] &= torch.rand(4, 2992, generator=generator) < 0.3  # ~3 allowed tokens per row, top-k 64
    bits = np.packbits(allowed.numpy(), axis=1, bitorder="little")
    masks = torch.from_numpy(np.pad(bits, ((0, 0), (0, masks.shape[1] * 4 - bits.shape[1]))).view(np.int32))
    with kernels.force():
        for params in ([SamplingParams(temperature=1.0, top_k=64, top_p=0.95)] * 4,
                       [SamplingParams(temperature=0)] * 4):
            for _ in range(5):
                drawn = sample_batch(logits, params, [None] * 4, masks)
                assert allowed[torch.arange(4), drawn].all()


def test_rows_computed_together_equal_each_alone(tokenizer):
    """fill_masks computes several rows on llguidance's threads: each row's mask (grammar tokens, stop tokens where the
    grammar is complete; every token for a row without an active matcher) equals its own."""
    compiler = GrammarCompiler(tokenizer)
    schema = StructuredOutputsParams(json=json.dumps({"type": "object", "properties": {"n": {"type": "integer"}},
                                                      "required": ["n"], "additionalProperties": False}))
    texts = ['{"n":', '{"n":4', '{"n":42}', '{']  # inside, a number that may go on, complete, start
    matchers = []
    for text in texts:
        matcher = compiler.matcher(schema, STOPS)
        for token in tokenizer.encode(text, add_special_tokens=False):
            matcher.accept(token)
        matchers.append(matcher)
    failed = compiler.matcher(schema, STOPS)
    failed.accept(tokenizer.encode("x", add_special_tokens=False)[0])  # not JSON: failed, no longer constrained
    assert failed.error is not None
    rows = [matchers[0], None, matchers[1], failed, matchers[2], matchers[3]]
    together = fill_masks(rows, VOCAB).numpy()
    for row, matcher in enumerate(rows):
        if matcher is None or not matcher.active:
            expected = np.full(together.shape[1], -1, dtype=np.int32)
        else:
            expected = fill_masks([matcher], VOCAB)[0].numpy()
        np.testing.assert_array_equal(together[row], expected)
    complete = together[4].view(np.uint32)
    assert all(complete[t >> 5] >> (t & 31) & 1 for t in STOPS)  # the complete row may stop
    assert not any(together[0].view(np.uint32)[t >> 5] >> (t & 31) & 1 for t in STOPS)
