"""Stage `eval`: every stage's model, measured the same way (the report's BASE / MID / SFT / RL table): val
bits-per-byte, in-context (CORE-style) accuracy, and for chat models held-out task accuracy with tools on
(lookup also with its tool off) and pass@k on word problems (exocortex/evals.py)."""
from __future__ import annotations

import time

from exocortex import registry
from exocortex.checkpoint import load_model
from exocortex.config import RunConfig
from exocortex.data.loader import val_batches
from exocortex.device import resolve_device, resolve_dtype
from exocortex.errors import ExocortexError
from exocortex.evals import bits_per_byte, chat_scores, core_scores
from exocortex.infer.engine import Engine
from exocortex.infer.lookup import tools_for_run
from exocortex.run import EvalSummary
from exocortex.tasks import task_set
from exocortex.tasks.core import load_core_bundle, world_incontext_tasks
from exocortex.data.world import World
from exocortex.tokenizer import Tokenizer


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
                          samples=[s for s in previous.samples if s.get("stage") not in present])
    for stage in present:
        ts = time.time()
        model, _ = load_model(cfg.run.latest_checkpoint(stage), device)
        val = val_batches(cfg, model.cfg.seq_len, cfg.pretrain.device_batch, cfg.pretrain.eval_tokens * 4)
        r = {"val_bpb": bits_per_byte(model, tok, val, device, dtype)}
        r.update(core_scores(model, tok, incontext, device, dtype))
        if registry.BY_NAME[stage].chat:
            engine = Engine(model, tok, device, dtype, tools=tools)
            r.update(chat_scores(engine, tok, tasks, cfg.eval, results.samples, stage))
        r["seconds"] = time.time() - ts
        results.stages[stage] = r
        shown = ", ".join(f"{k.replace('_accuracy', '')} {v:.1%}" if "accuracy" in k or "@" in k else f"{k} {v:.3f}"
                          for k, v in r.items() if k != "seconds" and not k.endswith("_n"))
        print(f"eval {registry.LABELS[stage]}: {shown} ({r['seconds']:.0f}s)")
    results.seconds = time.time() - t0
    cfg.run.write_summary("eval", results)
    return results
