"""The reference drafter (transformers >= 5.24's Gemma4AssistantForCausalLM), run in its own process.

`python tests/assistant_reference.py SPEC.json OUT_DIR` builds a drafter of the spec with varied random weights and
writes it with `save_pretrained` to OUT_DIR/checkpoint (or, with "load" in the spec, loads that checkpoint), then drafts `steps` tokens greedily as transformers'
candidate generator does (`Gemma4AssistantCandidateGenerator.get_candidates`: the target's embedding of the last
token joined with the target's hidden state, the same position every step, the target's K/V as
`shared_kv_states`), and writes its inputs and outputs to OUT_DIR/reference.pt. A separate process, so that a test
session whose transformers is older than 5.24 (which cannot build the drafter) can use a copy from GEMMA4_TF524.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers

from gemma4.random_init import randomize_


def main(spec_path: str, out: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(out)
    generator = torch.Generator().manual_seed(spec["seed"])
    if "load" in spec:  # a checkpoint written by us, read by transformers: every tensor must be found and used
        model, info = transformers.Gemma4AssistantForCausalLM.from_pretrained(
            spec["load"], dtype=torch.float32, attn_implementation="sdpa", output_loading_info=True)
        if any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
            raise SystemExit(f"transformers did not load {spec['load']} cleanly: {info}")
        text = model.config.get_text_config()
    else:
        text = transformers.Gemma4TextConfig(**spec["text_config"])
        config = transformers.Gemma4AssistantConfig(text_config=text, **spec["assistant"])
        model = transformers.Gemma4AssistantForCausalLM(config)
        model.config._attn_implementation = "sdpa"
        randomize_(model, spec["seed"])
        if model.masked_embedding is not None:  # integer buffer: randomize_ leaves it; a random clustering
            model.masked_embedding.token_ordering.copy_(torch.randperm(text.vocab_size, generator=generator))
        model.save_pretrained(out / "checkpoint")
    model = model.float().eval()

    # The target's side, random: its input embedding table, its hidden state at the last token, its K/V.
    batch, backbone, length = spec["batch"], spec["assistant"]["backbone_hidden_size"], spec["length"]
    target_embedding = torch.randn(text.vocab_size, backbone, generator=generator)
    hidden = torch.randn(batch, 1, backbone, generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(spec["left_padding"]):
        attention_mask[row, :pad] = 0
    shapes = {"full_attention": (spec["global_kv_heads"], length, spec["global_head_dim"]),
              "sliding_attention": (spec["text_config"]["num_key_value_heads"], spec["sliding_length"],
                                    spec["text_config"]["head_dim"])}
    shared_kv = {t: (torch.randn(batch, *s, generator=generator), torch.randn(batch, *s, generator=generator))
                 for t, s in shapes.items()}
    # Each row's query sits at the position of its last token (the reference's candidate generator passes
    # input length - 1; per row here, so that left-padded rows are consistent with their own keys).
    positions = (attention_mask.sum(-1) - 1)[:, None]
    last_token = torch.randint(3, text.vocab_size, (batch, 1), generator=generator)

    logits, tokens, hiddens = [], [], []
    token, state = last_token, hidden
    with torch.no_grad():
        for _ in range(spec["steps"]):
            inputs_embeds = torch.cat([target_embedding[token], state], dim=-1)
            output = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=positions,
                           shared_kv_states=shared_kv, use_cache=False)
            token, state = output.logits.argmax(dim=-1), output.last_hidden_state
            logits.append(output.logits)
            tokens.append(token)
            hiddens.append(state)
    torch.save({"target_embedding": target_embedding, "hidden": hidden, "attention_mask": attention_mask,
                "shared_kv": shared_kv, "positions": positions, "last_token": last_token,
                "logits": torch.cat(logits, 1), "tokens": torch.cat(tokens, 1), "hiddens": torch.cat(hiddens, 1),
                "version": transformers.__version__}, out / "reference.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
