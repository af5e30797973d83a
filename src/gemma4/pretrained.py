"""`gemma4.Model`: the Gemma 4 network (model/gemma4.py) as users hold it, with loading, saving and generation."""

from __future__ import annotations

import torch

from .engine.generate import GenerateOutput, generate
from .loading import load_model, save_model
from .model.gemma4 import Gemma4


class Model(Gemma4):
    """`model(input_ids) -> logits [batch, seq, vocab]`, plus transformers' conveniences.

    Build with `Model.from_pretrained(path)` (a checkpoint directory or hub id; see loading.py) or `Model(config)`
    for random/empty weights."""

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | str | None = None, device: str | torch.device = "auto",
                        **kwargs) -> "Model":
        return load_model(path, dtype=dtype, device=device, model_class=cls, **kwargs)

    def save_pretrained(self, directory, **kwargs) -> None:
        save_model(self, directory, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor | GenerateOutput:
        """transformers-style generation on the engine: the [batch, prompt + new] tensor, or with
        `return_dict_in_generate=True` a GenerateOutput (sequences, and scores / logits per step when asked); see
        engine/generate.py for the arguments."""
        return generate(self, input_ids, attention_mask, **kwargs)
