"""The frontend language: LLM programs in Python (SGLang's programming model).

    import kestrel as kl

    @kl.function
    def qa(s, question):
        s += kl.user(question)
        s += kl.assistant(kl.gen("answer", max_tokens=64))

    qa.run(question="...")["answer"]
"""
from kestrel.lang.backend import Backend, EngineBackend, RuntimeEndpoint
from kestrel.lang.interpreter import Function, ProgramState, function, get_default_backend, set_default_backend
from kestrel.lang.ir import assistant, gen, select, system, user

__all__ = ["Backend", "EngineBackend", "RuntimeEndpoint", "Function", "ProgramState", "function", "gen", "select",
           "system", "user", "assistant", "set_default_backend", "get_default_backend"]
