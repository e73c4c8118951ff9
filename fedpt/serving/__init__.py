"""Serving a model (the proxy-tuned large model, or any LanguageModel) over an OpenAI-compatible HTTP API."""

from fedpt.serving.api import Limits
from fedpt.serving.engine import Engine, Sampling
from fedpt.serving.server import running, serve

__all__ = ["Engine", "Limits", "Sampling", "running", "serve"]
