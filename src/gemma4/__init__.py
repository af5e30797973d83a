"""gemma4: run Google's Gemma 4 models faithfully and fast."""

from .config import AudioConfig, Config, ConfigError, TextConfig, VisionConfig
from .model.gemma4 import Model

__version__ = "0.1.0"
__all__ = ["Model", "Config", "TextConfig", "VisionConfig", "AudioConfig", "ConfigError"]
