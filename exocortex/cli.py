"""One entry point: `exocortex <stage>`, built from the stage registry (exocortex/registry.py). Thin: parses the
arguments, resolves the run's config, calls the stage's run function with its options.

Bad input ends with a one-line `error: ...` and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import time
from pathlib import Path

from exocortex import registry
from exocortex.config import RunConfig, check_flag, load_config, make_config
from exocortex.data.hub import download, downloaded_dir
from exocortex.data.tokens import has_token_data
from exocortex.device import bound_memory
from exocortex.errors import ExocortexError
from exocortex.infer.sandbox import OPT_IN_VALUE, OPT_IN_VAR
from exocortex.run import RunDir, most_recent_run
from exocortex.train import parallel

# every option a stage may list in the registry: name -> [(flags, argparse keywords)]; `dest` is the keyword
# argument the stage's run function takes
OPTIONS: dict[str, list[tuple[tuple[str, ...], dict]]] = {
    "data": [(("--data",), dict(dest="data", default=None, help="your own text: a file or directory of .txt/.md/.jsonl/.parquet, "
                                 "or hf:<owner/name> for a dataset fetched with `exocortex data download`"))],
    "resume": [(("--resume",), dict(dest="resume", action="store_true", help="continue from the latest checkpoint"))],
    "force": [(("--force",), dict(dest="force", action="store_true", help="start over where this would replace trained "
                                  "checkpoints (the old ones stay until the new run has written its first)"))],
    "stages": [(("--stages",), dict(dest="stages", default=None,
                                    type=lambda s: [x.strip() for x in s.split(",") if x.strip()] or None,
                                    help="comma-separated subset of " + ",".join(registry.MODEL_STAGES)))],
    "checkpoint": [(("--checkpoint", "--stage"), dict(dest="stage", default=None, choices=registry.MODEL_STAGES[::-1],
                    help="which stage's model (default: the newest chat stage the run has: rl, sft, then midtrain)"))],
    "chat_checkpoint": [(("--checkpoint", "--stage"), dict(dest="stage", default=None, choices=registry.CHAT_STAGES,
                         help="which stage's model to talk to (default: the newest the run has)"))],
    "prompt": [(("-p", "--prompt"), dict(dest="prompt", default=None, help="one-shot: answer this prompt and exit"))],
    "sampling": [(("--temperature",), dict(dest="temperature", type=float, default=None, help="default: the run's sampling.temperature")),
                 (("--top-k",), dict(dest="top_k", type=int, default=None, help="default: sampling.top_k (0 = off)")),
                 (("--top-p",), dict(dest="top_p", type=float, default=None, help="default: sampling.top_p")),
                 (("--max-tokens",), dict(dest="max_tokens", type=int, default=None, help="default: sampling.max_tokens"))],
    "system": [(("--system",), dict(dest="system", default=None, help="a system prompt"))],
    "seed": [(("--seed",), dict(dest="seed", type=int, default=None))],
    "docs": [(("--docs",), dict(dest="docs", action="append", default=None, metavar="PATH",
                                help="your documents (file or directory, repeatable): the lookup tool searches them"))],
    "index": [(("--index",), dict(dest="index", nargs="?", const="", default=None, metavar="FILE",
                                  help="lookup searches your document index (built by `exocortex index`; FILE "
                                       "defaults to ~/.exocortex/documents.sqlite) and replies cite file and lines"))],
    "memory": [(("--memory",), dict(dest="memory", action=argparse.BooleanOptionalAction, default=True,
                                    help="the model keeps notes about its user across sessions with its remember / "
                                         "recall / forget tools (default; ~/.exocortex/notes.sqlite, see `exocortex "
                                         "memory`); --no-memory: no notes read or written"))],
    "user": [(("--user",), dict(dest="user", default="local",
                                help="whose notes the model reads and writes (default: local, the same as the server "
                                     "uses for requests without a `user` field)"))],
    "escalate": [(("--escalate-to",), dict(dest="escalate_to", default=None, metavar="URL",
                                           help="send chat requests the model is unsure of to this OpenAI-compatible "
                                                "endpoint (base URL, e.g. http://host:8000/v1); needs `exocortex eval` "
                                                "to have calibrated the model (docs/serve.md: escalation)")),
                 (("--escalate-model",), dict(dest="escalate_model", default=None, metavar="NAME",
                                              help="the model name to ask for there (default: the request's)")),
                 (("--threshold",), dict(dest="threshold", type=float, default=None,
                                         help="escalate when the calibrated chance that the local reply is right is "
                                              "below this (0-1, default 0.5); the endpoint's key comes from "
                                              "$EXOCORTEX_ESCALATE_API_KEY"))],
    "host": [(("--host",), dict(dest="host", default="127.0.0.1"))],
    "port": [(("--port",), dict(dest="port", type=int, default=8000))],
    "max_concurrent": [(("--max-concurrent",), dict(dest="max_concurrent", type=int, default=16,
                                                    help="generations decoded together in one batch (default 16)"))],
    "max_queue": [(("--max-queue",), dict(dest="max_queue", type=int, default=64, help="requests waiting for a place (default 64)"))],
    "compile": [(("--compile",), dict(dest="compile", action=argparse.BooleanOptionalAction, default=True,
                 help="compile the decode step (default; --no-compile: eager). The first use per model shape waits "
                 "for the compiler, then it is cached on disk; falls back to eager, saying why, where it cannot run"))],
    "max_prompt_tokens": [(("--max-prompt-tokens",), dict(dest="max_prompt_tokens", type=int, default=None))],
    "api_key": [(("--api-key",), dict(dest="api_key", default=None, help="require 'Authorization: Bearer <key>' on /v1 "
                                      "(or set EXOCORTEX_API_KEY, which other users of this machine cannot see)")),
                (("--insecure-no-api-key",), dict(dest="insecure_no_api_key", action="store_true",
                                                   help="serve beyond loopback without a key (anyone who can reach "
                                                        "the server may use it)"))],
    "allowed_hosts": [(("--allowed-hosts",), dict(dest="allowed_hosts", default=None, metavar="NAMES",
                                                  help="Host header names served besides loopback and --host, "
                                                       "comma-separated ('*': any)"))],
    "sandbox": [(("--allow-degraded-sandbox",), dict(dest="degraded_sandbox", action="store_true",
                                                     help=f"run the python tool even where this kernel lacks a sandbox "
                                                          f"layer (same as {OPT_IN_VAR}={OPT_IN_VALUE}; docs/sandbox.md)"))],
    "format": [(("--format",), dict(dest="format", default="hf", choices=["hf", "gguf"],
                                    help="hf: a transformers directory; gguf: one file for llama.cpp / Ollama"))],
    "out": [(("--out",), dict(dest="out", default=None, help="output directory (hf; default runs/<name>/hf) or .gguf file "
                              "(gguf; default runs/<name>/gguf/<name>-<dtype>.gguf)"))],
    "dtype": [(("--dtype",), dict(dest="dtype", default=None, choices=["float32", "bfloat16", "float16"],
                                  help="weights: hf float32 (default) | bfloat16; gguf float16 (default) | float32 | bfloat16"))],
    "verify": [(("--verify",), dict(dest="verify", action="store_true",
                                    help="load the export (transformers / llama-cpp-python) and compare with exocortex"))],
}


NOT_PASSED = ("data", "sandbox")  # options the stage function doesn't take: data is in cfg, sandbox in the environment


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exocortex", description="Own your LLM end to end.")
    sub = p.add_subparsers(dest="command", metavar="<stage>")
    for stage in registry.STAGES:
        s = sub.add_parser(stage.name, help=stage.help, description=stage.help)
        s.add_argument("--run", "--run-name", dest="run", default=None,
                       help="run name (under --runs-dir) or path; default: the preset name (chat, serve: the most "
                       "recent run). Under torchrun write --run-name: torchrun takes --run for its own --run-path")
        s.add_argument("--runs-dir", default="runs")
        s.add_argument("--preset", default="tiny", help="tiny (CPU) | d12 | d20 | d26")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set pretrain.time_minutes=3 (repeatable)")
        for option in stage.options:
            for flags, kw in OPTIONS[option]:
                s.add_argument(*flags, **kw)
    _data_parser(sub)
    _synth_parser(sub)
    _index_parser(sub)
    _memory_parser(sub)
    return p


def _memory_parser(sub) -> None:
    """`exocortex memory`: the notes the model keeps about its users, for the person who owns them."""
    m = sub.add_parser("memory", help="see and change the notes the model keeps across sessions: list | add | edit | "
                       "forget", description="The notes the model wrote with its remember tool (infer/notes.py), in "
                       "$EXOCORTEX_HOME/notes.sqlite (default ~/.exocortex).")
    m.add_argument("action", choices=["list", "add", "edit", "forget"])
    m.add_argument("args", nargs="*", metavar="ARG", help="add: TEXT; edit: ID TEXT; forget: ID...")
    m.add_argument("--user", default="local", help="whose notes (default: local)")
    m.add_argument("--all", action="store_true", help="list: every user's notes")


def run_memory(args) -> None:
    from exocortex.infer.notes import NoteStore, default_notes_path
    from exocortex.infer.tools import ToolError

    usage = {"list": 0, "add": 1, "edit": 2, "forget": 1}
    if len(args.args) < usage[args.action] or (args.action in ("list",) and args.args):
        raise ExocortexError("usage: exocortex memory list | add TEXT | edit ID TEXT | forget ID... [--user NAME]")
    store = NoteStore(default_notes_path())
    try:
        if args.action == "list":
            notes = store.list(None if args.all else args.user)
            for n in notes:
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(n.updated))
                print(f"{n.id:>5}  {n.user if args.all else ''}{'  ' if args.all else ''}{when}  ({n.source})  {n.text}")
            print(f"{len(notes)} notes" + ("" if args.all else f" of user {args.user!r}"), file=sys.stderr)
        elif args.action == "add":
            print(f"saved as note {store.add(args.user, ' '.join(args.args), 'cli')}")
        else:
            ids = [_note_id(a) for a in (args.args[:1] if args.action == "edit" else args.args)]
            for nid in ids:
                if args.action == "edit":
                    store.edit(args.user, nid, " ".join(args.args[1:]))
                    print(f"note {nid} edited")
                else:
                    print(f"forgot note {nid}: {store.forget(args.user, nid).text}")
    except ToolError as e:
        raise ExocortexError(f"{e} (user {args.user!r}; `exocortex memory list` shows the ids)") from None
    finally:
        store.close()


def _note_id(text: str) -> int:
    if not text.isdigit():
        raise ExocortexError(f"{text!r} is not a note id (a number: `exocortex memory list` shows them)")
    return int(text)


def _index_parser(sub) -> None:
    """`exocortex index`: your documents in an on-disk index that `lookup` searches (infer/docstore.py)."""
    from exocortex.infer.docstore import default_index_path

    s = sub.add_parser("index", help="index your text and markdown files for the lookup tool (incremental: run it "
                       "again after editing them)", description="Builds or updates the document index (SQLite "
                       "FTS5) that chat and serve search with --index. Unchanged files are skipped, changed ones "
                       "re-read, removed ones dropped. Replies cite the passages they read (file, lines).")
    s.add_argument("paths", nargs="*", metavar="PATH", help="files or folders (.txt, .md) to add or refresh")
    s.add_argument("--index", dest="index", default=None,
                   help=f"the index file (default {default_index_path()}; $EXOCORTEX_HOME moves it)")
    s.add_argument("--search", default=None, metavar="QUERY", help="print the best passages for QUERY")
    s.add_argument("-k", type=int, default=3, help="passages --search prints (default 3)")


def run_index(args) -> None:
    from exocortex.infer.docstore import DocumentStore, default_index_path

    if not args.paths and args.search is None:
        raise ExocortexError("usage: exocortex index PATH... (to add or refresh files) or --search QUERY")
    if args.k < 1:
        raise ExocortexError(f"-k must be at least 1 (got {args.k})")
    store = DocumentStore(args.index or default_index_path())
    try:
        if args.paths:
            summary = store.update(args.paths, progress=_index_progress())
            for why in summary.skipped:
                print(f"warning: skipped {why}", file=sys.stderr)
            st = store.stats()
            print(f"index {store.path}: {summary.line()}; now {st['files']} files, {st['passages']} passages")
        if args.search is not None:
            hits = store.search(args.search, args.k)
            if not hits:
                print("no results")
            for h in hits:
                print(f"[{h.source}] {h.text}")
    finally:
        store.close()


def _index_progress():
    """A bar over the files of an update on a terminal; nothing elsewhere."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    bar = None

    def update(i: int, total: int, path: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="index", unit="file", dynamic_ncols=True, leave=False)
        bar.update(1)
        if i + 1 == total:
            bar.close()
    return update


