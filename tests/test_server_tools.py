"""OpenAI tool calling through the real openai client: every tool_choice mode, streamed and not; calls whose
arguments always validate against their function's schema (random schemas, temperature 1); tool results in the
history; clear errors."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client()


def _validate(calls, tools=TOOLS) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def _streamed(client, **kwargs):
    """The content and the tool calls assembled from a stream's chunks, and the finish_reason."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
            entry["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("choice", ["required", "named", "auto", "none"])
def test_every_tool_choice_mode_streamed_and_not(client, choice):
    tool_choice = {"type": "function", "function": {"name": "get_time"}} if choice == "named" else choice
    kwargs = dict(model="default", messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=120,
                  temperature=0, parallel_tool_calls=False)
    r = client.chat.completions.create(**kwargs)
    message, finish = r.choices[0].message, r.choices[0].finish_reason
    if choice in ("required", "named"):
        assert finish == "tool_calls" and message.content is None and len(message.tool_calls) == 1
        _validate(message.tool_calls)
        assert choice != "named" or message.tool_calls[0].function.name == "get_time"
    elif choice == "none":
        assert message.tool_calls is None and message.content and "<tool_call>" not in message.content
    else:  # the model chooses; the grammar guarantees the shape either way
        assert (message.tool_calls is None) == (finish != "tool_calls")
        if message.tool_calls:
            _validate(message.tool_calls)
        else:
            assert "<tool_call>" not in message.content
    content, calls, streamed_finish = _streamed(client, **kwargs)
    assert streamed_finish == finish
    assert [(c["name"], c["arguments"]) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    assert content == (message.content or "")


def test_parallel_calls(client):
    r = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=150, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert len(calls) >= 2 and len({c.id for c in calls}) == len(calls)  # this tiny model keeps calling
    _validate(calls)


SCALARS = st.sampled_from([{"type": "integer", "minimum": -50, "maximum": 50}, {"type": "number"},
                           {"type": "boolean"}, {"type": "string", "maxLength": 8},
                           {"type": "string", "enum": ["red", "green", "blue"]}])
FIELDS = st.one_of(SCALARS, st.builds(lambda item: {"type": "array", "items": item, "maxItems": 3}, SCALARS))
NAMES = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)


@st.composite
def parameters(draw):
    props = draw(st.dictionaries(NAMES, FIELDS, min_size=1, max_size=4))
    nested = draw(st.booleans())
    if nested:
        props["inner"] = {"type": "object", "properties": {"x": draw(SCALARS)}, "required": ["x"]}
    required = draw(st.lists(st.sampled_from(sorted(props)), unique=True))
    return {"type": "object", "properties": props, "required": required}


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=parameters(), seed=st.integers(0, 2**31), named=st.booleans())
def test_calls_always_validate_against_random_schemas(client, schema, seed, named):
    tool = {"type": "function", "function": {"name": "act", "description": "Do it", "parameters": schema}}
    r = client.chat.completions.create(
        model="default", messages=ASK, tools=[tool, TIME], temperature=1.0, seed=seed, max_tokens=300,
        tool_choice={"type": "function", "function": {"name": "act"}} if named else "required",
        parallel_tool_calls=False)
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and (not named or calls[0].function.name == "act")
    _validate(calls, [tool, TIME])


