"""Calling the functions a client offers (OpenAI `tools`): the system turn's tools block lists one or two function
specs (exocortex/tokenizer.py: render_tools_block), the user asks for something, and the assistant calls the
function that fits, copying the request's values into the arguments; the client's response comes back inside
the same turn and the assistant answers with it. Kinds of example:

- one: one function is offered and fits;
- choose: two are offered, only one fits (the model has to read the names, not just call whatever is there);
- calculator: a calculator offered as the client's spec for an arithmetic question, so an exported model given
  `tools=[calculator]` calls it (an arithmetic question otherwise calls our built-in calculator unasked);
- none: nothing offered fits (a greeting, "which tools do you have?", "repeat after me"): answer, call nothing.

Each function comes in a few signatures (get_weather(city), weather(location), ...), so the model reads the spec
instead of memorising one. A response is a deterministic function of the call (`respond`), and evaluation and RL
run those same functions as the client would (Functions.client_tools): a right call gets the response the
reference answer used, a wrong one another response or an error. Graded on the whole reply (grade_reply):
exactly one call, its name and JSON-parsed arguments exactly right, and the final words carrying the response's
value; where nothing fits, no call at all.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Callable

from exocortex.infer.tools import ToolError, calculator, parse_tool_call
from exocortex.tasks.arithmetic import CALCULATOR_SPEC, random_expression
from exocortex.tasks.base import Task, own_words, split_of
from exocortex.tasks.chat import GREETING_REPLIES, GREETINGS, SYSTEM_PROMPTS, THANKS, THANKS_REPLIES
from exocortex.tokenizer import tool_call_json

# ----------------------------------------------------------------------------- values a request carries

SYLLABLES = ["ta", "ver", "mo", "ly", "ka", "ren", "sol", "bri", "an", "dor", "el", "fi", "gar", "hul", "is", "jor",
             "ke", "lan", "mi", "nor", "os", "pel", "ri", "sten", "tor", "ul", "vim", "wen", "yar", "zel"]
PEOPLE = ["Mia", "Tom", "Ada", "Leo", "Ivy", "Sam", "Noor", "Ben", "Lena", "Omar", "Kai", "Rosa", "Finn", "Zoe",
          "Ravi", "Elif", "Jonas", "Aiko", "Marta", "Yusuf", "Grace", "Pedro", "Hana", "Ilya"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "INR", "AUD", "SEK", "BRL"]
PHRASES = ["see you at {h}", "running {n} minutes late", "call me back", "dinner is ready", "the keys are on the table",
           "meeting moved to {h}", "happy birthday", "bring an umbrella", "I landed", "back in {n} minutes",
           "the train is late", "lunch at {h}?"]
WEATHER = ["sunny", "cloudy", "light rain", "snow", "windy", "fog", "clear skies", "showers"]


def place(rng: random.Random) -> str:
    """A made-up town: an unbounded supply of names, so held-out requests carry names never trained on."""
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.choice([2, 2, 3]))).capitalize()


def phrase(rng: random.Random) -> str:
    return rng.choice(PHRASES).format(h=f"{rng.randint(1, 12)}", n=rng.randint(2, 40))


def amount(rng: random.Random) -> int | float:
    return rng.randint(1, 2000) if rng.random() < 0.8 else rng.randint(1, 500) + 0.5


def clock(rng: random.Random) -> str:
    return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"


def price(rng: random.Random, low: float, high: float) -> str:
    return f"{rng.uniform(low, high):.2f}"


def _ticker(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPRSTUVWXZ") for _ in range(3))


def _two_currencies(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(CURRENCIES, 2)
    return a, b


# ----------------------------------------------------------------------------- the functions

@dataclass(frozen=True)
class Function:
    """A kind of function a client offers, in a few signatures.

    `params` maps each role (what a value means) to its JSON type; a signature names the function and each
    role's parameter. `draw` makes a request's values (role -> value), `asks` and `answers` are templates over
    the roles (answers also over the response's fields), `respond(rng, values)` is the client: its fields,
    with "text" what the function returns and "value" what the answer must carry."""
    family: str
    signatures: tuple[tuple[str, dict[str, str]], ...]
    descriptions: tuple[str, ...]
    params: dict[str, str]
    draw: Callable[[random.Random], dict]
    asks: tuple[str, ...]
    respond: Callable[[random.Random, dict], dict]
    answers: tuple[str, ...]
    towns: tuple[str, ...] = ()  # roles whose values are towns: held out town by town (split_keys)


def _weather(rng: random.Random, v: dict) -> dict:
    t, sky = rng.randint(-12, 36), rng.choice(WEATHER)
    return {"text": f"{t} C, {sky}", "value": str(t), "t": t, "sky": sky}


def _convert(rng: random.Random, v: dict) -> dict:
    result = f"{v['amount'] * rng.uniform(0.05, 20):.2f}"
    return {"text": f"{result} {v['to']}", "value": result, "result": result}


def _sent(rng: random.Random, v: dict) -> dict:
    n = rng.randint(100, 9999)
    return {"text": f"sent, id {n}", "value": str(n), "id": n}


def _quote(rng: random.Random, v: dict) -> dict:
    p = price(rng, 1, 900)
    return {"text": f"{p} USD", "value": p, "price": p}


def _timer(rng: random.Random, v: dict) -> dict:
    end = clock(rng)
    return {"text": f"set, rings at {end}", "value": end, "end": end}


def _time(rng: random.Random, v: dict) -> dict:
    t = clock(rng)
    return {"text": t, "value": t, "time": t}


def _distance(rng: random.Random, v: dict) -> dict:
    d = rng.randint(3, 4000)
    return {"text": f"{d} km", "value": str(d), "d": d}


def _calculate(rng: random.Random, v: dict) -> dict:
    r = calculator(v["expression"])  # the client's calculator is a calculator: the true result
    return {"text": r, "value": r, "result": r}


FUNCTIONS = [
    Function("weather", (("get_weather", {"city": "city"}), ("weather", {"city": "location"}),
                         ("current_weather", {"city": "city"})),
             ("Current weather.", "Weather in a city."), {"city": "string"},
             lambda rng: {"city": place(rng)},
             ("What's the weather in {city}?", "How is the weather in {city} today?", "Is it warm in {city} now?",
              "weather in {city}?", "Tell me the weather for {city}."),
             _weather,
             ("It's {t} C, {sky}.", "{sky}, {t} C.", "{city}: {t} C and {sky}."), ("city",)),
    Function("time", (("get_time", {"city": "city"}), ("local_time", {"city": "place"})),
             ("Local time in a city.", "Current time."), {"city": "string"},
             lambda rng: {"city": place(rng)},
             ("What time is it in {city}?", "What's the local time in {city}?", "time in {city} now?"),
             _time,
             ("It is {time} in {city}.", "It's {time} there.", "{time}."), ("city",)),
    Function("convert", (("convert", {"amount": "amount", "from": "from", "to": "to"}),
                         ("exchange", {"amount": "amount", "from": "from", "to": "to"})),
             ("Convert money.", "Currency exchange."),
             {"amount": "number", "from": "string", "to": "string"},
             lambda rng: dict(zip(("amount", "from", "to"), (amount(rng), *_two_currencies(rng)))),
             ("How much is {amount} {from} in {to}?", "Convert {amount} {from} to {to}.",
              "What are {amount} {from} worth in {to}?", "{amount} {from} to {to}, please."),
             _convert,
             ("{amount} {from} is {result} {to}.", "That's {result} {to}.", "{result} {to}.")),
    Function("message", (("send_message", {"to": "to", "text": "text"}),
                         ("send_text", {"to": "to", "text": "message"})),
             ("Send a text.", "Message someone."), {"to": "string", "text": "string"},
             lambda rng: {"to": rng.choice(PEOPLE), "text": phrase(rng)},
             ('Send {to} a message: "{text}"', 'Text {to}: "{text}"', 'Tell {to} "{text}".',
              'Message {to} saying "{text}".'),
             _sent,
             ("Sent to {to} (id {id}).", "Done, message id {id}.", "Sent, id {id}.")),
    Function("stock", (("stock_price", {"symbol": "symbol"}), ("get_quote", {"symbol": "ticker"})),
             ("Stock price.", "Share price."), {"symbol": "string"},
             lambda rng: {"symbol": _ticker(rng)},
             ("What is {symbol} trading at?", "Price of {symbol} stock?", "How much is one {symbol} share?",
              "Get me a quote for {symbol}."),
             _quote,
             ("{symbol} is at {price} USD.", "It costs {price} USD.", "{price} USD a share.")),
    Function("timer", (("set_timer", {"minutes": "minutes"}), ("start_timer", {"minutes": "minutes"})),
             ("Start a timer.", "Countdown timer."), {"minutes": "integer"},
             lambda rng: {"minutes": rng.randint(1, 120)},
             ("Set a timer for {minutes} minutes.", "Start a {minutes} minute timer.", "Remind me in {minutes} minutes.",
              "timer {minutes} min please"),
             _timer,
             ("Timer set, it rings at {end}.", "Done, it ends at {end}.", "OK, until {end}.")),
    Function("distance", (("get_distance", {"from": "start", "to": "end"}),
                          ("distance", {"from": "from", "to": "to"})),
             ("Road distance in km.", "Distance by road."), {"from": "string", "to": "string"},
             lambda rng: {"from": place(rng), "to": place(rng)},
             ("How far is it from {from} to {to}?", "Distance from {from} to {to}?", "How many km from {from} to {to}?"),
             _distance,
             ("It is {d} km.", "{from} to {to}: {d} km.", "The distance is {d} km."), ("from", "to")),
]
# a calculator as clients write it; "calculator"(expression) most often, as our built-in spec (BUILTIN_TOOLS) says
CALCULATOR = Function(
    "calculator", (("calculator", {"expression": "expression"}),) * 3 + (
        ("calculate", {"expression": "expression"}), ("calc", {"expression": "expr"})),
    ("Exact arithmetic.", "Evaluate math.", "A calculator."), {"expression": "string"},
    lambda rng: {"expression": random_expression(rng)},
    ("What is {expression}?", "Compute {expression}.", "{expression} = ?", "Calculate {expression}, please."),
    _calculate,
    ("{expression} = {result}.", "The answer is {result}.", "That's {result}."))

# requests no function fits: (kind, asks, answers); "{names}" is the offered functions, "{phrase}" a phrase
NO_CALL = [
    ("greet", GREETINGS, GREETING_REPLIES),
    ("thanks", THANKS, THANKS_REPLIES),
    ("tools", ["Which tools do you have?", "What functions can you call?", "What tools can you use here?"],
     ["I can call {names}.", "I have {names}: tell me what you need.", "These: {names}."]),
    ("repeat", ["Repeat after me: {phrase}", 'Say "{phrase}".', "Please write: {phrase}"], ["{phrase}"]),
]
KINDS = {"one": 0.35, "choose": 0.3, "calculator": 0.15, "none": 0.2}
# Two specs only when together they are this short: a spec is ~55-85 tokens of the tiny model's 256 (BPE at 4096
# tokens: ~3.2 characters a token), the tools block's own text ~35, and the request, call, response and answer
# need ~80 more (tests/test_functions.py measures the longest conversation). Counted in characters, so that the
# examples do not depend on a tokenizer.
MAX_SPEC_CHARS = 400
SYSTEM_RATE = 0.2  # a client's system prompt beside its tools (the task mixture gives other tasks 15%)
JSON_TYPES = {"string": str, "number": (int, float), "integer": int}


def spec(name: str, description: str, params: dict[str, str]) -> dict:
    """An OpenAI function spec, short: no per-parameter descriptions (the tiny model's context is 256 tokens)."""
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {p: {"type": t} for p, t in params.items()},
                       "required": list(params)}}}


