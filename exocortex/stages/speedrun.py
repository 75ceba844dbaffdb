"""`exocortex speedrun`: every stage the registry marks for it, in order (tokenizer → pretrain → midtrain → sft →
rl → eval → report), in one process; the time of each goes to the report."""
from __future__ import annotations

import resource
import time

from exocortex import registry
from exocortex.config import RunConfig, load_config
from exocortex.data.tokens import has_token_data
from exocortex.run import SpeedrunSummary


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_speedrun(cfg: RunConfig, resume: bool = False, overrides: list[str] | None = None) -> SpeedrunSummary:
    """With resume, a run that has its tokens keeps them (and its config, plus `overrides`) and its training
    stages continue from their latest checkpoints."""
    if cfg.run_dir.exists() and any(cfg.run_dir.iterdir()) and not resume:
        print(f"speedrun: {cfg.run_dir} exists; its stages will be overwritten (use --run to pick another name)")
    t_start = time.time()
    summary = SpeedrunSummary()
    for stage in (s for s in registry.STAGES if s.speedrun):
        if resume and stage.name == "tokenizer" and has_token_data(cfg.run.data_dir):
            cfg = load_config(cfg.run_dir, overrides)
            continue
        print(f"\n=== {stage.name} ===")
        t0 = time.time()
        stage.load()(cfg, **({"resume": resume} if "resume" in stage.options else {}))
        summary.stage_seconds[stage.name] = time.time() - t0
        # written as it goes, so the report (the last stage) shows every stage before it
        summary.total_seconds, summary.peak_rss_mb = time.time() - t_start, peak_rss_mb()
        cfg.run.write_summary("speedrun", summary)
    print(f"\nspeedrun done in {(time.time() - t_start) / 60:.1f} min. Report: {cfg.run_dir / 'report.md'}\n"
          f"Chat with your model: exocortex chat --run {cfg.run_dir}")
    return summary
