"""Stage `eval`: every stage's model, measured the same way (the report's BASE / MID / SFT / RL table): val
bits-per-byte, in-context (CORE-style) accuracy, and for chat models held-out task accuracy with tools on
(lookup also with its tool off) and pass@k on word problems (exocortex/evals.py); and whether anything
collapsed (data/collapse.py): the variety of every dataset the run trained on and of each stage's samples, and
how many different replies a stage gives to the same prompt asked ten times at temperature 1. Every graded
reply is kept in logs/eval_replies.jsonl (question, reply, expected, right, phrasing family), to read what a
stage gets wrong."""
from __future__ import annotations

import json
import random
import time

from exocortex import registry
from exocortex.checkpoint import load_model
from exocortex.config import RunConfig
from exocortex.data.collapse import ask_ten_times, collapse_alarms, collapse_metrics, conversation_text
from exocortex.data.loader import val_batches
from exocortex.data.tokens import read_split
from exocortex.device import resolve_device, resolve_dtype
from exocortex.errors import ExocortexError
from exocortex.fileio import atomic_write_text, read_jsonl
from exocortex.evals import bits_per_byte, chat_scores, core_scores
from exocortex.infer.decode import warm_up_note
from exocortex.infer.engine import Engine, decode_compile
from exocortex.infer.lookup import tools_for_run
from exocortex.run import EvalSummary
from exocortex.tasks import mixture_conversations, task_set
from exocortex.tasks.base import prompt_ids
from exocortex.tasks.core import load_core_bundle, world_incontext_tasks
from exocortex.data.world import World
from exocortex.tokenizer import Tokenizer


REPLIES_FILE = "eval_replies.jsonl"


def run_eval(cfg: RunConfig, stages: list[str] | None = None) -> EvalSummary:
    """Evaluate `stages` (default: every model stage the run has); results of other stages are kept."""
    bad = [s for s in stages or [] if s not in registry.MODEL_STAGES]
    if bad:
        raise ExocortexError(f"--stages: unknown stage {bad[0]!r} (choose from {', '.join(registry.MODEL_STAGES)})")
    t0 = time.time()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.pretrain.dtype, device)
    tok = Tokenizer.load(cfg.run.tokenizer_dir)
    present = [s for s in (stages or registry.MODEL_STAGES) if cfg.run.latest_checkpoint(s) is not None]
    if not present:
        raise ExocortexError(f"{cfg.run_dir} has no checkpoints to evaluate; run `exocortex pretrain --run {cfg.name}` first")
    incontext = world_incontext_tasks(World(seed=cfg.data.world_seed), cfg.eval.core_n, cfg.eval.seed)
    if cfg.eval.core_bundle:
        incontext.update(load_core_bundle(cfg.eval.core_bundle, max_items=cfg.eval.core_n))
    tasks, tools = task_set(cfg), tools_for_run(cfg)
    previous = cfg.run.summary("eval") or EvalSummary()
    results = EvalSummary(stages={s: v for s, v in previous.stages.items() if s not in present},
                          samples=[s for s in previous.samples if s.get("stage") not in present],
                          collapse={k: v for k, v in previous.collapse.items() if v.get("stage") not in present},
                          calibration={s: v for s, v in previous.calibration.items() if s not in present},
                          families={s: v for s, v in previous.families.items() if s not in present})
    results.collapse.update(dataset_collapse(cfg, tok, tasks))
    e = cfg.eval  # at most this many new tokens per chat stage: each task's questions, held-out families, pass@k
    chat_stages = [s for s in present if registry.BY_NAME[s].chat]
    asked = sum(int(n) for n in e.chat_tasks.values()) * (1 if e.heldout_n == 0 else 2) + e.pass_k * e.pass_k_n
    compiled, note = decode_compile(e.compile, device, asked * e.max_new_tokens * len(chat_stages))
    if note:
        print(f"eval: {note}", flush=True)
    if compiled:
        print(f"eval: {warm_up_note(device, '--set eval.compile=off skips it', dtype)}", flush=True)
    # every graded reply, one JSON line each (logs/eval_replies.jsonl): the stages not measured now keep theirs
    transcript = [r for r in read_jsonl(cfg.run.logs_dir / REPLIES_FILE) if r.get("stage") not in present]
    for stage in present:
        ts = time.time()
        model, _ = load_model(cfg.run.latest_checkpoint(stage), device)
        val = val_batches(cfg, model.cfg.seq_len, cfg.pretrain.device_batch, cfg.pretrain.eval_tokens * 4)
        r = {"val_bpb": bits_per_byte(model, tok, val, device, dtype)}
        r.update(core_scores(model, tok, incontext, device, dtype))
        engine = Engine(model, tok, device, dtype, tools=tools, compile=compiled)
        engine.warm_up()
        compiled = engine.compile  # False from now on if it could not be built
        if registry.BY_NAME[stage].chat:
            kept = results.calibration[stage] = {}
            r.update(chat_scores(engine, tok, tasks, cfg.eval, results.samples, stage, kept,
                                 families=results.families.setdefault(stage, {}), transcript=transcript))
        row = sample_collapse(cfg, engine, tok, tasks, stage)
        if row:
            results.collapse[f"samples: {stage}"] = row
        r["seconds"] = time.time() - ts
        results.stages[stage] = r
        shown = ", ".join(f"{k.replace('_accuracy', '')} {v:.1%}" if "accuracy" in k or "@" in k else f"{k} {v:.3f}"
                          for k, v in r.items() if k != "seconds" and not k.endswith("_n"))
        print(f"eval {registry.LABELS[stage]}: {shown} ({r['seconds']:.0f}s)")
    results.seconds = time.time() - t0
    cfg.run.logs_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.run.logs_dir / REPLIES_FILE, "".join(json.dumps(r) + "\n" for r in transcript))
    cfg.run.write_summary("eval", results)
    return results


