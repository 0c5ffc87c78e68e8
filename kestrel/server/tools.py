"""OpenAI's tool calling on the chat route. Tools reach the model through its chat template when the template
renders them, else through FALLBACK_PROMPT in the system message. Either way the model writes calls as
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks (Hermes' format, which Qwen2.5, Hermes and
SmolLM3 are trained on), and a grammar constrains the output: to calls of the allowed functions whose arguments
match their JSON schemas (`required`, a named function), or to either plain text or such calls (`auto`). So every
call parses and validates; no per-model parser guesses at free text."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from kestrel.decoding.grammar import JSON_OPTIONS, closed_objects
from kestrel.server.protocol import APIError

OPEN, CLOSE, SEPARATOR = "<tool_call>\n", "\n</tool_call>", "\n"
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.S)
FALLBACK_PROMPT = """You can call these functions (JSON schemas of their arguments):
{functions}
To call a function, reply with one block per call and nothing else:
<tool_call>
{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}
</tool_call>
Otherwise, reply to the user as usual."""


def call_text(name: str, arguments: str) -> str:
    """A call as the model writes it (and as an assistant message's tool_calls are rendered back into the
    history, so the next turn's prompt repeats the very tokens the model generated)."""
    return f'{OPEN}{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {arguments}}}{CLOSE}'


@dataclass
class ToolPlan:
    """A chat request's tools and tool_choice: what the prompt offers and what the output may be."""

    functions: list[dict]  # every offered function: {"name", "description", "parameters"}
    allowed: list[dict]  # the functions the output may call
    mode: str  # "auto" (text or calls) | "required" (calls only; also a named function) | "none" (text only)
    parallel: bool  # several calls in one reply

    @property
    def can_call(self) -> bool:
        return self.mode != "none"

    def grammar(self) -> str:
        """The Lark grammar (llguidance) of the allowed outputs."""
        text = "TEXT: /(?s:.+)/ & ~/(?s:\\s*<tool_call>.*)/"  # any reply that does not open a call
        if self.mode == "none":
            return "start: TEXT\n" + text
        rules = []
        for i, fn in enumerate(self.allowed):
            schema = {"x-guidance": JSON_OPTIONS, "type": "object", "additionalProperties": False,
                      "properties": {"name": {"const": fn["name"]}, "arguments": closed_objects(fn["parameters"])},
                      "required": ["name", "arguments"]}
            rules.append(f"call_{i}: {json.dumps(OPEN)} %json {json.dumps(schema)} {json.dumps(CLOSE)}")
        calls = f"calls: call ({json.dumps(SEPARATOR)} call)*" if self.parallel else "calls: call"
        start = "start: TEXT | calls" if self.mode == "auto" else "start: calls"
        return "\n".join([start, calls, "call: " + " | ".join(f"call_{i}" for i in range(len(self.allowed))),
                          *rules] + ([text] if self.mode == "auto" else []))

    def tools_prompt(self) -> str:
        return FALLBACK_PROMPT.format(functions="\n".join(json.dumps(fn, ensure_ascii=False) for fn in self.functions))


def plan_tools(tools: Optional[list], tool_choice: Any, parallel: Optional[bool]) -> Optional[ToolPlan]:
    """Validate OpenAI's tools / tool_choice; None without tools. With tool_choice none the tools are still shown (as
    vLLM does), so the prompt repeats the other turns' and the prefix cache hits, and the reply is plain text."""
    if tool_choice is not None and not tools:
        raise APIError(400, "tool_choice needs tools", "tool_choice")
    if not tools:
        return None
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise APIError(400, 'each tool must be {"type": "function", "function": {"name": ..., ...}}', f"tools[{i}]")
        name, params = fn.get("name"), fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise APIError(400, f"a function name must be 1-64 letters, digits, _ or -, got {name!r}",
                           f"tools[{i}].function.name")
        if not isinstance(params, dict):
            raise APIError(400, "parameters must be a JSON schema object", f"tools[{i}].function.parameters")
        functions.append({"name": name, "description": fn.get("description", ""), "parameters": params})
    names = [fn["name"] for fn in functions]
    if len(set(names)) != len(names):
        raise APIError(400, "function names must be unique", "tools")
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan(functions, [], "none", False)
    if choice in ("auto", "required"):
        return ToolPlan(functions, functions, choice, parallel is not False)
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if named is None:
        raise APIError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                            '{"name": ...}}', "tool_choice")
    if named not in names:
        raise APIError(400, f"tool_choice names {named!r}, which is not among the tools", "tool_choice")
    return ToolPlan(functions, [functions[names.index(named)]], "required", False)


def finish_reason(called: bool, reason: Optional[str]) -> Optional[str]:
    """OpenAI's finish_reason for a reply: "tool_calls" when it ended on its own after calls, else the engine's
    (a reply cut by max_tokens keeps "length")."""
    return "tool_calls" if called and reason == "stop" else reason


def parse_calls(text: str) -> Optional[list[dict]]:
    """The reply's complete calls in OpenAI's shape, or None if it is plain text. (A reply that max_tokens cut
    inside a further call keeps the calls before it; its finish_reason says "length".)"""
    body = text.strip()
    if not body.startswith(OPEN.strip()):
        return None
    blocks = BLOCK.findall(body)
    if not blocks:
        return None
    calls = []
    for block in blocks:
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return None
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"],
                                   "arguments": json.dumps(call["arguments"], ensure_ascii=False)}})
    return calls


def called_tools(text: str) -> Optional[list[str]]:
    """The functions a finished reply calls (None for plain text): the engine's pause hook, which keeps the
    conversation's KV while the tools run (kestrel/engine/pauses.py)."""
    calls = parse_calls(text)
    return [c["function"]["name"] for c in calls] if calls else None


def history(messages: list, plan: Optional[ToolPlan], template_renders_tools: bool) -> list[dict]:
    """The request's messages as the chat template takes them: an assistant's tool_calls rendered as the model
    writes them, tool results as `tool` messages, and (without template support) the tools in the system message."""
    out = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        content = m.text()
        if m.tool_calls:
            calls = SEPARATOR.join(call_text(c.function.name, c.function.arguments) for c in m.tool_calls)
            content = content + calls if content else calls
        out.append({"role": role, "content": content})
    if plan is not None and not template_renders_tools:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + plan.tools_prompt()}
        else:
            out.insert(0, {"role": "system", "content": plan.tools_prompt()})
    return out


class ToolStream:
    """One streamed choice under a ToolPlan: text deltas pass through once the reply is known not to open a
    call; a call is sent as OpenAI's tool_calls deltas once its block is complete."""

    def __init__(self):
        self.text, self.kind, self.sent, self.calls = "", None, 0, 0

    def feed(self, piece: str, finished: bool) -> list[dict]:
        """The deltas to send for this piece of the reply."""
        self.text += piece
        if self.kind is None:
            head = self.text.lstrip()
            if head.startswith(OPEN.strip()):
                self.kind = "calls"
            elif OPEN.strip().startswith(head) and not finished:
                return []  # could still become a call
            else:
                self.kind = "text"
        if self.kind == "text":
            delta, self.sent = self.text[self.sent:], len(self.text)
            return [{"content": delta}] if delta else []
        out = []
        for block in BLOCK.findall(self.text)[self.calls:]:
            call = parse_calls(OPEN + block + CLOSE)
            if call is None:
                continue
            fn = call[0]["function"]
            out.append({"tool_calls": [{"index": self.calls, "id": call[0]["id"], "type": "function",
                                        "function": {"name": fn["name"], "arguments": fn["arguments"]}}]})
            self.calls += 1
        return out
