"""Source `teacher`: a bigger model behind any OpenAI-compatible endpoint (a larger exocortex run's `exocortex
serve`, Ollama, vLLM, llama-server, a provider), asked through the `openai` client.

Two modes:
  answer  the teacher answers questions drawn from our generators, whose answers are known: a reply is kept only
          when the task's grader passes it (verification "grader"). What the teacher is told about the answer
          format (e.g. GSM8K's `#### N` line) is not written to the row: the student learns from the question alone.
  write   the teacher writes a new question for a seeded (persona, topic, style, kind), then answers it in a fresh
          conversation. Kinds and how each answer is checked:
            math   the teacher also gives the arithmetic expression; our calculator evaluates it and the reply's
                   final number must match (verification "calculator");
            code   the teacher also gives assert lines; the reply's code must pass them in our python sandbox
                   ("python");
            short  a short factual answer, asked twice at the sampling temperature: the two must agree
                   ("agreement");
            open   nothing checkable: kept with {"method": "none", "passed": null}, or dropped (--drop-unverified).

Several requests are in flight at once (threads; the client is thread-safe); transient failures (connection,
timeout, 429, 5xx) are retried with exponential backoff and jitter; a bad URL, a refused key or an unknown model
stops the job with one line, after a first request that checks them. Rows are written as they come.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

from exocortex.errors import ExocortexError
from exocortex.infer.tools import ToolError, calculator
from exocortex.synth import Dataset, Progress, item_rng, pick_task, provenance, row
from exocortex.tasks.base import grade_final_number, numbers_in, own_words

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
MODES = ("answer", "write")

# what mode `write` draws from, one of each per item (seeded): recorded in the row's provenance
PERSONAS = ["a nurse on a night shift", "a retired carpenter", "a first-year physics student", "a shop owner",
            "a ten-year-old", "a farmer planning the season", "a software engineer", "a tired parent",
            "a cyclist training for a race", "a baker scaling a recipe", "a travel agent", "a chess coach",
            "a museum guide", "a bus driver", "a beekeeper", "a high-school teacher"]
TOPICS = ["money and prices", "cooking", "time and schedules", "distances and travel", "gardening", "sports",
          "shopping", "building and repairs", "animals", "weather", "music", "history", "space", "health",
          "games and puzzles", "saving and budgeting", "geography", "words and spelling"]
STYLES = ["in one short casual sentence", "politely, with a little context first", "tersely, like a search query",
          "with a small typo", "in the second person", "as a question from a worried beginner",
          "with the numbers written as words", "in a formal tone", "with an irrelevant detail added",
          "as two sentences"]
KINDS = {
    "math": ('a question whose answer is one number obtained by arithmetic',
             '{"question": "...", "expression": "the arithmetic (numbers, + - * / and parentheses only) whose value '
             'answers the question"}'),
    "code": ('a request for one small Python function',
             '{"question": "... (name the function)", "function": "its name", "tests": "three assert lines a '
             'correct function passes"}'),
    "short": ('a factual question answered in a word, a name or a number', '{"question": "..."}'),
    "open": ('an open question (advice, explanation or writing) with no single right answer', '{"question": "..."}'),
}
ANSWER_HINTS = {"math": "Finish with the final number on its own.", "short": "Answer in a few words only.",
                "code": "Give the function in one ```python block.", "open": "Answer helpfully and briefly."}


@dataclass
class TeacherConfig:
    url: str
    model: str
    key_env: str = DEFAULT_KEY_ENV
    temperature: float = 0.7
    max_tokens: int = 512
    concurrency: int = 4
    retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 120.0


class TeacherRefused(Exception):
    """The teacher answered one request with an error that retrying will not fix (e.g. 400: the prompt is too
    long for it), or with a reply cut at max_tokens: that item is rejected with the reason, the job goes on."""


class Teacher:
    """Chat completions from the endpoint, with retries; fatal errors are one-line ExocortexErrors."""

    def __init__(self, tc: TeacherConfig):
        try:
            import openai
        except ImportError:
            raise ExocortexError("the teacher source needs the openai package: pip install 'exocortex[synth]'") from None

        self.tc, self.openai = tc, openai
        self.client = openai.OpenAI(base_url=tc.url, api_key=os.environ.get(tc.key_env) or "none",
                                    max_retries=0, timeout=tc.timeout_s)
        self.info = {"url": tc.url, "model": tc.model}

    def chat(self, messages: list[dict], temperature: float | None = None, max_tokens: int | None = None,
             rng: random.Random | None = None, cut_ok: bool = False) -> list[dict]:
        """The reply as parts (see _parts); a reply cut at max_tokens is refused unless `cut_ok`."""
        o, rng = self.openai, rng or random.Random()
        for attempt in range(self.tc.retries + 1):
            try:
                r = self.client.chat.completions.create(
                    model=self.tc.model, messages=messages, max_tokens=max_tokens or self.tc.max_tokens,
                    temperature=self.tc.temperature if temperature is None else temperature)
                if r.choices[0].finish_reason == "length" and not cut_ok:  # a cut reply may end on a right-looking number
                    raise TeacherRefused(f"reply cut at {max_tokens or self.tc.max_tokens} tokens (--teacher-max-tokens)")
                return _parts(r.choices[0].message)
            except (o.AuthenticationError, o.PermissionDeniedError):
                raise ExocortexError(f"the teacher at {self.tc.url} refused the API key (set ${self.tc.key_env}, "
                                     f"or name another variable with --api-key-env)") from None
            except o.NotFoundError:
                raise ExocortexError(f"the teacher at {self.tc.url} has no model '{self.tc.model}' (or the URL is not "
                                     f"an OpenAI-compatible base URL, usually ending in /v1)") from None
            except (o.APIConnectionError, o.RateLimitError, o.InternalServerError) as e:  # includes timeouts
                if attempt == self.tc.retries:
                    tries = f"{attempt + 1} attempt" + ("s" if attempt else "")
                    raise ExocortexError(f"the teacher at {self.tc.url} failed after {tries}: "
                                         f"{_why(e)}; is it running, and is that its /v1 base URL?") from None
                time.sleep(min(60.0, self.tc.backoff_s * 2 ** attempt) * (0.5 + rng.random() / 2))
            except o.APIStatusError as e:
                raise TeacherRefused(_why(e)) from None
        raise AssertionError("unreachable")

    def check(self) -> None:
        """One short request before the job: a bad URL, key or model fails here, in one line."""
        try:
            self.chat([{"role": "user", "content": "Say OK."}], temperature=0.0, max_tokens=4, cut_ok=True)
        except TeacherRefused as e:
            raise ExocortexError(f"the teacher at {self.tc.url} answered a test request with an error: {e}") from None


def _parts(message) -> list[dict]:
    """A reply as assistant parts: an exocortex server sends its own (`parts`: the tool calls it made and their
    outputs, which the row keeps as real calls, not as text); any other server's text is one text part."""
    extra = getattr(message, "model_extra", None) or {}
    parts = extra.get("parts")
    kinds = ("text", "tool_call", "tool_output")
    if isinstance(parts, list) and parts and all(isinstance(p, dict) and p.get("type") in kinds
                                                 and isinstance(p.get("text"), str) for p in parts):
        return [{"type": p["type"], "text": p["text"]} for p in parts]
    return [{"type": "text", "text": message.content or ""}]