def _chars(specs: list[dict]) -> int:
    return sum(len(json.dumps(s, ensure_ascii=False)) for s in specs)


def _system(rng: random.Random, tools: list[dict]) -> dict:
    """The system message: a client's own prompt at SYSTEM_RATE where one spec leaves room for it, else empty
    (the tools block alone: the same tokens as no system message). Always present, so the task mixture does
    not add a prompt of its own to a conversation that has no room for it."""
    prompt = rng.choice(SYSTEM_PROMPTS) if len(tools) == 1 and rng.random() < SYSTEM_RATE else ""
    return {"role": "system", "content": prompt}


def split_keys(fn: Function, values: dict) -> list[str]:
    """What decides a request's split (all of them must be in it): a town is held out wherever it appears
    (weather, time, distance), so a test question never asks about a town trained on; an expression as the
    arithmetic task splits it, so its held-out questions stay held out here too; else the request's values."""
    if fn.towns:
        return ["town|" + values[r] for r in fn.towns]
    if fn is CALCULATOR:
        return [values["expression"]]
    return [f"{fn.family}|{json.dumps(values, sort_keys=True)}"]


def _call_rng(name: str, arguments: dict) -> random.Random:
    """The client's randomness is the call itself: the same call always gets the same response."""
    return random.Random(json.dumps({"name": name, "arguments": arguments}, sort_keys=True))


