"""The frontend language: LLM programs in Python (SGLang's programming model).

    import kestrel as kl

    @kl.function
    def qa(s, question):
        s += kl.user(question)
        s += kl.assistant(kl.gen("answer", max_tokens=64))

    qa.run(question="...")["answer"]
"""
from kestrel.lang.backend import Backend, EngineBackend, RuntimeEndpoint
from kestrel.lang.choices import greedy_token_selection, token_length_normalized, unconditional_likelihood_normalized
from kestrel.lang.compound import CallEstimate, VoteResult, estimate_calls, filter_vote, vote
from kestrel.lang.interpreter import (ForkGroup, Function, ProgramState, flush_cache, function, get_default_backend,
                                      get_server_info, set_default_backend)
from kestrel.lang.ir import (assistant, assistant_begin, assistant_end, gen, gen_int, gen_string, select, system,
                             system_begin, system_end, user, user_begin, user_end)

__all__ = ["Backend", "EngineBackend", "RuntimeEndpoint", "Function", "ProgramState", "ForkGroup", "function", "gen",
           "gen_int", "gen_string", "select", "system", "user", "assistant", "system_begin", "system_end",
           "user_begin", "user_end", "assistant_begin", "assistant_end", "token_length_normalized",
           "greedy_token_selection", "unconditional_likelihood_normalized", "set_default_backend",
           "get_default_backend", "flush_cache", "get_server_info", "vote", "filter_vote", "estimate_calls",
           "VoteResult", "CallEstimate"]
