"""Kestrel: an LLM serving system."""
from kestrel.config import EngineConfig
from kestrel.engine.engine import Engine
from kestrel.engine.request import CompletionOutput, RequestOutput
from kestrel.engine.sampling_params import SamplingParams

__all__ = ["Engine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