def _respond(fn: Function, name: str, names: dict[str, str], values: dict) -> dict:
    return fn.respond(_call_rng(name, {names[r]: values[r] for r in names}), values)


def _is_type(value, json_type: str) -> bool:
    """JSON Schema's types: an integer is any number without a fraction (20.0 too); a boolean is no number."""
    if isinstance(value, bool):
        return False
    if json_type == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, JSON_TYPES[json_type])


def client_tool(fn: Function, name: str, names: dict[str, str]) -> Callable[[dict], str]:
    """The function as a client runs it: checks the arguments against its spec, then responds."""
    def run(arguments: dict) -> str:
        unknown = sorted(set(arguments) - set(names.values()))
        if unknown:
            raise ToolError(f"{name} has no parameter {unknown[0]!r}")
        values = {}
        for role, p in names.items():
            if p not in arguments:
                raise ToolError(f"{name} needs {p!r}")
            if not _is_type(arguments[p], fn.params[role]):
                raise ToolError(f"{name}'s {p!r} must be a {fn.params[role]}")
            values[role] = arguments[p]
        return _respond(fn, name, names, values)["text"]  # the calculator's complaints are ToolErrors too
    return run


def same_json(a, b) -> bool:
    """Equal as JSON values: 25 and 25.0 are the same number, but true is not 1 and "25" is not 25."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def carries(text: str, value: str) -> bool:
    """`value` stands in `text` on its own: 27.35 is not in 127.35 or 27.356, 5 is not in -5."""
    return re.search(r"(?<![\w.\-])" + re.escape(value) + r"(?![\w]|\.\d)", text) is not None


class Functions(Task):
    name = "functions"
    uses_tools = True

    def __init__(self):
        self.client_tools = {name: client_tool(fn, name, names)
                             for fn in FUNCTIONS + [CALCULATOR] for name, names in fn.signatures}

    def example(self, rng: random.Random, split: str) -> dict:
        kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
        while True:
            ex, keys = self._none(rng) if kind == "none" else self._call(rng, kind)
            if all(split_of(k) == split for k in keys):
                return ex

    def _offer(self, rng: random.Random, fn: Function) -> tuple[dict, str, dict[str, str]]:
        """One signature of `fn` as a spec, with its name and parameter names."""
        name, names = rng.choice(fn.signatures)
        if fn is CALCULATOR and name == "calculator" and rng.random() < 0.5:
            return CALCULATOR_SPEC, name, names  # the built-in's own spec, as the arithmetic tasks offer it
        return spec(name, rng.choice(fn.descriptions), {names[r]: t for r, t in fn.params.items()}), name, names

    def _call(self, rng: random.Random, kind: str) -> tuple[dict, list[str]]:
        fn = CALCULATOR if kind == "calculator" else rng.choice(FUNCTIONS)
        offered, name, names = self._offer(rng, fn)
        tools = [offered]
        if kind == "choose" or (kind == "calculator" and rng.random() < 0.4):
            others = [self._offer(rng, f)[0] for f in rng.sample(FUNCTIONS + [CALCULATOR], len(FUNCTIONS) + 1)
                      if f is not fn]
            fits = [o for o in others if _chars([offered, o]) <= MAX_SPEC_CHARS]
            if fits:  # else the long spec alone (convert: three parameters)
                tools.insert(rng.randrange(2), fits[0])
        values = fn.draw(rng)
        arguments = {names[r]: values[r] for r in fn.params}
        got = _respond(fn, name, names, values)
        shown = {r: str(v) for r, v in values.items()}
        ask = rng.choice(fn.asks).format(**shown)
        fields = {k: str(v) for k, v in got.items() if k not in ("text", "value")}  # "text" may be a role too
        answer = rng.choice(fn.answers).format(**shown, **fields)
        parts = [{"type": "tool_call", "text": tool_call_json(name, arguments)},
                 {"type": "tool_output", "text": got["text"]}, {"type": "text", "text": answer}]
        ex = {"task": self.name, "kind": kind, "tools": tools, "answer": got["value"], "must": [got["value"]],
              "call": {"name": name, "arguments": arguments},
              "messages": [_system(rng, tools), {"role": "user", "content": ask},
                           {"role": "assistant", "content": parts}]}
        # an expression is split as the arithmetic task splits it: its held-out questions stay held out here too
        return ex, split_keys(fn, values)

    def _none(self, rng: random.Random) -> tuple[dict, list[str]]:
        while True:
            offered = [self._offer(rng, f) for f in rng.sample(FUNCTIONS + [CALCULATOR], rng.choice([1, 2]))]
            if _chars([s for s, _, _ in offered]) <= MAX_SPEC_CHARS:
                break
        tools, names = [s for s, _, _ in offered], [name for _, name, _ in offered]
        said = " and ".join(names)
        kind, asks, answers = rng.choice(NO_CALL)
        p = phrase(rng)
        ask = rng.choice(asks).format(phrase=p)
        answer = rng.choice(answers).format(names=said, phrase=p)
        must = names if kind == "tools" else [p] if kind == "repeat" else []
        ex = {"task": self.name, "kind": "none", "tools": tools, "answer": answer, "must": must, "call": None,
              "messages": [_system(rng, tools), {"role": "user", "content": ask},
                           {"role": "assistant", "content": answer}]}
        return ex, [f"none|{kind}|{ask}|{said}"]

    def grade(self, answer_text: str, example: dict) -> bool:
        """The assistant's own words: they carry the response's value (or, with no call, what was asked for)."""
        return bool(answer_text.strip()) and all(carries(answer_text, v) for v in example["must"])

    def grade_reply(self, parts: list[dict], example: dict) -> bool:
        """The whole reply: one call, its name and arguments exactly the reference's, and the answer after it;
        with nothing to call, no call."""
        try:
            calls = [p["text"] for p in parts if p["type"] == "tool_call"]
            want = example["call"]
            if want is None:
                return not calls and self.grade(own_words(parts), example)
            if len(calls) != 1:
                return False
            name, arguments = parse_tool_call(calls[0])
            return (name == want["name"] and same_json(arguments, want["arguments"])
                    and self.grade(own_words(parts), example))
        except Exception:  # noqa: BLE001 (a grader bug is a wrong answer, never a crash)
            return False

    def reward_reply(self, parts: list[dict], example: dict) -> float:
        return float(self.grade_reply(parts, example))
