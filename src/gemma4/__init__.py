"""gemma4: run Google's Gemma 4 models faithfully and fast."""

import importlib

from .config import AudioConfig, Config, ConfigError, TextConfig, VisionConfig
from .pretrained import Model

__version__ = "0.1.0"
__all__ = ["Model", "Processor", "LLM", "SamplingParams", "StructuredOutputsParams", "Config", "TextConfig",
           "VisionConfig", "AudioConfig", "ConfigError"]
# Imported on first use: the processor pulls in tokenizers, PIL and the audio/video code.
_LAZY = {"Processor": ".processing.processor", "LLM": ".llm", "SamplingParams": ".engine.sampling",
         "StructuredOutputsParams": ".engine.structured"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'gemma4' has no attribute {name!r}")
