"""Constrained decoding: every output matches its regex / validates against its schema, at any temperature."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pydantic import BaseModel

from kestrel import Engine, SamplingParams

# ---- generated constraints ------------------------------------------------------------------------
NAMES = st.sampled_from(["id", "name", "tags", "score", "ok", "kind", "items", "note"])
LEAF_SCHEMAS = st.one_of(
    st.integers(1, 12).map(lambda n: {"type": "string", "maxLength": n}),
    st.tuples(st.integers(-1000, 0), st.integers(0, 1000)).map(
        lambda b: {"type": "integer", "minimum": b[0], "maximum": b[1]}),
    # numbers: multipleOf bounds the fraction digits (without it a random model may never stop writing them;
    # unbounded numbers are tested on the real model below); binary fractions so jsonschema checks them exactly
    st.tuples(st.integers(-100, 0), st.integers(1, 100), st.sampled_from([0.5, 0.25])).map(
        lambda b: {"type": "number", "minimum": b[0], "maximum": b[1], "multipleOf": b[2]}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.sampled_from(["red", "green", "blue", "a b", "x"]), min_size=1, max_size=4, unique=True).map(
        lambda e: {"enum": e}),
)


def _object(children):
    return st.dictionaries(NAMES, children, min_size=1, max_size=4).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda req: {"type": "object", "properties": props, "required": req}))


def _array(children):
    return st.tuples(children, st.integers(0, 2), st.integers(0, 2)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]})


SCHEMAS = _object(st.recursive(LEAF_SCHEMAS, lambda c: _object(c) | _array(c), max_leaves=6))

# bounded pieces (a random model need not stop on its own); [0-9], not \d: Rust's regex knows newer
# Unicode digits than Python 3.11's re does
REGEX_PIECES = st.sampled_from([
                               r"[a-z]{1,6}", r"[0-9]{1,4}", r"(yes|no|maybe)", r"[A-Z][a-z]{0,5}", r"-", r", ",
                                r"(ab)?c", r"[0-9a-f]{2}", r"x{1,3}?y", r"\.", r" ", r"(cat|dog)s?"])
REGEXES = st.lists(REGEX_PIECES, min_size=1, max_size=5).map("".join)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return Engine(tiny_llama_dir, dtype="float32")


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schemas=st.lists(SCHEMAS, min_size=4, max_size=4), temperature=st.sampled_from([0.0, 1.0]),
       jump_forward=st.booleans())
def test_json_schema_outputs_always_validate(tiny, schemas, temperature, jump_forward):
    prompts = [f"Give me JSON number {i}:" for i in range(len(schemas))]
    params = [SamplingParams(max_tokens=400, temperature=temperature, json_schema=s, jump_forward=jump_forward, seed=i)
              for i, s in enumerate(schemas)]
    for schema, out in zip(schemas, tiny.generate(prompts, params)):
        assert out.finish_reason == "stop", (schema, out.text)
        jsonschema.validate(json.loads(out.text), schema)
        assert tiny.tokenizer.decode(out.token_ids, skip_special_tokens=True) == out.text  # tokens and text agree
        assert list(json.loads(out.text)) == [k for k in schema["properties"] if k in json.loads(out.text)]  # key order


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(regexes=st.lists(REGEXES, min_size=4, max_size=4), temperature=st.sampled_from([0.0, 1.0]))
def test_regex_outputs_always_match(tiny, regexes, temperature):
    params = [SamplingParams(max_tokens=200, temperature=temperature, regex=r, seed=i) for i, r in enumerate(regexes)]
    for regex, out in zip(regexes, tiny.generate(["Say something:"] * len(regexes), params)):
        assert out.finish_reason == "stop", (regex, out.text)
        assert re.fullmatch(regex, out.text), (regex, out.text)


def test_choices_grammar_and_json_object(tiny):
    outs = tiny.generate(["Pick:"] * 6, [
        SamplingParams(max_tokens=20, temperature=1.0, seed=s, choices=["alpha", "beta gamma", "delta"]) for s in range(3)
    ] + [
        SamplingParams(max_tokens=60, temperature=1.0, seed=1,
                       grammar='root ::= "Name: " [A-Z] [a-z]{1,8} ", age " [1-9] [0-9]?'),
        SamplingParams(max_tokens=60, temperature=1.0, seed=2, grammar='start: "n=" INT ("." INT)?\n%import common.INT'),
        SamplingParams(max_tokens=200, temperature=0.0, json_object=True),
    ])
    assert all(o.text in ("alpha", "beta gamma", "delta") for o in outs[:3])
    assert re.fullmatch(r"Name: [A-Z][a-z]{1,8}, age [1-9][0-9]?", outs[3].text), outs[3].text
    assert re.fullmatch(r"n=\d+(\.\d+)?", outs[4].text), outs[4].text
    if outs[5].finish_reason == "stop":
        assert isinstance(json.loads(outs[5].text), dict)


def test_invalid_constraints_say_what_is_wrong(tiny):
    cases = [(dict(regex="a(b"), "(?s)regex is invalid.*unclosed group"),
             (dict(json_schema={"type": "nonsense"}), "json_schema is invalid.*nonsense"),
             (dict(json_schema="{not json"), "json_schema is invalid.*not valid JSON"),
             (dict(grammar='root ::= ("a"'), "grammar is invalid"),
             (dict(choices=[]), "choices"),
             (dict(regex="a", choices=["a"]), "at most one")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            tiny.generate("x", SamplingParams(**kwargs))
    assert not tiny.has_unfinished()


class Person(BaseModel):
    name: str
    age: int
    height_m: float  # an unbounded JSON number: the real model ends it


PERSON_PROMPTS = ["Describe Alice, 30, 1.65 m tall, as JSON.", "Bob is 41 and 1.80 m tall. Give his record as JSON.",
                  "Make up a person as JSON.", "JSON for Carla (age 25, height 1.7 m)."]


def test_jump_forward_saves_steps_and_keeps_the_text(embedded_dir):
    engine = Engine(embedded_dir, dtype="float32")
    convs = [[{"role": "user", "content": p}] for p in PERSON_PROMPTS]
    outs = {}
    for jf in (False, True):
        steps = engine.stats.steps
        outs[jf] = engine.chat(convs, SamplingParams(max_tokens=64, temperature=0.0, json_schema=Person, jump_forward=jf))
        outs[jf, "steps"] = engine.stats.steps - steps
    for plain, fast in zip(outs[False], outs[True]):
        Person.model_validate_json(fast.text)
        assert list(json.loads(fast.text)) == ["name", "age", "height_m"] and plain.finish_reason == "stop"
        assert fast.text == plain.text
        assert fast.forced_tokens >= 6 and plain.forced_tokens == 0  # '{"name": "', '", "age": ', ...
    assert outs[True, "steps"] < outs[False, "steps"]
    # a client is charged for every output token, forced or sampled, once
    assert engine.client_usage()["anonymous"][2] == sum(o.output_tokens for jf in (False, True) for o in outs[jf])
    assert engine.grammars.compiles == 1  # one schema, compiled once, shared by 8 requests


def test_jump_forward_retokenizes_the_boundary_with_the_sampled_token(tiny):
    """A lone `"` sampled before the forced `, "age": ` is replaced by the canonical `",` ` "` `age` `":`."""
    from kestrel.decoding.grammar import GrammarSpec

    tok = tiny.tokenizer
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    state = tiny.grammars.state(GrammarSpec("json_schema", json.dumps(schema)))
    for t in tok('{"name": "Bob', add_special_tokens=False).input_ids:
        assert state.accept(t)
    (quote,) = tok('"', add_special_tokens=False).input_ids
    assert state.accept(quote)
    canonical = state.retokenize_boundary(quote)
    text = tok.decode(canonical)
    assert canonical[0] != quote and text.startswith('", "age":') and '", "age": '.startswith(text)
    assert canonical == tok(text, add_special_tokens=False).input_ids
    for t in tok(' 42}', add_special_tokens=False).input_ids:  # the matcher moved past them
        assert state.accept(t)
    assert state.done
    # a clean boundary is left alone
    state = tiny.grammars.state(GrammarSpec("json_schema", json.dumps(schema)))
    (opening,) = tok('{"', add_special_tokens=False).input_ids
    assert state.accept(opening) and state.retokenize_boundary(opening) is None


def test_compile_queue_holds_requests_until_their_grammar_is_ready(tiny):
    """What keeps compiles off the engine loops (server and in-process language backend)."""
    import time

    from kestrel.decoding.grammar import CompileQueue

    queue = CompileQueue(tiny.grammars)
    params = SamplingParams(regex="[a-z]{3}-[0-9]{5}-held")
    assert queue.hold(params, "ok") and queue.hold(SamplingParams(regex="a(b"), "bad") and queue
    got, deadline = {}, time.monotonic() + 30
    while queue and time.monotonic() < deadline:
        got.update(queue.ready())
        time.sleep(0.01)
    assert got["ok"] is None and isinstance(got["bad"], ValueError) and "unclosed group" in str(got["bad"])
    assert not queue.hold(params, "again")  # compiled once, now a cache hit: goes straight to the engine
    assert not queue.hold(SamplingParams(), "unconstrained")
    queue.shutdown()
