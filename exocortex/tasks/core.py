"""DCLM's CORE eval bundle (the one nanochat reports) as in-context tasks for evals.core_scores.

A bundle is a folder (or the .zip it ships as) holding
  core.yaml           icl_tasks: [{label, dataset_uri, icl_task_type, num_fewshot, continuation_delimiter}, ...]
  eval_data/<uri>     JSONL rows, by icl_task_type:
                        multiple_choice    {"query", "choices": [...], "gold"}       -> mc, shared context
                        schema             {"context_options": [...], "continuation", "gold"} -> mc, shared ending
                        language_modeling  {"context", "continuation"}               -> em (greedy exact match)
  eval_meta_data.csv  "Eval Task", "Random baseline" (percent) -> each task's chance
Optional per task: prompt_string (put before everything) and example_delimiter (between few-shot examples,
default a blank line). num_fewshot may be a list; its first entry is used. A task missing from the csv gets
the chance of guessing (mean 1/#options; 0 for em).

Each item is the text a model scores, as evals.py's item formats: the few-shot examples (other rows of the
same task, drawn by a seeded rng, so the same for every model), then the item, then the delimiter. The
delimiter's trailing whitespace is moved onto the continuation (" Paris", not "... " + "Paris"), so context and
continuation split the way a tokenizer splits the joined text.
"""
from __future__ import annotations

import csv
import random
import shutil
import zipfile
from pathlib import Path

from exocortex.errors import ExocortexError, first_line
from exocortex.data.sources import iter_json_lines
from exocortex.tasks.base import split_of

TYPES = {"multiple_choice": "mc", "schema": "mc", "language_modeling": "em"}


