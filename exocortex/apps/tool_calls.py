"""Function calling in the server: a client's `tools`, `tool_choice` and `role: "tool"` messages, as in OpenAI's API.

The model writes every call the same way (<tool_call>\\n{"name", "arguments"}\\n</tool_call>, infer/tools.py).
What happens next depends on whose tool it names:
  - one of the client's `tools`: the engine does not run it; the reply ends after the model's calls with
    finish_reason "tool_calls" and `message.tool_calls` (streamed as OpenAI's `tool_calls` deltas). The client
    runs it and sends the result back as a `role: "tool"` message; the model reads it inside the same assistant
    turn (the chat format's <tool_response>) and goes on.
  - a built-in (calculator, python, lookup): the engine runs it as it always did, unless the request says
    `"builtin_tools": false` (an exocortex field) or the client defines a tool of the same name (the client's
    wins). An unknown name gets "error: unknown tool ..." as the tool's output, which the model reads.
`tool_choice` is honoured by masking tokens (exocortex/infer/constrain.py): "none" bans <tool_call> (so no
call at all, built-ins included), "required" and a named function make the reply a call to the client's tools
(grammar-constrained, so it parses and names a given tool), "auto" leaves the choice to the model.

Only the client's tools are offered in the system turn (tokenizer.render_tools_block): the built-ins are the
model's trained habits and take no room in a short context.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from exocortex.apps.guard import APIError
from exocortex.infer.constrain import (BannedTokens, Constraint, ConstraintError, ConstraintUnavailable,
                                       tool_call_constraint)
from exocortex.infer.engine import client_call
from exocortex.infer.tools import ToolSpecError, check_tool_specs
from exocortex.tokenizer import CALL_START



def _bad(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ----------------------------------------------------------------------------- the request's tools

@dataclass
class ToolPlan:
    """What a request asks of function calling, checked. `specs` are the client's tools as given (rendered into
    the system turn as they came, as any runtime's chat template renders them); `choice` is "none", "auto",
    "required" or a tool's name."""
    specs: list[dict] = field(default_factory=list)
    choice: str = "auto"
    parallel: bool = True
    builtin: bool = True
    own: dict | None = None  # the server's tools for this request beside the engine's (memory bound to its user)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(spec["function"]["name"] for spec in self.specs)

    @property
    def engine_tools(self) -> dict | None:
        """The tools the engine runs for this request: none, or (None) all of its own. A client's tool of a
        built-in's name needs nothing here: the engine hands every call to a client's name back unrun."""
        if not self.builtin:
            return {}
        return self.own  # None: the engine's own

    def constraint(self, tok) -> "Constraint | None":
        """The token mask tool_choice asks for. Compiles a grammar for required/named (can take a while: run it
        off the event loop)."""
        if self.choice == "auto":
            return None
        if self.choice == "none":
            return BannedTokens(tok, [tok.special[CALL_START]], "tool_choice none")  # no grammar needed
        name = None if self.choice == "required" else self.choice
        try:
            return tool_call_constraint(tok, self.specs, name, parallel=self.parallel)
        except ConstraintUnavailable as e:
            raise _bad(f"tool_choice {self.choice!r} is honoured by constrained decoding: {e}", "tool_choice",
                       "unsupported_value") from None
        except ConstraintError as e:  # a parameters schema the grammar compiler refuses
            raise _bad(f"cannot constrain the reply to a call of the tools: {e}.", "tools") from None


