"""slipstream-template: a complete vendor plugin to copy (see this folder's README)."""

__version__ = "0.1.0"
