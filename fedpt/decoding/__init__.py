"""Decoding any LanguageModel: one sampling config, one continuous-batching engine, and offline generation
over it (the server in fedpt/serving drives the same engine)."""

from fedpt.decoding.engine import Engine, QueueFull, Report, Request, TokenInfo
from fedpt.decoding.offline import generate, generate_each, generate_tokens
from fedpt.decoding.sampling import Sampling, choose

__all__ = ["Engine", "QueueFull", "Report", "Request", "Sampling", "TokenInfo", "choose", "generate",
           "generate_each", "generate_tokens"]
