"""gemma4: run Google's Gemma 4 models faithfully and fast."""

from .config import AudioConfig, Config, ConfigError, TextConfig, VisionConfig
from .pretrained import Model

__version__ = "0.1.0"
__all__ = ["Model", "Processor", "LLM", "SamplingParams", "Config", "TextConfig", "VisionConfig", "AudioConfig", "ConfigError"]


def __getattr__(name):
    # Imported on first use: the processor pulls in tokenizers, PIL and the audio/video code.
    if name == "Processor":
        from .processing.processor import Processor
        return Processor
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name == "SamplingParams":
        from .engine.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'gemma4' has no attribute {name!r}")