def _data_parser(sub) -> None:
    """`exocortex data download`: a tool for fetching corpora, not a pipeline stage."""
    d = sub.add_parser("data", help="fetch pretraining data: `exocortex data download --dataset <owner/name>`")
    dsub = d.add_subparsers(dest="data_cmd", metavar="<command>")
    dl = dsub.add_parser("download", help="download parquet shards of a Hugging Face hub dataset (resumable, "
                         "parallel, checksummed) into a local cache", description="Resumable, parallel, "
                         "checksummed download of a hub dataset's parquet files. Then: exocortex pretrain "
                         "--data hf:<owner/name> (or the printed cache directory).")
    dl.add_argument("--dataset", required=True, help="hub dataset id, e.g. HuggingFaceFW/fineweb-edu")
    dl.add_argument("--include", default="*.parquet",
                    help="which files (glob on the path in the repo), e.g. 'sample/10BT/*.parquet'")
    dl.add_argument("--shards", type=int, default=0, help="only the first N matching files (sorted); 0 = all")
    dl.add_argument("--revision", default="main", help="branch, tag or commit")
    dl.add_argument("--cache-dir", default=None,
                    help="where to put them (default: ~/.cache/exocortex/datasets/<owner>/<name>)")
    dl.add_argument("--workers", type=int, default=8, help="parallel downloads")
    dl.add_argument("--verify", action="store_true", help="re-hash every cached file, not only changed ones")