# ----------------------------------------------------------------------------- collapse (data/collapse.py)
DATASET_TEXTS = 2000    # texts measured per dataset (pretraining documents, conversations, RL prompts)
SAMPLE_PROMPTS = 32     # prompts answered once each (T=1): the stage's sampled replies
ASK_PROMPTS = 4         # of those, asked ten times each (T=1)
SAMPLE_TOKENS = 48      # new tokens per sample: enough to tell replies apart, cheap on a CPU


def _collapse_row(texts: list[str], **extra) -> dict:
    m = collapse_metrics(texts)
    return {**extra, **m, "alarms": collapse_alarms(m)}


def _report_alarms(name: str, row: dict) -> None:
    for a in row["alarms"]:
        print(f"eval: collapse alarm: {name}: {a}")


def pretrain_documents(cfg: RunConfig, tok: Tokenizer, n: int) -> list[str]:
    """n documents spread evenly over the run's pretraining split, decoded from its token files: the text
    pretraining saw (after deduplication), for the world and user corpora alike."""
    split = read_split(cfg.run.data_dir, "train", tok.bos_id)
    starts = split.starts.tolist()
    ends = starts[1:] + [len(split.tokens)]
    picks = sorted({int(i * len(starts) / n) for i in range(min(n, len(starts)))})
    return [tok.decode(split.tokens[starts[i] + 1:ends[i]].tolist()) for i in picks]


def dataset_collapse(cfg: RunConfig, tok: Tokenizer, tasks) -> dict:
    """Collapse metrics of each dataset the run trained on (the stages that have a checkpoint): a sample of the
    pretraining documents, the first conversations of the midtrain and sft mixtures (user and assistant text,
    as each stage draws them), and RL prompts (user text)."""
    t0 = time.time()
    rows = {}
    trained = {s for s in registry.MODEL_STAGES if cfg.run.latest_checkpoint(s) is not None}
    if "pretrain" in trained:
        rows["data: pretrain"] = _collapse_row(pretrain_documents(cfg, tok, DATASET_TEXTS), stage="pretrain")
    for stage, data in (("midtrain", cfg.midtrain_data), ("sft", cfg.sft_data)):
        if stage in trained:
            convs = mixture_conversations(tasks, data.mixture, min(DATASET_TEXTS, data.n_conversations), data.seed)
            rows[f"data: {stage}"] = _collapse_row([conversation_text(c) for c in convs], stage=stage)
    if "rl" in trained:
        rng = random.Random(f"rl-{cfg.rl.seed}-0")
        prompts = [tasks[cfg.rl.task].example(rng, "train")["messages"][:-1] for _ in range(DATASET_TEXTS // 2)]
        rows["data: rl"] = _collapse_row([conversation_text({"messages": m}, ("user",)) for m in prompts], stage="rl")
    print(f"eval: collapse metrics of {len(rows)} datasets ({', '.join(rows)}) in {time.time() - t0:.1f}s")
    for name, row in rows.items():
        _report_alarms(name, row)
    return rows


def sample_collapse(cfg: RunConfig, engine: Engine, tok: Tokenizer, tasks, stage: str) -> dict:
    """A stage's own samples: one reply (T=1) to each of SAMPLE_PROMPTS held-out prompts (chat stages: the eval's
    tasks in turn; base: the openings of val documents), their collapse metrics, and ask_ten_times on the first
    ASK_PROMPTS of them."""
    t0 = time.time()
    if registry.BY_NAME[stage].chat:
        per_task = -(-SAMPLE_PROMPTS // len(cfg.eval.chat_tasks))
        lists = [tasks[name].examples(per_task, cfg.eval.seed + 7, "test") for name in cfg.eval.chat_tasks]
        examples = [ex for i in range(per_task) for exs in lists if i < len(exs) for ex in (exs[i],)]
        prompts = [prompt_ids(tok, ex) for ex in examples[:SAMPLE_PROMPTS]]
    else:
        val = read_split(cfg.run.data_dir, "val", tok.bos_id)
        bounds = [*val.starts.tolist(), len(val.tokens)]
        # <|bos|> and up to 7 of the document's first tokens
        prompts = [val.tokens[a:min(a + 8, b)].tolist() for a, b in zip(bounds[:SAMPLE_PROMPTS], bounds[1:])]
    room = engine.model.rope_cos.shape[0] - SAMPLE_TOKENS  # a prompt must leave room for its reply
    prompts = [p for p in prompts if len(p) <= room]
    if not prompts:
        print(f"eval {registry.LABELS[stage]}: no sample prompt fits the model's context; no sample collapse metrics")
        return {}
    replies = engine.complete_many(prompts, max_tokens=SAMPLE_TOKENS, temperature=1.0, seed=cfg.eval.seed)
    row = _collapse_row([engine.render(o) for o in replies], stage=stage)
    row["ask_ten_times"] = ask_ten_times(engine, tok, prompts[:ASK_PROMPTS], n=10, temperature=1.0,
                                         max_new_tokens=SAMPLE_TOKENS, seed=cfg.eval.seed)
    row["seconds"] = round(time.time() - t0, 2)
    a = row["ask_ten_times"]
    print(f"eval {registry.LABELS[stage]}: samples distinct-2 {row['distinct_2']:.2f}, self-BLEU "
          f"{row['self_bleu']:.2f}; asked ten times: {a['distinct_mean']:.1f} different replies on average "
          f"(fewest {a['distinct_min']}) ({row['seconds']:.0f}s)")
    _report_alarms(f"samples: {stage}", row)
    return row
