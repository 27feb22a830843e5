"""slipstream-nvidia: NVIDIA backend for slipstream (entry point ``slipstream.backends: nvidia``)."""

__version__ = "0.1.0"
