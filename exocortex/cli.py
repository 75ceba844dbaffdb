"""One entry point: `exocortex <stage>`. Thin: parses arguments, resolves the config, calls the stage.

Bad input ends with a one-line `error: ...` and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import time
from pathlib import Path

from exocortex import distributed
from exocortex.config import ExocortexError, RunConfig, load_config, make_config, save_config

STAGES = ["tokenizer", "pretrain", "midtrain", "sft", "rl", "eval", "chat", "report", "export", "serve", "speedrun"]


def _run_path(args) -> Path:
    if args.run and (os.sep in args.run or Path(args.run).is_dir()):
        return Path(args.run)
    return Path(args.runs_dir) / (args.run or args.preset)


def new_config(args) -> RunConfig:
    """tokenizer/speedrun start a run: config from the preset plus overrides."""
    path = _run_path(args)
    cfg = make_config(args.preset, args.set, name=path.name)
    cfg.runs_dir = str(path.parent)
    if getattr(args, "data", None):
        cfg.data.path = data_path(args.data)
    return cfg


def data_path(arg: str) -> str:
    """--data: a path, or hf:<owner>/<name> for a dataset fetched with `exocortex data download`."""
    if arg.startswith("hf:"):
        from exocortex.data.hub import downloaded_dir

        return str(downloaded_dir(arg[3:]))
    return str(Path(arg).expanduser().resolve())


def existing_config(args, stage: str) -> RunConfig:
    """Later stages continue a run: its saved config plus overrides."""
    path = _run_path(args)
    if not (path / "config.json").exists():
        raise ExocortexError(f"no run at {path} (no config.json); start one with `exocortex speedrun` or "
                             f"`exocortex tokenizer --run {path.name}` before `{stage}`")
    return load_config(path, args.set)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cmd_speedrun(args) -> None:
    from exocortex.data.tokens import has_token_data
    from exocortex.evaluate import run_eval
    from exocortex.pretrain import run_pretrain, run_tokenizer, write_summary
    from exocortex.report import run_report
    from exocortex.rl import run_rl
    from exocortex.sft import run_midtrain, run_sft

    cfg = new_config(args)
    if cfg.run_dir.exists() and any(cfg.run_dir.iterdir()) and not args.resume:
        print(f"speedrun: {cfg.run_dir} exists; its stages will be overwritten (use --run to pick another name)")
    t_start = time.time()
    times: dict[str, float] = {}
    stages = [("tokenizer", lambda: run_tokenizer(cfg)), ("pretrain", lambda: run_pretrain(cfg, resume=args.resume)),
              ("midtrain", lambda: run_midtrain(cfg)), ("sft", lambda: run_sft(cfg)), ("rl", lambda: run_rl(cfg)),
              ("eval", lambda: run_eval(cfg))]
    for name, fn in stages:
        if args.resume and name == "tokenizer" and has_token_data(cfg.run_dir / "data"):
            cfg = load_config(cfg.run_dir, args.set)
            continue
        print(f"\n=== {name} ===")
        t0 = time.time()
        fn()
        times[name] = time.time() - t0
    save_config(cfg)
    write_summary(cfg.run_dir, "speedrun", {"stage_seconds": times, "total_seconds": time.time() - t_start,
                                            "peak_rss_mb": peak_rss_mb()})
    print("\n=== report ===")
    out = run_report(cfg)
    print(f"\nspeedrun done in {(time.time() - t_start) / 60:.1f} min. Report: {out}\n"
          f"Chat with your model: exocortex chat --run {cfg.run_dir}")


def cmd_tokenizer(args) -> None:
    from exocortex.pretrain import run_tokenizer

    run_tokenizer(new_config(args))


def cmd_pretrain(args) -> None:
    from exocortex.pretrain import run_pretrain, run_tokenizer

    path = _run_path(args)
    if args.data or not (path / "config.json").exists():
        # a new corpus (or no run yet): tokenize it first (rank 0 only), then pretrain on it
        cfg = new_config(args) if not (path / "config.json").exists() else existing_config(args, "pretrain")
        if args.data:
            cfg.data.path = data_path(args.data)
        distributed.run_on_main(lambda: run_tokenizer(cfg), "tokenization")
    else:
        cfg = existing_config(args, "pretrain")
    run_pretrain(cfg, resume=args.resume)


def cmd_midtrain(args) -> None:
    from exocortex.sft import run_midtrain

    run_midtrain(existing_config(args, "midtrain"), resume=args.resume)


def cmd_sft(args) -> None:
    from exocortex.sft import run_sft

    run_sft(existing_config(args, "sft"), resume=args.resume)


def cmd_rl(args) -> None:
    from exocortex.rl import run_rl

    run_rl(existing_config(args, "rl"), resume=args.resume)


def cmd_eval(args) -> None:
    from exocortex.evaluate import STAGES as EVAL_STAGES, run_eval

    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    bad = [s for s in stages or [] if s not in EVAL_STAGES]
    if bad:
        raise ExocortexError(f"--stages: unknown stage {bad[0]!r} (choose from {', '.join(EVAL_STAGES)})")
    run_eval(existing_config(args, "eval"), stages)


def cmd_report(args) -> None:
    from exocortex.report import run_report

    run_report(existing_config(args, "report"))


def cmd_chat(args) -> None:
    from exocortex.chat import most_recent_run, run_chat

    if not args.run:
        args.run = str(most_recent_run(args.runs_dir))
    cfg = existing_config(args, "chat")
    run_chat(cfg, prompt=args.prompt, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
             max_tokens=args.max_tokens, system=args.system, seed=args.seed, stage=args.model_stage, docs=args.docs)


def cmd_export(args) -> None:
    cfg = existing_config(args, "export")
    from exocortex.chat import chat_checkpoint

    stage = args.from_stage or chat_checkpoint(cfg).parent.name  # default: the newest chat stage
    if args.format == "gguf":
        from exocortex.export_gguf import export_gguf, verify_gguf

        dtype = args.dtype or "float16"
        suffix = "" if not args.from_stage else f"-{stage}"
        out = Path(args.out) if args.out else cfg.run_dir / "gguf" / f"{cfg.run_dir.name}{suffix}-{dtype}.gguf"
        export_gguf(cfg.run_dir, out, stage=stage, dtype=dtype)
        print(f"exported the {stage} model to {out} (run with llama.cpp: llama-cli -m {out} --jinja)")
        if args.verify:
            print(f"verified against exocortex: {verify_gguf(out, cfg.run_dir, stage)}")
        return
    from exocortex.export import export_hf, verify_hf

    out = Path(args.out) if args.out else cfg.run_dir / ("hf" if not args.from_stage else f"hf-{stage}")
    export_hf(cfg.run_dir, out, stage=stage, dtype=args.dtype or "float32")
    print(f"exported the {stage} model to {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    if args.verify:
        print(f"verified against exocortex: {verify_hf(out, cfg.run_dir, stage)}")


def cmd_serve(args) -> None:
    from exocortex.chat import most_recent_run
    from exocortex.serve import serve

    if not args.run:
        args.run = str(most_recent_run(args.runs_dir))
    serve(existing_config(args, "serve"), host=args.host, port=args.port, max_concurrent=args.max_concurrent,
          max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens, docs=args.docs,
          compile=args.compile)


def cmd_data(args) -> None:
    from exocortex.data.hub import download

    if args.data_cmd != "download":
        raise ExocortexError("usage: exocortex data download --dataset <owner/name> [--include GLOB] [--shards N]")
    download(args.dataset, shards=args.shards, include=args.include, revision=args.revision,
             cache_dir=args.cache_dir, workers=args.workers, verify=args.verify)


def _data_parser(sub) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exocortex", description="Own your LLM end to end.")
    sub = p.add_subparsers(dest="stage", metavar="<stage>")
    helps = {"tokenizer": "train the BPE tokenizer on the corpus and tokenize it",
             "pretrain": "pretrain the base model",
             "midtrain": "teach the chat format, tools, multiple choice and spelling on a broad task mixture",
             "sft": "supervised finetuning on a targeted task mixture",
             "rl": "reinforcement learning (GRPO) on a task's verifiable rewards, with a reward-hacking guard",
             "eval": "every stage: bits-per-byte, in-context (CORE-style) and held-out chat task accuracy",
             "chat": "talk to your model",
             "report": "write runs/<name>/report.md",
             "serve": "serve the chat model: OpenAI-compatible API (/v1) and a web chat page (/)",
             "export": "write a Hugging Face transformers (Qwen3) directory, or a GGUF file for llama.cpp / Ollama "
             "(--format gguf): weights, tokenizer, chat template", "speedrun": "every stage in order (tiny preset: ~15 min on a CPU)"}
    for name in STAGES:
        s = sub.add_parser(name, help=helps[name])
        s.add_argument("--run", "--run-name", dest="run", default=None,
                       help="run name (under --runs-dir) or path; default: the preset name (chat: the most recent "
                       "run). Under torchrun write --run-name: torchrun takes --run for its own --run-path")
        s.add_argument("--runs-dir", default="runs")
        s.add_argument("--preset", default="tiny", help="tiny (CPU) | d12 | d20 | d26")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set pretrain.time_minutes=3 (repeatable)")
        if name in ("tokenizer", "pretrain", "speedrun"):
            s.add_argument("--data", default=None, help="your own text: a file or directory of .txt/.md/.jsonl/"
                           ".parquet, or hf:<owner/name> for a dataset fetched with `exocortex data download`")
        if name in ("pretrain", "midtrain", "sft", "rl", "speedrun"):
            s.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        if name == "serve":
            s.add_argument("--host", default="127.0.0.1")
            s.add_argument("--port", type=int, default=8000)
            s.add_argument("--max-concurrent", type=int, default=16,
                           help="generations decoded together in one batch (default 16)")
            s.add_argument("--max-queue", type=int, default=64, help="requests waiting for a place (default 64)")
            s.add_argument("--compile", action="store_true",
                           help="compile the decode step (first requests wait for the compiler; on CPU the "
                                "one-row step is built ahead of time once per model shape and cached)")
            s.add_argument("--max-prompt-tokens", type=int, default=None)
        if name == "export":
            s.add_argument("--format", default="hf", choices=["hf", "gguf"],
                           help="hf: a transformers directory; gguf: one file for llama.cpp / Ollama")
            s.add_argument("--out", default=None, help="output directory (hf; default runs/<name>/hf) or .gguf "
                           "file (gguf; default runs/<name>/gguf/<name>-<dtype>.gguf)")
            s.add_argument("--stage", dest="from_stage", default=None, choices=["rl", "sft", "midtrain", "pretrain"],
                           help="which checkpoint to export (default: the newest of rl, sft, midtrain)")
            s.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                           help="weights: hf float32 (default) | bfloat16; gguf float16 (default) | float32 | "
                           "bfloat16")
            s.add_argument("--verify", action="store_true",
                           help="load the export (transformers / llama-cpp-python) and compare with exocortex")
        if name == "eval":
            s.add_argument("--stages", default=None, help="comma-separated subset of pretrain,midtrain,sft,rl")
        if name in ("chat", "serve"):
            s.add_argument("--docs", action="append", default=None, metavar="PATH",
                           help="your documents (file or directory, repeatable): the lookup tool searches them")
        if name == "chat":
            s.add_argument("--stage", dest="model_stage", default=None, choices=["rl", "sft", "midtrain"],
                           help="which model to talk to (default: the newest of rl, sft, midtrain)")
            s.add_argument("-p", "--prompt", default=None, help="one-shot: answer this prompt and exit")
            s.add_argument("--temperature", type=float, default=0.6)
            s.add_argument("--top-k", type=int, default=50)
            s.add_argument("--top-p", type=float, default=0.95)
            s.add_argument("--max-tokens", type=int, default=256)
            s.add_argument("--system", default=None, help="a system prompt")
            s.add_argument("--seed", type=int, default=None)
    _data_parser(sub)
    return p


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # the training loop saves a checkpoint on the way out


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.stage:
        parser.print_help()
        sys.exit(2)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        distributed.init_from_env()
        globals()[f"cmd_{args.stage}"](args)
        distributed.shutdown()
    except ExocortexError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except MemoryError:
        print("error: out of memory; use a smaller preset or --set pretrain.device_batch=<smaller>", file=sys.stderr)
        sys.exit(1)