def plan(tools: Any, tool_choice: Any, parallel_tool_calls: bool | None, builtin_tools: bool | None,
         legacy: dict[str, Any]) -> ToolPlan:
    """The request's function-calling fields -> a ToolPlan; anything this server would not honour is a 400."""
    for old, new in (("functions", "tools"), ("function_call", "tool_choice")):
        if legacy.get(old) is not None:
            raise _bad(f"'{old}' is deprecated and not supported; use '{new}'.", old, "unsupported_parameter")
    specs = check_tools(tools)
    names = [s["function"]["name"] for s in specs]
    if tool_choice is None or tool_choice in ("auto", "none"):
        choice = tool_choice or "auto"
    elif tool_choice == "required" or isinstance(tool_choice, dict):
        if not specs:
            raise _bad("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                       "tool_choice")
        choice = tool_choice if tool_choice == "required" else _named(tool_choice, names)
    else:
        raise _bad("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                   "{\"name\": ...}}.", "tool_choice")
    # a named function is one call (OpenAI's behaviour); else the model may write several unless told not to
    parallel = choice in ("auto", "none", "required") and parallel_tool_calls is not False
    return ToolPlan(specs, choice, parallel, True if builtin_tools is None else builtin_tools)


def _named(choice: dict, names: list[str]) -> str:
    fn = choice.get("function")
    if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _bad("A named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}.", "tool_choice")
    if fn["name"] not in names:
        raise _bad(f"tool_choice names function {fn['name']!r}, which is not among the tools "
                   f"({', '.join(names)}).", "tool_choice")
    return fn["name"]


def check_tools(tools: Any) -> list[dict]:
    """OpenAI function specs, each checked the way OpenAI checks them (infer/tools.check_tool_specs); the list
    as given."""
    try:
        return check_tool_specs(tools)
    except ToolSpecError as e:
        raise _bad(str(e), e.param) from None


# ----------------------------------------------------------------------------- history

def assistant_calls(i: int, calls: list) -> list[dict]:
    """An assistant message's tool_calls (pydantic-checked shape) as the tokenizer reads them; arguments must be
    a JSON object (the model wrote one)."""
    out = []
    for j, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        try:
            args = json.loads(call.function.arguments) if call.function.arguments.strip() else {}
        except ValueError:
            args = None
        if not isinstance(args, dict):
            raise _bad(f"{where}.function.arguments must be a JSON object in a string.", f"{where}.function.arguments")
        out.append({"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": args}})
    return out


def order_tool_messages(msgs: list[dict]) -> list[dict]:
    """Checks that every call of an assistant message is answered by one `role: "tool"` message (its
    tool_call_id) before the conversation goes on, as OpenAI checks; puts the answers in the calls' order (the
    model reads them by position: ids are not part of the chat format)."""
    out: list[dict] = []
    pending: list[str] = []  # ids of the last assistant message's calls still unanswered
    answers: dict[str, dict] = {}
    for i, m in enumerate(msgs):
        if m["role"] == "tool":
            cid = m.get("tool_call_id")
            if not pending:
                raise _bad(f"messages[{i}]: a tool message must answer a tool call of the assistant message "
                           "before it.", f"messages[{i}].role")
            if cid not in pending or cid in answers:
                raise _bad(f"messages[{i}].tool_call_id {cid!r} answers no open tool call (open: "
                           f"{', '.join(c for c in pending if c not in answers)}).", f"messages[{i}].tool_call_id")
            answers[cid] = m
            if len(answers) == len(pending):
                out += [answers[c] for c in pending]
                pending, answers = [], {}
            continue
        if pending:
            missing = [c for c in pending if c not in answers]
            raise _bad(f"messages[{i}]: an assistant message with tool_calls must be followed by tool messages "
                       f"answering each call; {', '.join(missing)} has none.", f"messages[{i}]")
        out.append(m)
        if m["role"] == "assistant" and m.get("tool_calls"):
            pending = [c["id"] for c in m["tool_calls"]]
            if len(set(pending)) != len(pending):
                raise _bad(f"messages[{i}].tool_calls: two calls have the same id.", f"messages[{i}].tool_calls")
    if pending:
        missing = [c for c in pending if c not in answers]
        raise _bad(f"tool call {', '.join(missing)} has no tool message answering it.", "messages")
    return out


# ----------------------------------------------------------------------------- generation

def with_format(tok, format_constraint, tools: ToolPlan):
    """The reply's constraint given response_format's (compiled) and tool_choice: both at once is a 400 unless
    tool_choice says nothing. A JSON reply cannot hold a call (special tokens are never JSON), so with "none" or
    "auto" the format's constraint is the whole answer."""
    if format_constraint is None:
        return tools.constraint(tok)
    if tools.choice not in ("auto", "none"):
        raise _bad(f"tool_choice {tools.choice!r} asks for a tool call and response_format for JSON; a reply "
                   "cannot be both.", "tool_choice")
    return format_constraint


class ClientCalls:
    """Wraps the serve renderer (tokens -> deltas): a call to one of the client's tools comes out as one delta
    {"content": "", "part": None, "tool_call": {"index", "id", "type", "function": {"name", "arguments"}}}
    when it closes, instead of its "[tool call: ...]" text and part. The call's deltas are held from its opening
    marker (its text is held till the end by the renderer anyway) until its name is known. Calls the engine
    runs are released as they were; one after a client's call is dropped (the engine ends the reply there).
    Parts after a removed one are renumbered, so `parts` stays a dense list."""

    def __init__(self, renderer, engine, names: frozenset[str]):
        self.renderer, self.names = renderer, names
        self.call_start, self.call_end = engine.call_start, engine.call_end
        self.held: list[dict] | None = None
        self.calls = 0  # client calls so far: their index in tool_calls
        self.removed = 0  # parts taken out so far

    def _renumber(self, deltas: list[dict]) -> list[dict]:
        if not self.removed:
            return deltas
        return [{**d, "part": {**d["part"], "index": d["part"]["index"] - self.removed}} if d.get("part") else d
                for d in deltas]

    def push(self, token: int) -> list[dict]:
        out = self.renderer.push(token)
        if token == self.call_start:
            # the opening marker is held; what came before it goes out: the end of a text part, or a call left
            # unfinished (the engine starts over at a second <tool_call>), shown as the renderer shows it
            before, self.held = (self.held or []) + out[:-1], out[-1:]
            return self._renumber(before)
        if self.held is None:
            return self._renumber(out)
        self.held += out
        if token != self.call_end:
            return []
        held, self.held = self.held, None
        text = "".join(d["part"]["text"] for d in held if d.get("part"))
        call = client_call(text, self.names)
        if call is None and not self.calls:
            return self._renumber(held)  # the engine runs it: shown as always
        self.removed += 1
        if call is None:
            return []
        name, arguments = call
        self.calls += 1
        return [{"content": "", "part": None, "tool_call": {
            "index": self.calls - 1, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}}]

    def finish(self) -> list[dict]:
        held, self.held = self.held or [], None  # an unfinished call (cut by max_tokens) is shown as it got
        return self._renumber(held + self.renderer.finish())


def tool_calls_of(deltas: list[dict]) -> list[dict]:
    """A reply's client calls, as message.tool_calls lists them (no index)."""
    return [{k: v for k, v in d["tool_call"].items() if k != "index"} for d in deltas if "tool_call" in d]

