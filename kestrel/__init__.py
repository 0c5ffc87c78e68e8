"""Kestrel: an LLM serving system."""
from kestrel.config import EngineConfig
from kestrel.engine.engine import Engine
from kestrel.engine.request import CompletionOutput, RequestOutput
from kestrel.engine.sampling_params import SamplingParams
from kestrel.lang import *  # noqa: F401,F403 - the frontend language: `import kestrel as sgl` runs SGLang programs
from kestrel.lang import __all__ as _language

__all__ = ["Engine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", *_language]
__version__ = "0.1.0"
