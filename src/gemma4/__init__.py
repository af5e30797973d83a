"""gemma4: run Google's Gemma 4 models faithfully and fast."""

__version__ = "0.1.0"