def _bundle_dir(path: str | Path) -> Path:
    """The folder holding core.yaml, given it, core.yaml itself, or the bundle's .zip (extracted beside it)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ExocortexError(f"CORE bundle {p} does not exist (download eval_bundle.zip, see docs)")
    if p.is_file() and p.suffix == ".zip":
        out = p.with_suffix("")
        if not out.exists():
            tmp = out.with_name(out.name + ".partial")
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                with zipfile.ZipFile(p) as z:
                    z.extractall(tmp)
                tmp.rename(out)  # whole or not at all: an interrupted extraction is redone next time
            except (zipfile.BadZipFile, OSError) as e:
                raise ExocortexError(f"{p}: cannot extract the CORE bundle ({e})") from None
        p = out
    if p.is_file():
        p = p.parent
    for d in (p, *sorted(p.glob("*/")), *sorted(p.glob("*/*/"))):  # zips often hold one top folder
        if (d / "core.yaml").is_file():
            return d
    raise ExocortexError(f"{p} has no core.yaml: give the CORE eval bundle folder (core.yaml, eval_data/, "
                         "eval_meta_data.csv)")


def _read_yaml(f: Path) -> list[dict]:
    try:
        import yaml
    except ImportError:
        raise ExocortexError("reading a CORE bundle needs PyYAML: pip install pyyaml") from None
    try:
        config = yaml.safe_load(f.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ExocortexError(f"{f}: not valid YAML ({first_line(e)})") from None
    tasks = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise ExocortexError(f"{f}: expected a non-empty 'icl_tasks' list")
    return tasks


def _baselines(f: Path) -> dict[str, float]:
    """Label -> chance (0..1) from eval_meta_data.csv; {} when the bundle has none."""
    if not f.is_file():
        return {}
    out = {}
    with open(f, encoding="utf-8", newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh), 2):
            label, base = row.get("Eval Task"), row.get("Random baseline")
            if not label or base in (None, ""):
                continue
            try:
                pct = float(base)
            except ValueError:
                raise ExocortexError(f"{f}:{i}: 'Random baseline' must be a number (percent), got {base!r}") from None
            if not 0 <= pct < 100:
                raise ExocortexError(f"{f}:{i}: 'Random baseline' must be a percentage in [0, 100), got {pct}")
            out[label.strip()] = pct / 100
    return out


def _spec(t, i: int, f: Path) -> dict:
    where = f"{f}: icl_tasks[{i}]"
    if not isinstance(t, dict):
        raise ExocortexError(f"{where} must be a mapping with label, dataset_uri, icl_task_type, num_fewshot")
    for key in ("label", "dataset_uri", "icl_task_type"):
        if not isinstance(t.get(key), str) or not t[key]:
            raise ExocortexError(f"{where}: '{key}' must be a non-empty string")
    if t["icl_task_type"] not in TYPES:
        raise ExocortexError(f"{where} ({t['label']}): icl_task_type '{t['icl_task_type']}' is not supported "
                             f"(supported: {', '.join(TYPES)})")
    shots = t.get("num_fewshot", 0)
    shots = shots[0] if isinstance(shots, list) and shots else shots
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise ExocortexError(f"{where} ({t['label']}): num_fewshot must be an integer >= 0 or a list of them")
    strings = {}
    for key, default in (("continuation_delimiter", " "), ("example_delimiter", "\n\n"), ("prompt_string", "")):
        v = t.get(key, default)
        if not isinstance(v, str):
            raise ExocortexError(f"{where} ({t['label']}): {key} must be a string")
        strings[key] = v
    return {"label": t["label"], "uri": t["dataset_uri"], "type": t["icl_task_type"], "shots": shots, **strings}


def _check_row(row: dict, kind: str, where: str) -> dict:
    def text(key):
        if not isinstance(row.get(key), str):
            raise ExocortexError(f'{where}: {kind} rows need a string "{key}"')
        return row[key]

    def options(key):
        v = row.get(key)
        if not isinstance(v, list) or len(v) < 2 or not all(isinstance(s, str) for s in v):
            raise ExocortexError(f'{where}: {kind} rows need "{key}": a list of at least 2 strings')
        gold = row.get("gold")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(v):
            raise ExocortexError(f'{where}: "gold" must be an index into "{key}" (0..{len(v) - 1}), got {gold!r}')
        return v, gold

    if kind == "multiple_choice":
        choices, gold = options("choices")
        return {"query": text("query"), "choices": choices, "gold": gold}
    if kind == "schema":
        opts, gold = options("context_options")
        return {"context_options": opts, "continuation": text("continuation"), "gold": gold}
    return {"context": text("context"), "continuation": text("continuation")}


def _read_rows(f: Path, kind: str) -> list[dict]:
    if not f.is_file():
        raise ExocortexError(f"CORE task data {f} does not exist (is the bundle complete?)")
    try:
        lines = f.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ExocortexError(f"{f} is not UTF-8 text (bad byte at offset {e.start})") from None
    rows = [_check_row(row, kind, f"{f}:{n}") for n, row in iter_json_lines(lines, f)]
    if not rows:
        raise ExocortexError(f"{f} holds no rows")
    return rows


def _render(kind: str, row: dict, head: str) -> tuple[str, str]:
    """One solved example as (text before the answer, answer); used for few-shot demonstrations."""
    if kind == "multiple_choice":
        return row["query"] + head, row["choices"][row["gold"]]
    if kind == "schema":
        return row["context_options"][row["gold"]] + head, row["continuation"]
    return row["context"].strip() + head, row["continuation"]


def _item(spec: dict, rows: list[dict], i: int, seed: int) -> dict:
    kind, delim = spec["type"], spec["continuation_delimiter"]
    head = delim.rstrip()
    tail = delim[len(head):]  # trailing whitespace belongs to the continuation's first token
    rng = random.Random(f"core-{seed}-{spec['label']}-{i}")
    others = [j for j in range(len(rows)) if j != i]  # never the item itself
    shots = [rows[j] for j in rng.sample(others, min(spec["shots"], len(others)))]
    prefix = spec["prompt_string"] + "".join(
        a + tail + b + spec["example_delimiter"] for a, b in (_render(kind, s, head) for s in shots))
    row = rows[i]
    if kind == "multiple_choice":
        return {"context": prefix + row["query"] + head, "choices": [tail + c for c in row["choices"]],
                "gold": row["gold"]}
    if kind == "schema":
        return {"contexts": [prefix + c + head for c in row["context_options"]],
                "continuation": tail + row["continuation"], "gold": row["gold"]}
    return {"context": prefix + row["context"].strip() + head, "continuation": tail + row["continuation"]}


def load_core_bundle(path: str | Path, max_items: int | None = None, seed: int = 1234) -> dict[str, dict]:
    """{label: {"kind": "mc"|"em", "chance", "items"}} for every task in the bundle's core.yaml, in its order.
    max_items (> 0) keeps a fixed, seeded sample of each task's rows; few-shot examples come from all rows."""
    root = _bundle_dir(path)
    specs = [_spec(t, i, root / "core.yaml") for i, t in enumerate(_read_yaml(root / "core.yaml"))]
    seen = set()
    for s in specs:
        if s["label"] in seen:
            raise ExocortexError(f"{root / 'core.yaml'}: task label '{s['label']}' appears twice")
        seen.add(s["label"])
    baselines = _baselines(root / "eval_meta_data.csv")
    out = {}
    for spec in specs:
        rows = _read_rows(root / "eval_data" / spec["uri"], spec["type"])
        order = list(range(len(rows)))
        random.Random(f"core-{seed}-{spec['label']}").shuffle(order)
        if max_items and max_items > 0:
            order = order[:max_items]
        items = [_item(spec, rows, i, seed) for i in order]
        kind = TYPES[spec["type"]]
        if spec["label"] in baselines:
            chance = baselines[spec["label"]]
        elif kind == "mc":
            n_opts = [len(it["choices"] if "choices" in it else it["contexts"]) for it in items]
            chance = sum(1 / n for n in n_opts) / len(n_opts)
        else:
            chance = 0.0
        out[spec["label"]] = {"kind": kind, "chance": chance, "items": items}
    return out