def content_of(parts: list[dict]):
    """The row's assistant content: a plain string when the reply is only text, else its parts."""
    return own_words(parts) if all(p["type"] == "text" for p in parts) else parts


def _why(e: Exception) -> str:
    status = getattr(e, "status_code", None)
    text = (f"HTTP {status}: " if status else "") + str(getattr(e, "message", e) or type(e).__name__)
    return " ".join(text.split())[:300].rstrip(".")


# ----------------------------------------------------------------------------- mode answer

def answer_item(teacher: Teacher, tasks, mixture: dict[str, float], seed: int, item: int, split: str):
    """(row or None, provenance, why it was rejected, messages) for one generator question the teacher answers."""
    rng = item_rng(seed, item)
    name = pick_task(rng, mixture)
    task = tasks[name]
    ex = task.example(rng, split)
    question = [dict(m) for m in ex["messages"][:-1]]
    reference = ex["messages"][-1]["content"]
    hint = _format_hint(reference if isinstance(reference, str) else json.dumps(reference))
    reply = teacher.chat(([{"role": "system", "content": hint}] if hint else []) + question, rng=rng)
    passed = task.grade_reply(reply, ex)
    prov = provenance("teacher", name, seed, item, ex, mode="answer", split=split, teacher=teacher.info,
                      verification={"method": "grader", "passed": passed})
    messages = question + [{"role": "assistant", "content": content_of(reply)}]
    if not passed:
        return None, prov, "wrong answer", messages
    return row(messages, str(ex.get("answer", "")), prov), prov, "", messages


def _format_hint(reference: str) -> str:
    """What the teacher must know about a task's answer format that the question does not say."""
    if "####" in reference:
        return "Solve the problem, then end your reply with a last line '#### <final answer>' (the number only)."
    return ""


# ----------------------------------------------------------------------------- mode write

