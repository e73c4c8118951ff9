"""Serving a model (the proxy-tuned large model, or any LanguageModel) over an OpenAI-compatible HTTP API."""

from fedpt.serving.protocol import Limits
from fedpt.serving.server import running, serve

__all__ = ["Limits", "running", "serve"]
