"""SGLang programs run on Kestrel with `import kestrel as sgl`: the language items SGLang programs use, each on the
in-process backend and through `kestrel serve` (the same program gives the same result on both)."""
from __future__ import annotations

import re

import pytest

import kestrel as sgl
from kestrel import Engine


@pytest.fixture(scope="module")
def backends(tiny_llama_dir, tiny_server):
    local = sgl.EngineBackend(Engine(tiny_llama_dir, dtype="float32"))
    remote = sgl.RuntimeEndpoint(tiny_server.url, chat_template_name="chatml")  # the name is accepted, not needed
    yield {"local": local, "remote": remote}
    local.shutdown()
    remote.shutdown()


@sgl.function
def notes(s, topic):
    with s.system():
        s += "You write short notes."
    with s.user():
        s += "Topic: " + topic
    with s.assistant():
        with s.var_scope("note"):
            s += "Note: " + sgl.gen("body", max_tokens=6, temperature=0)
    s["topic_seen"] = topic.upper()
    s += sgl.user_begin() + "Give numbers." + sgl.user_end()
    s += sgl.assistant_begin()
    s += "Count: " + sgl.gen_int("count", max_tokens=5, temperature=0)
    s += "\nRatio: " + sgl.gen("ratio", dtype=float, max_tokens=6, temperature=0)
    s += "\nTrue? " + sgl.gen("flag", dtype="bool", max_tokens=3, temperature=0)
    s += "\nName: " + sgl.gen_string("name", max_tokens=8, temperature=0)
    s += sgl.assistant_end()


@sgl.function
def forks(s, mode):
    s += "Ideas:\n"
    group = s.fork(3)
    group += lambda i: f"{i + 1}. " + sgl.gen("idea", max_tokens=4, temperature=0, stop="\n") + "\n"
    group.join(mode)
    s += "Done."


@sgl.function
def pick(s, method):
    s += "The colour of grass is"
    s += " " + sgl.select("colour", choices=["green", "blue", "a shade of red"], choices_method=method)


def run_notes(backend) -> sgl.ProgramState:
    return notes(topic="kestrels", backend=backend)  # calling the program runs it, as in SGLang


def test_roles_var_scope_typed_gens_and_set_var(backends):
    results = {}
    for name, backend in backends.items():
        s = run_notes(backend)
        messages = s.messages()
        assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
        assert messages[1]["content"] == "Topic: kestrels" and messages[2]["content"] == s["note"]
        assert s["note"] == "Note: " + s["body"] and s["topic_seen"] == "KESTRELS"
        assert re.fullmatch(r"[-+]?[0-9]+", s["count"]) and re.fullmatch(r"[-+]?[0-9]*\.?[0-9]+", s["ratio"])
        assert s["flag"] in ("True", "False")
        cut = s.get_meta_info("name")["finish_reason"]["type"] == "length"  # out of tokens before the closing quote
        assert re.fullmatch(r'"[\w\d\s]*' + ('' if cut else '"'), s["name"]), s["name"]
        assert "<|im_start|>user\nGive numbers.<|im_end|>" in s.text()
        results[name] = (s.text(), s.variables())
    assert results["local"] == results["remote"]


@pytest.mark.parametrize("mode", ["gather_variable", "concate_and_append"])
def test_fork_groups_and_join(backends, mode):
    results = {}
    for name, backend in backends.items():
        s = forks.run(mode=mode, backend=backend)
        if mode == "gather_variable":
            assert isinstance(s["idea"], list) and len(s["idea"]) == 3
            assert s.text() == "Ideas:\nDone."  # the forks' text stays with the forks
        else:
            assert "idea" not in s and s.text().startswith("Ideas:\n1. ") and "\n2. " in s.text()
            assert s.text().endswith("\nDone.") and s.text().count("\n3. ") == 1
        results[name] = s.text(), s.variables()
    assert results["local"] == results["remote"]


def test_streaming_a_variable(backends):
    for backend in backends.values():
        s = notes.run(topic="owls", backend=backend, stream=True)
        pieces = list(s.text_iter("body"))
        assert "".join(pieces) == s["body"] and len(pieces) >= 1
        s = notes.run(topic="owls", backend=backend, stream=True)
        assert "".join(s.text_iter()) == s.text()
        plain = notes.run(topic="owls", backend=backend)
        assert list(plain.text_iter("count")) == [plain["count"]]  # without streaming: the value once


def test_choices_methods(backends):
    picks = {}
    for name, backend in backends.items():
        for method in (sgl.token_length_normalized, sgl.greedy_token_selection,
                       sgl.unconditional_likelihood_normalized):
            s = pick.run(method=method, backend=backend)
            assert s["colour"] in ("green", "blue", "a shade of red")
            picks[name, repr(method)] = s["colour"]
    assert {k[1]: v for k, v in picks.items() if k[0] == "local"} == \
        {k[1]: v for k, v in picks.items() if k[0] == "remote"}


def test_choice_methods_decide_as_documented():
    longer_worse_on_average = [[-1.0, -5.0], [-2.0]]
    assert sgl.token_length_normalized(longer_worse_on_average)[0] == 1  # mean -3 vs -2
    assert sgl.greedy_token_selection(longer_worse_on_average)[0] == 0  # its first token is the likeliest
    cond, prior = [[-2.0, -2.0], [-1.0, -1.0]], [[0.0, -4.0], [0.0, 0.0]]
    assert sgl.token_length_normalized(cond)[0] == 1
    assert sgl.unconditional_likelihood_normalized(cond, prior) == (0, [0.0, -1.0])


def test_streamed_runs_and_forks_at_the_start(backends):
    """Reading a streamed run's state waits for the program body (it may branch on earlier results); a program
    may fork before it has any text."""
    @sgl.function
    def branching(s):
        s += "Q: " + sgl.gen("q", max_tokens=3, temperature=0)
        if s["q"] is not None:
            s += " A: " + sgl.gen("a", max_tokens=3, temperature=0)

    @sgl.function
    def forked_first(s):
        forks = s.fork(2)
        forks += lambda i: f"Topic {i}: " + sgl.gen("t", max_tokens=2, temperature=0)
        forks.join()

    for backend in backends.values():
        state = branching.run(backend=backend, stream=True)
        assert state["a"] is not None and state.text().endswith(state["a"])
        assert len(forked_first.run(backend=backend)["t"]) == 2


def test_default_backend_and_errors(backends):
    import kestrel.lang.interpreter as interpreter

    previous = interpreter._default_backend
    sgl.set_default_backend(backends["remote"])
    try:
        assert pick(method=None)["colour"] in ("green", "blue", "a shade of red")
    finally:
        interpreter._default_backend = previous
    with pytest.raises(ValueError, match="dtype"):
        sgl.gen("x", dtype=list)
    with pytest.raises(ValueError, match="min_tokens cannot be combined"):
        sgl.SamplingParams(min_tokens=2, regex="a+").validate()
    with pytest.raises(ValueError, match="temperature"):
        sgl.select("x", ["a", "b"], temperature=0.7)

    @sgl.function
    def unbalanced(s):
        s += sgl.user_end()

    with pytest.raises(ValueError, match="closes no open user message"):
        unbalanced.run(backend=backends["local"])