def write_item(teacher: Teacher, kinds: dict[str, float], seed: int, item: int, drop_unverified: bool):
    """(row or None, provenance, reason, messages) for one teacher-written question and its answer."""
    rng = item_rng(seed, item)
    persona, topic, style = rng.choice(PERSONAS), rng.choice(TOPICS), rng.choice(STYLES)
    kind = pick_task(rng, kinds)
    what, schema = KINDS[kind]
    ask = (f"Write {what} that {persona} might ask about {topic}, phrased {style}. Reply with only a JSON object "
           f"and nothing else: {schema}")
    written = own_words(teacher.chat([{"role": "user", "content": ask}], rng=rng))
    spec = _json_object(written)
    prov = provenance("teacher", "write", seed, item, mode="write", kind=kind, persona=persona, topic=topic, style=style,
                      teacher=teacher.info)
    if not spec or not isinstance(spec.get("question"), str) or not spec["question"].strip():
        asked = [{"role": "user", "content": ask}, {"role": "assistant", "content": written}]
        return None, {**prov, "verification": {"method": "none", "passed": False}}, "no question in the reply", asked
    question = [{"role": "user", "content": spec["question"].strip()}]
    hint = [{"role": "system", "content": ANSWER_HINTS[kind]}]
    reply = teacher.chat(hint + question, rng=rng)
    method, passed, answer = VERIFY[kind](teacher, spec, hint + question, own_words(reply), rng)
    prov["verification"] = {"method": method, "passed": passed}
    messages = question + [{"role": "assistant", "content": content_of(reply)}]
    if passed is False:
        return None, prov, f"failed verification: {method}", messages
    if passed is None and drop_unverified:
        return None, prov, "unverifiable (--drop-unverified)", messages
    return row(messages, answer, prov), prov, "", messages


def _json_object(text: str) -> dict | None:
    """The first JSON object in a reply (models wrap it in prose or code fences)."""
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
            return obj if isinstance(obj, dict) else None
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def verify_math(teacher, spec: dict, question, reply: str, rng) -> tuple[str, bool, str]:
    try:
        expected = calculator(str(spec.get("expression", "")))
    except ToolError:
        return "calculator", False, ""
    return "calculator", grade_final_number(reply, expected), expected


_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)


def verify_code(teacher, spec: dict, question, reply: str, rng) -> tuple[str, bool | None, str]:
    from exocortex.infer.sandbox import SandboxUnavailable, run_python

    blocks = _FENCE.findall(reply)
    code, tests = (blocks[0] if blocks else reply), str(spec.get("tests", ""))
    if "assert" not in tests:
        return "python", False, ""
    try:
        r = run_python(code + "\n\n" + tests + "\nprint('synth: tests passed')\n", timeout_s=10.0)
    except SandboxUnavailable:  # no sandbox here: the row cannot be checked, never run unsandboxed
        return "python (sandbox unavailable)", None, ""
    return "python", r.ok and "synth: tests passed" in r.stdout, ""


def verify_short(teacher, spec: dict, question, reply: str, rng) -> tuple[str, bool, str]:
    second = own_words(teacher.chat(question, rng=rng))
    a, b = _normal(reply), _normal(second)
    agree = bool(a and b) and (a == b or a in b or b in a or _same_final_number(reply, second))
    return "agreement of 2 samples", agree, (min(a, b, key=len) if agree else "")


def verify_open(teacher, spec: dict, question, reply: str, rng) -> tuple[str, None, str]:
    return "none", None, ""


VERIFY = {"math": verify_math, "code": verify_code, "short": verify_short, "open": verify_open}


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _same_final_number(a: str, b: str) -> bool:
    na, nb = numbers_in(a), numbers_in(b)
    return bool(na and nb) and grade_final_number(a, nb[-1])


# ----------------------------------------------------------------------------- the job

def _refusal_rejects(work, ds: Dataset, item: int):
    """work(item), with a request the teacher refused made that item's rejection."""
    try:
        return work(item)
    except TeacherRefused as e:
        return None, provenance(ds.source, "?", ds.seed, item, mode=ds.mode), f"teacher: {e}", None


def run_teacher(ds: Dataset, teacher: Teacher, work, n: int) -> int:
    """Items 0..n-1 not yet done, `work(item)` for each with a few in flight; rows are written in the order
    they finish. Returns how many were tried. A fatal error (the teacher gone, the key refused) stops the job
    after the rows already finished are written."""
    teacher.check()
    todo = ds.todo(n)
    bar = Progress(len(todo), f"teacher {teacher.tc.model}")
    pending_items = iter(todo)
    with ThreadPoolExecutor(max_workers=teacher.tc.concurrency) as pool:
        running = set()
        try:
            while True:
                while len(running) < 2 * teacher.tc.concurrency:
                    item = next(pending_items, None)
                    if item is None:
                        break
                    running.add(pool.submit(_refusal_rejects, work, ds, item))
                if not running:
                    break
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    r, prov, reason, messages = f.result()
                    if r is not None:
                        ds.keep(r)
                    else:
                        ds.reject(prov, reason, messages)
                    bar.update(ds)
        finally:
            for f in running:
                f.cancel()
            bar.close()
    return len(todo)
