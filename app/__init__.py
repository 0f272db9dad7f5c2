"""quantserve: a REST inference service for quantized LLMs."""

__version__ = "0.1.0"