def world_incontext_tasks(world, n: int, seed: int) -> dict[str, dict]:
    """Offline CORE-style tasks from the generated world: {name: {"kind", "chance", "items"}}.

    world_cloze: "<subject> lives in" -> which of 4 values (mc). arithmetic_em: few-shot "a + b = " -> exact match.
    copy_em: a list of made-up words read back (exact match of its last two words).
    Item formats (shared with tasks/core.py's DCLM bundle loader): mc {"context", "choices", "gold"} or
    schema-style mc {"contexts", "continuation", "gold"}; em {"context", "continuation"}.
    """
    rng = random.Random(f"incontext-{seed}")
    facts = [f for f in world.facts() if not world.is_held_out(f.subject) and f.answer.count(f.value) == 1]
    values: dict[str, list[str]] = {}
    for f in facts:
        values.setdefault(f.relation, [])
        if f.value not in values[f.relation]:
            values[f.relation].append(f.value)
    test = [f for f in facts if split_of(f.subject + "|" + f.relation) == "test" and len(values[f.relation]) >= 4]
    shots = [f for f in facts if split_of(f.subject + "|" + f.relation) == "train"]
    cloze = []
    for f in rng.sample(test, min(n, len(test))):
        demo = " ".join(s.answer for s in rng.sample(shots, 3))
        ctx = demo + " " + f.answer[: f.answer.index(f.value)].rstrip()
        opts = [f.value] + rng.sample([v for v in values[f.relation] if v != f.value], 3)
        rng.shuffle(opts)
        cloze.append({"context": ctx, "choices": [" " + o for o in opts], "gold": opts.index(f.value)})
    em = []
    for _ in range(n):
        def pair():
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            op = rng.choice("+-")
            return f"{a} {op} {b} =", str(a + b if op == "+" else a - b)
        demo = "\n".join(f"{q} {a}" for q, a in (pair() for _ in range(3)))
        q, a = pair()
        em.append({"context": f"{demo}\n{q}", "continuation": " " + a})
    return {"world_cloze": {"kind": "mc", "chance": 0.25, "items": cloze},
            "arithmetic_em": {"kind": "em", "chance": 0.0, "items": em},
            "copy_em": {"kind": "em", "chance": 0.0, "in_core": False, "items": copy_items(n, rng)}}


_SYLLABLES = [c + v for c in "b d f g k l m n p r s t v z br st kr th".split() for v in "aeiou"]
_COPY_INTROS = ("The note said:", "She wrote down", "The code words were", "On the list:", "He read out")
_COPY_AGAIN = ("Later, reading it back:", "Again:", "Once more, slowly:", "Copied out:", "In the same order:")


def copy_items(n: int, rng: random.Random) -> list[dict]:
    """In-context copying (what an induction head does): a list of made-up words, then the list again; the model
    must finish the second pass with the list's last two words, which it can only take from the first pass.
    Lookup, memory, citations and multiple choice all need this: the answer is in the context, not in the weights."""
    def word() -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))
    items = []
    for _ in range(n):
        seq = [word() for _ in range(rng.randint(4, 7))]
        items.append({"context": f"{rng.choice(_COPY_INTROS)} {' '.join(seq)}. {rng.choice(_COPY_AGAIN)} "
                                 f"{' '.join(seq[:-2])}",
                      "continuation": " " + " ".join(seq[-2:])})
    return items
