"""Tensor parallelism with quantized weights: compressed-tensors checkpoints (W4A16: int4 in groups of 32, packed 8 a
word; W8A16: int8 per channel, packed 4 a word; FP8 per channel, and in blocks) and quantization on load
(`quantization=`), split over gloo ranks, give the logits and greedy tokens of the single-process model loaded the
same way.

Each rank holds its part of the very values and scales one process holds (`assert_holds_its_part`: the dequantized
weights, bit for bit; every rank of 2 and of 4, loaded by hand), and fp32 models dequantize them exactly (the twin on
the CPU): against one process only the summation order differs, as with dense weights, and the tolerance is
parallel_support.py's (fp32 logits within 1e-4; measured 2.6e-6 to 1.1e-5 over the cases below and over 31B W4A16
on 4 ranks and fp8 on load). A wrong cut moves the logits by far more (measured on W4A16 26B-A4B: every rank given
rank 0's group scales 1.8, its packed words 3.5, its scale rows 2.2; int8 on load without the maximum of per-channel
scales over the ranks 0.7). The logits over 4 ranks are compared for dense weights only (test_tensor_parallel.py):
4 spawned CPU ranks cost ~20 s here.

The tiny configs' MLPs are widened (128, experts 64) so that int4 groups of 32 fit each rank's part of K over 2 ranks
(over 4 for the dense MLPs); the configs' own width (96: 48 per rank) shows the refusal.
"""

from __future__ import annotations

import json

import pytest
import torch

from parallel_support import IMAGE, assert_matches_one_process, outputs, prompts
from quantized_checkpoints import write_quantized_checkpoint
from reference import multimodal_config_dict

from gemma4 import Model, distributed
from gemma4.config import Config
from gemma4.distributed import Ranks, ShardingError, ShardPlan, shard_model_
from gemma4.distributed.sharding import take
from gemma4.llm import LLM
from gemma4.loading import load_model
from gemma4.model.fused import QuantizedLinear
from gemma4.options import override
from gemma4.random_init import randomize_

WIDE = dict(intermediate_size=128, moe_intermediate_size=64)
# (checkpoint scheme or quantization=, family, ranks, expert parallel): int4 groups cut along K in o_proj, down_proj
# and the experts' down_proj (E2B also with PLE and KV sharing); int8 and fp8 per-channel scales replicated for the
# cuts along K; whole experts with fp8. On load: int4 with E2B's tied head quantized on the CPU, int8 with the experts
# cut by width (per-channel scales of row-parallel parts: the maximum over the ranks).
STORED = [("W4A16", "E2B", 2, False), ("W4A16", "26B-A4B", 2, False), ("W8A16", "31B", 2, False),
          ("FP8_DYNAMIC", "26B-A4B", 2, True)]
ON_LOAD = [("int4", "E2B", 2, False), ("int8", "26B-A4B", 2, False)]
CASES = STORED + ON_LOAD


