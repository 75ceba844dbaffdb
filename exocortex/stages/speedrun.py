"""`exocortex speedrun`: every stage the registry marks for it, in order (tokenizer → pretrain → midtrain → sft →
rl → eval → report), in one process; the time and peak memory of each go to the report."""
from __future__ import annotations

import time

from exocortex import registry
from exocortex.config import RunConfig, check_budget
from exocortex.data.tokens import has_token_data
from exocortex.device import release_freed_memory, resolve_device
from exocortex.memory import peak_rss_mb, reset_peak_rss
from exocortex.run import SpeedrunSummary


def run_speedrun(cfg: RunConfig, resume: bool = False, force: bool = False) -> SpeedrunSummary:
    """With resume (the CLI then passes the run's saved config), a run that has its tokens keeps them and
    pretraining continues from its latest checkpoint; the stages after it start fresh from its result, since
    their old checkpoints (if any) grew from another base model. A run with trained models is started over
    only with `force`, which re-trains the tokenizer too: the corpus files may have changed under the same path,
    and the tokenizer stage keeps the old models whenever the new tokenizer comes out byte for byte the same."""
    if not resume and not force:
        cfg.run.refuse_to_replace(instead="--resume to continue it, --force to start it over, or --run <new name> "
                                  "for a new run")
    stages = [s for s in registry.STAGES if s.speedrun]
    for stage in stages:  # what each stage would refuse when it starts, found before the first one runs
        check_budget(cfg, stage.name)
    resolve_device(cfg.device)
    t_start = time.time()
    summary = SpeedrunSummary()
    first_trained = next(s.name for s in registry.STAGES if s.speedrun and "resume" in s.options)
    for stage in stages:
        if resume and stage.name == "tokenizer" and has_token_data(cfg.run.data_dir):
            continue
        print(f"\n=== {stage.name} ===")
        # what the last stage freed goes back to the OS, so each stage's peak is its own (device.py, memory.py)
        release_freed_memory()
        reset_peak_rss()
        t0 = time.time()
        options = {"resume": resume and stage.name == first_trained} if "resume" in stage.options else {}
        if "force" in stage.options:  # the later stages are meant to start over; the tokenizer only when asked
            options["force"] = force or stage.name != "tokenizer"
        stage.load()(cfg, **options)
        summary.stage_seconds[stage.name] = time.time() - t0
        summary.stage_peak_rss_mb[stage.name] = round(peak_rss_mb(), 1)
        # written as it goes, so the report (the last stage) shows every stage before it
        summary.total_seconds = time.time() - t_start
        summary.peak_rss_mb = max(summary.peak_rss_mb, summary.stage_peak_rss_mb[stage.name])
        cfg.run.write_summary("speedrun", summary)
    print(f"\nspeedrun done in {(time.time() - t_start) / 60:.1f} min. Report: {cfg.run_dir / 'report.md'}\n"
          f"Chat with your model: exocortex chat --run {cfg.run_dir}")
    return summary
