"""Where a training stage's per-step records go: logs/<stage>.jsonl (always), TensorBoard and Weights & Biases
(optional packages), and the terminal (a progress bar, or a plain line every ~20 s in logs and CI).

`logging.tensorboard=auto` uses TensorBoard when it is installed; asking for one that is not installed
(`logging.tensorboard=on`, `logging.wandb_project=...` or WANDB_PROJECT) is a one-line error before training
starts. Only rank 0 writes.

    tensorboard --logdir runs/<name>/tensorboard     # one TensorBoard run per stage
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from exocortex.config import LoggingConfig
from exocortex.errors import ExocortexError
from exocortex.fileio import atomic_write_text
from exocortex.run import RunDir
from exocortex.train import parallel


class MetricsSink:
    """log(record) appends a training record to the stage's jsonl and sends every numeric field (loss,
    val_loss, lr_mult, tok_per_s, mfu, reward, ...) to the writers as `<stage>/<field>` at the record's step."""

    def __init__(self, stage: str, jsonl: Path | None = None, writers: list | None = None, wandb_run=None):
        self.stage = stage
        self.jsonl = Path(jsonl) if jsonl and parallel.is_main() else None  # rank 0 writes
        if self.jsonl is not None:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        self.writers = writers or []  # objects with add_scalar(tag, value, step) and close()
        self.wandb = wandb_run

    @classmethod
    def from_config(cls, c: LoggingConfig, run_dir: Path, run_name: str, stage: str,
                    config: dict | None = None) -> "MetricsSink":
        """The stage's sink: logs/<stage>.jsonl, TensorBoard run `tensorboard/<stage>`, wandb run
        `<name>-<stage>` grouped under the run's name (each stage counts its steps from 1)."""
        project = c.wandb_project or os.environ.get("WANDB_PROJECT", "")
        have_tb = importlib.util.find_spec("tensorboard") is not None
        if c.tensorboard == "on" and not have_tb:
            raise ExocortexError("logging.tensorboard=on but the tensorboard package is not installed; "
                                 "`pip install tensorboard` or --set logging.tensorboard=off")
        if project and importlib.util.find_spec("wandb") is None:
            raise ExocortexError(f"wandb logging was asked for (project '{project}') but wandb is not installed; "
                                 "`pip install wandb`, or unset WANDB_PROJECT / logging.wandb_project")
        jsonl = RunDir(run_dir).log_path(stage)
        if not parallel.is_main():
            return cls(stage)
        writers, run = [], None
        if have_tb and c.tensorboard != "off":
            from torch.utils.tensorboard import SummaryWriter
            writers.append(SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard" / stage)))
        if project:
            import wandb
            name = c.wandb_run or run_name
            run = wandb.init(project=project, name=f"{name}-{stage}", group=name, config=config)
        return cls(stage, jsonl, writers, run)

    def start(self, history: list[dict]) -> None:
        """Begin the jsonl with the records a resumed run already has (a fresh run: empty)."""
        if self.jsonl is not None:
            atomic_write_text(self.jsonl, "".join(json.dumps(h) + "\n" for h in history))

    def log(self, record: dict) -> None:
        if self.jsonl is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")
        if not self.writers and self.wandb is None:
            return
        step = record["step"]
        scalars = {f"{self.stage}/{k}": float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for w in self.writers:
            for tag, v in scalars.items():
                w.add_scalar(tag, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.writers:
            self.writers = []
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class Progress:
    """A tqdm bar on a terminal; elsewhere (logs, CI) a plain line every ~20 s and at the last step."""

    def __init__(self, stage: str, total: int | None, initial: int):
        self.stage, self.total = stage, total
        self.interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=stage, unit="step", dynamic_ncols=True,
                        disable=not (self.interactive and parallel.is_main()))
        self.last_print = time.time()
        self.last_val: float | None = None

    def set_total(self, total: int) -> None:
        self.total = self.bar.total = total
        self.bar.refresh()

    def update(self, record: dict, last: bool) -> None:
        step, loss, elapsed = record["step"], record["loss"], record["elapsed"]
        self.last_val = record.get("val_loss", self.last_val)
        val = f" val {self.last_val:.3f}" if self.last_val is not None else ""
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tok_per_s']:,.0f}",
                             **({"val": f"{self.last_val:.3f}"} if self.last_val is not None else {}))
        self.bar.update(1)
        if parallel.is_main() and not self.interactive and (time.time() - self.last_print > 20 or last):
            self.last_print = time.time()
            eta = f"{(self.total - step) * elapsed / max(1, step) / 60:.1f} min" if self.total else "?"
            print(f"{self.stage}: step {step}/{self.total or '?'} loss {loss:.3f}{val} | "
                  f"{record['tok_per_s']:,.0f} tok/s | {elapsed / 60:.1f} min, ETA {eta}", flush=True)

    def close(self) -> None:
        self.bar.close()