def config_dict(family: str, widths: dict = WIDE) -> dict:
    config = dict(multimodal_config_dict(family), image_token_id=IMAGE)
    config["text_config"].update(widths)
    return config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(scheme, family) -> a compressed-tensors checkpoint; (None, family) -> a dense fp32 one."""
    paths = {}
    for scheme, family, _, _ in STORED:
        paths[scheme, family] = write_quantized_checkpoint(config_dict(family), scheme,
                                                           tmp_path_factory.mktemp(f"{scheme}-{family}"), seed=3)
    for scheme in ("W4A16", "FP8_BLOCK32"):
        paths[scheme, "31B"] = write_quantized_checkpoint(config_dict("31B"), scheme,
                                                          tmp_path_factory.mktemp(f"{scheme}-31B"), seed=3)
    for family in {family for _, family, _, _ in ON_LOAD} | {"26B-A4B"}:  # PARTS quantizes 26B-A4B on load
        paths[None, family] = tmp_path_factory.mktemp(f"dense-{family}")
        randomize_(Model(Config.from_dict(config_dict(family))), seed=1).save_pretrained(paths[None, family])
    return paths


def source(checkpoints, scheme: str, family: str) -> tuple:
    """(checkpoint, quantization=) of a case."""
    on_load = scheme in ("int4", "int8", "fp8")
    return checkpoints[None if on_load else scheme, family], scheme if on_load else None


def assert_holds_its_part(part, whole, specs: dict) -> int:
    """Every quantized weight of `part` (a rank's model) dequantizes to that rank's part (`specs`: ShardPlan.specs;
    {}: all) of `whole`'s, the tied head quantized for the CPU too; returns how many were compared."""
    compared = 0
    for name, module in part.named_modules():
        if isinstance(module, QuantizedLinear):
            spec = specs.get(name + ".weight", specs.get(name))  # a Linear's weight, or the experts' own name
            want = whole.get_submodule(name).weight.dequantize(torch.float32)
            want = want if spec is None else take(want, spec)
            assert torch.equal(module.weight.dequantize(torch.float32), want), name
            compared += 1
    if whole.quantized_head is not None:
        head = whole.quantized_head.dequantize(torch.float32)
        if rows := specs.get("model.language_model.embed_tokens.weight"):
            head = take(head, rows)
        assert torch.equal(part.quantized_head.dequantize(torch.float32), head)
    return compared


@pytest.mark.parametrize("scheme,family,size,expert_parallel", CASES,
                         ids=[f"{s}-{f}-tp{n}{'-ep' if e else ''}" for s, f, n, e in CASES])
def test_logits_and_greedy_tokens_equal_one_process(checkpoints, scheme, family, size, expert_parallel):
    path, quantization = source(checkpoints, scheme, family)
    kwargs = dict(dtype="float32", device="cpu", max_model_len=256, max_batch_size=4, quantization=quantization)
    single = LLM(path, **kwargs)
    expected = outputs(single, prompts())
    llm = LLM(path, tensor_parallel_size=size, enable_expert_parallel=expert_parallel, **kwargs)
    try:
        plan = ShardPlan(Config.from_file(path), Ranks(0, size), expert_parallel)
        assert assert_holds_its_part(llm.model, single.model, plan.specs()) > 20
        assert isinstance(llm.model.model.language_model.layers[0].mlp.down_proj, QuantizedLinear)
        if family == "E2B" and quantization:  # the tied head, quantized for the CPU: this rank's vocabulary rows
            assert llm.model.quantized_head.shape[0] == 384 // size
        assert_matches_one_process(llm, single.model, expected)
    finally:
        distributed.shutdown()


# (scheme or quantization=, family, ranks, expert parallel): every rank loaded by hand (no process group: quantized on
# load only in groups, whose scales need no collective)
PARTS = [("W4A16", "26B-A4B", 2, False), ("W4A16", "26B-A4B", 2, True), ("W4A16", "31B", 4, False),
         ("W8A16", "31B", 2, False), ("FP8_DYNAMIC", "26B-A4B", 2, False), ("FP8_BLOCK32", "31B", 2, False),
         ("int4", "26B-A4B", 2, False)]


@pytest.mark.parametrize("scheme,family,size,expert_parallel", PARTS,
                         ids=[f"{s}-{f}-tp{n}{'-ep' if e else ''}" for s, f, n, e in PARTS])
def test_each_rank_reads_only_its_slices(checkpoints, scheme, family, size, expert_parallel):
    """Each rank's quantized weights are its part of the whole ones (quantized on load: the part quantized is the
    part of the whole quantized), read as slices (their buffers own only their bytes); the same cut applied in place
    to the loaded whole model (shard_model_) holds the same."""
    path, quantization = source(checkpoints, scheme, family)
    config = Config.from_file(path)
    with override(fuse_projections=False):  # shard_model_ cuts unfused models
        whole = load_model(path, dtype=torch.float32, device="cpu", quantization=quantization)
        for rank in range(size):
            plan = ShardPlan(config, Ranks(rank, size), expert_parallel)
            part = load_model(path, dtype=torch.float32, device="cpu", quantization=quantization, shard=plan)
            assert assert_holds_its_part(part, whole, plan.specs()) > 20
            for name, buffer in part.named_buffers():
                if name.endswith((".values", ".scale")):
                    assert buffer.untyped_storage().nbytes() == buffer.numel() * buffer.element_size(), name
    if family == "26B-A4B":  # 8 experts of width 64: [E, 2W, H]
        experts = part.model.language_model.layers[0].experts
        assert experts.gate_up_proj.weight.shape == ((8 // size, 128, 64) if expert_parallel else (8, 128 // size, 64))
    cut = shard_model_(whole, plan).ready_()  # the last rank's
    assert {n: type(m) for n, m in cut.named_modules()} == {n: type(m) for n, m in part.named_modules()}
    assert assert_holds_its_part(part, cut, {}) > 20


def quantization_config(scheme: str, checkpoints) -> dict:
    if scheme == "FP8_BLOCK":
        weights = {"type": "float", "num_bits": 8, "strategy": "block", "block_structure": [128, 128]}
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    path = checkpoints[scheme, "31B"]
    return json.loads((path / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("scheme,size,heads,message", [
    ("W4A16", 2, 4, r"layers\.0\.mlp\.down_proj \(int4 per group/32\) at input column 48 splits a group of 32"),
    ("W8A16", 32, 32, r"layers\.0\.mlp\.down_proj \(int8 per channel\) at input column 3 splits a word of 4 packed"),
    ("FP8_BLOCK", 2, 4, r"layers\.0\.self_attn\.q_proj \(float8 per block/128x128\) at row 64 splits a block of 128"),
])
def test_cuts_that_split_quantized_tensors_fail_before_loading(checkpoints, scheme, size, heads, message):
    """The tiny configs' own MLP width (96: 48 per rank) over int4 groups of 32, 3 inputs per rank of int8 packed 4 a
    word, fp8 blocks of 128 rows over 64 rows per rank: named from config.json alone, before any process starts or
    any weight is read."""
    config = config_dict("31B", {})
    config["text_config"]["num_attention_heads"] = heads
    config["quantization_config"] = quantization_config(scheme, checkpoints)
    with pytest.raises(ShardingError, match=message):
        distributed.check_shardable(Config.from_dict(config), size)


def test_quantization_on_load_that_splits_groups_fails_before_loading(checkpoints, tmp_path):
    dense = tmp_path / "dense"
    randomize_(Model(Config.from_dict(config_dict("31B", {}))), seed=1).save_pretrained(dense)
    with pytest.raises(ShardingError, match=r"layers\.0\.mlp\.down_proj \(int4 per group/32\) at input column 48"):
        LLM(dense, dtype="float32", device="cpu", quantization="int4", tensor_parallel_size=2)
    distributed.check_shardable(Config.from_file(dense), 2, quantization="int8")  # per channel: no groups
    # 26B-A4B's experts, 64 wide, cut by 4 ranks: 16 inputs of a group of 32 each; whole experts fit
    moe = Config.from_file(checkpoints[None, "26B-A4B"])
    with pytest.raises(ShardingError, match=r"experts\.down_proj .* splits a group .*--enable-expert-parallel"):
        distributed.check_shardable(moe, 4, quantization="int4")
    distributed.check_shardable(moe, 4, expert_parallel=True, quantization="int4")
    assert distributed.current() is None  # nothing was started
