"""Helpers for parity tests: tiny configs of each Gemma 4 family and the transformers 5.24 reference built from them."""

from __future__ import annotations

import copy

import torch

from gemma4.random_init import randomize_

VOCAB = 384
# transformers' default attention; its "eager" path differs from SDPA only by float summation order.
ATTN = "sdpa"

BASE = dict(
    model_type="gemma4_text", vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=64,
    intermediate_size=96, num_attention_heads=4, head_dim=32, global_head_dim=64, sliding_window=8,
    max_position_embeddings=4096, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1,
)

# Each family's switches, on tiny shapes.
FAMILIES = {
    "E2B": dict(BASE, num_hidden_layers=10, num_key_value_heads=1, hidden_size_per_layer_input=16,
                num_kv_shared_layers=5, use_double_wide_mlp=True, attention_k_eq_v=False,
                num_global_key_value_heads=None, layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 2),
    "E4B": dict(BASE, num_hidden_layers=8, num_key_value_heads=2, hidden_size_per_layer_input=16,
                num_kv_shared_layers=3, use_double_wide_mlp=False, attention_k_eq_v=False,
                layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 2),
    "26B-A4B": dict(BASE, num_hidden_layers=6, num_key_value_heads=2, num_global_key_value_heads=1,
                    hidden_size_per_layer_input=0, num_kv_shared_layers=0, attention_k_eq_v=True,
                    enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32,
                    layer_types=(["sliding_attention"] * 2 + ["full_attention"]) * 2,
                    use_bidirectional_attention="vision"),
    "31B": dict(BASE, num_hidden_layers=6, num_key_value_heads=2, num_global_key_value_heads=1,
                hidden_size_per_layer_input=0, num_kv_shared_layers=0, attention_k_eq_v=True,
                layer_types=(["sliding_attention"] * 2 + ["full_attention"]) * 2),
}


def text_config_dict(family: str) -> dict:
    return copy.deepcopy(FAMILIES[family])


def tiny_model(text: dict):
    """Our text-only `Model` of a tiny text config (e.g. text_config_dict(family)), random weights, fp32, eval mode."""
    from gemma4 import Model
    from gemma4.config import Config

    config = Config.from_dict({"model_type": "gemma4", "text_config": text, "vision_config": None,
                               "audio_config": None})
    return randomize_(Model(config), 0).eval()


def engine_outputs(engine, prompts, params) -> list[tuple[list[int], list[float | None]]]:
    """Each prompt's (output ids, their log-probabilities: None where not asked), all submitted to an LLMEngine at
    once. `params`: one SamplingParams for all, or a list of one per prompt."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    got = {i: ([], []) for i in ids}
    for out in engine.run(ids):
        out.raise_error()
        if out.token is not None:
            got[out.seq_id][0].append(out.token)
            got[out.seq_id][1].append(out.logprobs.logprob if out.logprobs else None)
    return [got[i] for i in ids]


def multimodal_config_dict(family: str) -> dict:
    """The same text model inside a `gemma4` config (no towers)."""
    return {"model_type": "gemma4", "text_config": text_config_dict(family), "vision_config": None,
            "audio_config": None, "eos_token_id": [1, 106]}


def reference_model(config: dict, seed: int = 0):
    """A transformers 5.24 model with varied random weights, in fp32 eval mode."""
    import transformers

    if config["model_type"] == "gemma4_text":
        hf_config = transformers.Gemma4TextConfig(**config)
        model = transformers.Gemma4ForCausalLM(hf_config)
    else:
        hf_config = transformers.Gemma4Config(**config)
        model = transformers.Gemma4ForConditionalGeneration(hf_config)
    model.config._attn_implementation = ATTN
    randomize_(model, seed)
    return model.float().eval()


def reference_logits(model, ids, attention_mask=None, position_ids=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).logits.float()


def saved_reference(family: str, directory, seed: int = 0):
    """A tiny random transformers model of `family` written as a checkpoint to `directory` (returned)."""
    reference_model(text_config_dict(family), seed=seed).save_pretrained(directory)
    return directory
