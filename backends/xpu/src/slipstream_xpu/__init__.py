"""slipstream-xpu: slipstream backend for Intel GPUs (Data Center Max, Arc) through torch.xpu."""

__version__ = "0.1.0"
