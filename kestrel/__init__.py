"""Kestrel: an LLM serving system."""
from kestrel.config import EngineConfig
from kestrel.engine.engine import Engine
from kestrel.engine.request import CompletionOutput, RequestOutput
from kestrel.engine.sampling_params import SamplingParams
from kestrel.lang import (Backend, EngineBackend, ProgramState, RuntimeEndpoint, assistant, function, gen, select,
                          set_default_backend, system, user)

__all__ = ["Engine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "function", "gen",
           "select", "system", "user", "assistant", "set_default_backend", "RuntimeEndpoint", "EngineBackend",
           "Backend", "ProgramState"]
__version__ = "0.1.0"