def test_tool_loops_resume_on_the_paused_kv(server, client):
    """A reply with calls pauses its conversation (its KV pinned by the default auto policy); the next turn, with
    the tool's result, finds the whole previous turn in the cache, and a third turn the second."""
    before = {k: _metric_or_zero(server, k) for k in ("paused", "resumed")}
    history = list(ASK)
    previous = None
    for turn in range(3):
        r = client.chat.completions.create(model="default", messages=history, tools=TOOLS, tool_choice="required",
                                           max_tokens=120, temperature=0, parallel_tool_calls=False)
        if previous is not None:
            # all of the previous turn but the tokens that never went through a forward: the last sampled one and
            # the call's closing `"}}\n</tool_call>`, which the grammar forced after it (jump-forward)
            cached, whole = (r.usage.prompt_tokens_details.cached_tokens,
                             previous.usage.prompt_tokens + previous.usage.completion_tokens)
            assert whole - 12 <= cached <= whole
        call = r.choices[0].message.tool_calls[0]
        history += [r.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": f"result {turn}"}]
        previous = r
    assert _metric_or_zero(server, "paused") - before["paused"] == 3
    assert _metric_or_zero(server, "resumed") - before["resumed"] == 2


def test_tool_choice_none_shows_the_tools_so_the_turn_hits_the_cache(client):
    """With tool_choice none the reply is text, but the prompt still shows the tools (as vLLM's does), so a final
    answer after tool calls reuses the conversation's KV instead of recomputing a prompt without them."""
    kwargs = dict(model="default", messages=ASK, tools=TOOLS, max_tokens=8, temperature=0)
    called = client.chat.completions.create(tool_choice="required", **kwargs)
    answer = client.chat.completions.create(tool_choice="none", **kwargs)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason != "tool_calls"
    assert not answer.choices[0].message.content.lstrip().startswith("<tool_call>")
    assert answer.usage.prompt_tokens == called.usage.prompt_tokens
    assert answer.usage.prompt_tokens_details.cached_tokens == answer.usage.prompt_tokens - 1
    # the reply is free text, so another constraint can shape it
    shaped = client.chat.completions.create(tool_choice="none", response_format={"type": "json_object"},
                                            **dict(kwargs, max_tokens=30))
    assert shaped.choices[0].message.content.lstrip().startswith("{")


def _metric_or_zero(server, event: str) -> float:
    try:
        return server.metric(f'kestrel:pause_events_total{{event="{event}"}}')
    except KeyError:
        return 0.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "not among the tools"),
    (dict(tools=[{"type": "function", "function": {"description": "no name"}}]), "function name"),
    (dict(tools=TOOLS + [WEATHER]), "unique"),
    (dict(tool_choice="required"), "tool_choice needs tools"),
    (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice must be"),
    (dict(tools=TOOLS, response_format={"type": "json_object"}), "cannot be combined"),
])
def test_bad_tool_requests_say_what_is_wrong(client, kwargs, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model="default", messages=ASK, max_tokens=5, **kwargs)


def test_templates_with_a_tools_section_get_the_tools(tokenizer):
    """A chat template that renders tools (Qwen's, Hermes', ...) gets them; the others get the fallback prompt in
    the system message. Either way an assistant's earlier calls are rendered as the model writes them."""
    import copy

    from kestrel.model.loader import chat_template_ids
    from kestrel.server.protocol import ChatMessage
    from kestrel.server.tools import FALLBACK_PROMPT, call_text, history, plan_tools

    plan = plan_tools(TOOLS, "auto", None)
    messages = [ChatMessage(role="user", content="Hi"),
                ChatMessage(role="assistant", tool_calls=[{"id": "call_1", "function": {
                    "name": "get_time", "arguments": '{"city": "Oslo"}'}}]),
                ChatMessage(role="tool", tool_call_id="call_1", content="09:00")]
    fallback = history(messages, plan, template_renders_tools=False)
    assert fallback[0]["role"] == "system" and FALLBACK_PROMPT.split("\n")[0] in fallback[0]["content"]
    assert fallback[2]["content"] == call_text("get_time", '{"city": "Oslo"}') and fallback[3]["role"] == "tool"
    native = copy.deepcopy(tokenizer)
    native.chat_template = ("{% for t in tools %}[tool {{ t.function.name }}]{% endfor %}"
                            "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    rendered = native.decode(chat_template_ids(native, history(messages, plan, template_renders_tools=True),
                                               add_generation_prompt=False,
                                               tools=[{"type": "function", "function": f} for f in plan.functions]))
    assert rendered.startswith("[tool get_weather][tool get_time]<user>Hi<assistant><tool_call>")