def run_data(args) -> None:
    if args.data_cmd != "download":
        raise ExocortexError("usage: exocortex data download --dataset <owner/name> [--include GLOB] [--shards N]")
    download(args.dataset, shards=args.shards, include=args.include, revision=args.revision,
             cache_dir=args.cache_dir, workers=args.workers, verify=args.verify)


def _synth_parser(sub) -> None:
    """`exocortex synth`: a tool that writes datasets (docs/synth.md), not a pipeline stage."""
    from exocortex.synth.teacher import DEFAULT_KEY_ENV, KINDS

    s = sub.add_parser("synth", help="write a dataset (JSONL with provenance) from the generators, a teacher "
                       "endpoint or a trained run's own correct samples", description="Write conversations to "
                       "train on as a jsonl:<path> task, each row with its provenance and verification. Appends to "
                       "--out and skips items already done, so an interrupted job resumes. See docs/synth.md.")
    s.add_argument("--source", required=True, choices=["generators", "teacher", "self"])
    s.add_argument("--out", required=True, help="the .jsonl to append to (rejected items go beside it, "
                   "<name>.rejected.jsonl)")
    s.add_argument("--n", type=int, default=1000, help="items to try: prompts drawn 0..n-1 (default 1000)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--split", default="train", help="which split's questions (default train)")
    s.add_argument("--tasks", default=None, metavar="MIXTURE", help="e.g. arithmetic=0.5,word_problems=0.5 "
                   "(default: generators the midtrain mixture; teacher arithmetic,word_problems,spelling; "
                   "self arithmetic,word_problems)")
    s.add_argument("--dedup-threshold", type=float, default=0.8, help="near-duplicate Jaccard threshold (word "
                   "5-shingles, MinHash/LSH); 1 = exact duplicates and identical shingle sets only")
    s.add_argument("--run", "--run-name", dest="run", default=None, help="the run whose tasks (generated world, "
                   "name) and, for --source self, model to use (default: the preset's defaults; self: required)")
    s.add_argument("--runs-dir", default="runs")
    s.add_argument("--preset", default="tiny")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t = s.add_argument_group("teacher")
    t.add_argument("--teacher-url", default=None, help="an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    t.add_argument("--teacher-model", default=None, help="the model name the endpoint serves")
    t.add_argument("--api-key-env", default=DEFAULT_KEY_ENV, help=f"environment variable holding the API key "
                   f"(default {DEFAULT_KEY_ENV}; none needed by a local server)")
    t.add_argument("--mode", default="answer", choices=["answer", "write"], help="answer: the generators' "
                   "questions, kept when graded correct; write: new questions from personas x topics x styles")
    t.add_argument("--kinds", default=None, metavar="MIXTURE", help=f"write: kinds of question, of "
                   f"{','.join(KINDS)} (default all, equally)")
    t.add_argument("--drop-unverified", action="store_true", help="write: drop answers nothing could check")
    t.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    t.add_argument("--retries", type=int, default=5, help="retries of a failed request, with backoff (default 5)")
    t.add_argument("--teacher-temperature", type=float, default=0.7)
    t.add_argument("--teacher-max-tokens", type=int, default=512)
    m = s.add_argument_group("self")
    m.add_argument("--stage", default=None, choices=registry.CHAT_STAGES, help="the run's checkpoint (default: "
                   "its newest chat stage)")
    m.add_argument("--k", type=int, default=8, help="samples per prompt (default 8)")
    m.add_argument("--temperature", type=float, default=1.0)
    m.add_argument("--max-tokens", type=int, default=256, help="new tokens per sample (default 256)")


def run_synth(args) -> None:
    from exocortex.config import parse_mixture
    from exocortex.synth.job import SynthJob, run_synth as synthesize
    from exocortex.synth.teacher import TeacherConfig

    if args.source == "self" and not args.run:
        raise ExocortexError("--source self needs --run: the trained run whose samples to keep")
    has_run = args.run and (_run_path(args) / "config.json").exists()
    cfg = existing_config(args, "synth") if has_run or args.source == "self" else make_config(args.preset, args.set)
    teacher = TeacherConfig(args.teacher_url, args.teacher_model, args.api_key_env, args.teacher_temperature,
                            args.teacher_max_tokens, args.concurrency, args.retries) if args.teacher_url else None
    job = SynthJob(source=args.source, out=Path(args.out), n=args.n, seed=args.seed, split=args.split,
                   tasks=parse_mixture(args.tasks) if args.tasks else {}, dedup_threshold=args.dedup_threshold,
                   teacher=teacher, mode=args.mode, drop_unverified=args.drop_unverified, stage=args.stage, k=args.k,
                   temperature=args.temperature, max_tokens=args.max_tokens,
                   **({"kinds": parse_mixture(args.kinds)} if args.kinds else {}))
    synthesize(cfg, job)


# ----------------------------------------------------------------------------- the run's config

def _run_path(args) -> Path:
    if args.run and (os.sep in args.run or Path(args.run).is_dir()):
        return Path(args.run)
    return Path(args.runs_dir) / (args.run or args.preset)


def data_path(arg: str) -> str:
    """--data: a path, or hf:<owner>/<name> for a dataset fetched with `exocortex data download`."""
    if arg.startswith("hf:"):
        return str(downloaded_dir(arg[3:]))
    return str(Path(arg).expanduser().resolve())


def new_config(args) -> RunConfig:
    """A new run: the preset plus overrides (and --data)."""
    path = _run_path(args)
    cfg = make_config(args.preset, args.set, name=path.name)
    cfg.runs_dir = str(path.parent)
    return _with_data(cfg, args)


def _with_data(cfg: RunConfig, args) -> RunConfig:
    if getattr(args, "data", None):
        cfg.data.path = data_path(args.data)
    return cfg


def existing_config(args, stage: str) -> RunConfig:
    """A later stage continues a run: its saved config plus overrides."""
    path = _run_path(args)
    if not (path / "config.json").exists():
        raise ExocortexError(f"no run at {path} (no config.json); start one with `exocortex speedrun` or "
                             f"`exocortex tokenizer --run {path.name}` before `{stage}`")
    return load_config(path, args.set)


def stage_config(stage: registry.Stage, args) -> RunConfig:
    if stage.config == "new":  # resuming a run that has its tokens keeps its config (and tokens)
        resuming = getattr(args, "resume", False) and has_token_data(RunDir(_run_path(args)).data_dir)
        return existing_config(args, stage.name) if resuming else new_config(args)
    if stage.config == "recent" and not args.run:
        args.run = str(most_recent_run(args.runs_dir))
    if "data" in stage.options and (args.data or not (_run_path(args) / "config.json").exists()):
        # a new corpus (or no run yet): tokenize it first (rank 0 only), then run this stage on it
        exists = (_run_path(args) / "config.json").exists()
        cfg = _with_data(existing_config(args, stage.name), args) if exists else new_config(args)
        tokenize = registry.BY_NAME["tokenizer"].load()
        parallel.run_on_main(lambda: tokenize(cfg, force=getattr(args, "force", False)), "tokenization")
        return cfg
    return existing_config(args, stage.name)


def run_stage(stage: registry.Stage, args) -> None:
    if "sampling" in stage.options:  # chat's --temperature etc. stand for sampling.*: the same ranges
        for flags, kw in OPTIONS["sampling"]:
            if getattr(args, kw["dest"]) is not None:
                check_flag(flags[0], f"sampling.{kw['dest']}", getattr(args, kw["dest"]))
    if getattr(args, "degraded_sandbox", False):  # the opt-in lives in the environment: grading workers see it too
        os.environ[OPT_IN_VAR] = OPT_IN_VALUE
    cfg = stage_config(stage, args)
    kwargs = {kw["dest"]: getattr(args, kw["dest"]) for option in stage.options
              if option not in NOT_PASSED
              for _, kw in OPTIONS[option]}
    stage.load()(cfg, **kwargs)


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # the training loop saves a checkpoint on the way out


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        sys.exit(2)
    signal.signal(signal.SIGTERM, _sigterm)
    bound_memory()  # before the first matrix product of any command
    try:
        parallel.init_from_env()
        if args.command == "data":
            run_data(args)
        elif args.command == "synth":
            run_synth(args)
        elif args.command == "index":
            run_index(args)
        elif args.command == "memory":
            run_memory(args)
        else:
            run_stage(registry.BY_NAME[args.command], args)
        parallel.shutdown()
    except ExocortexError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message holds
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except MemoryError:
        print("error: out of memory; use a smaller preset or --set pretrain.device_batch=<smaller>", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        if os.environ.get("EXOCORTEX_DEBUG") == "1":
            raise
        print(f"error: {_os_error_line(e)}", file=sys.stderr)
        sys.exit(1)


def _os_error_line(e: OSError) -> str:
    """A file the command could not read, write or rename, on one line: which, and why. Writes go to temp files
    first, so what a failed command leaves is for the stage that failed to say, not for this line."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or "a file"
    full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    why = e.strerror or " ".join(str(e).split()) or type(e).__name__
    return (f"{where}: {why}" + (" (is the disk full?)" if full else "")
            + "; fix that and run the command again (EXOCORTEX_DEBUG=1 shows where it happened)")
