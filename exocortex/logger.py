"""Training metrics to TensorBoard and/or Weights & Biases, beside logs/<stage>.jsonl (which is always written).

Both are optional packages: `logging.tensorboard=auto` uses TensorBoard when it is installed; asking for
one that is not installed (`logging.tensorboard=on`, `logging.wandb_project=...` or WANDB_PROJECT) is a
one-line error before training starts. Only rank 0 logs.

    tensorboard --logdir runs/<name>/tensorboard     # one TensorBoard run per stage
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from exocortex import distributed
from exocortex.config import ExocortexError, LoggingConfig


class MetricsLogger:
    """log(stage, record) sends every numeric field of a training record (loss, val_loss, lr_mult, tok_per_s,
    mfu, ...) as `<stage>/<field>` at the record's step."""

    def __init__(self, writers: list | None = None, wandb_run=None):
        self.writers = writers or []  # objects with add_scalar(tag, value, step) and flush()/close()
        self.wandb = wandb_run

    @classmethod
    def from_config(cls, c: LoggingConfig, run_dir: Path, run_name: str, stage: str,
                    config: dict | None = None) -> "MetricsLogger":
        """One logger per stage: TensorBoard run `tensorboard/<stage>`, wandb run `<name>-<stage>` grouped
        under the run's name (each stage counts its steps from 1)."""
        mode = c.tensorboard.lower()
        if mode not in ("auto", "on", "off"):
            raise ExocortexError(f"logging.tensorboard={c.tensorboard}: expected auto, on or off")
        project = c.wandb_project or os.environ.get("WANDB_PROJECT", "")
        have_tb = importlib.util.find_spec("tensorboard") is not None
        if mode == "on" and not have_tb:
            raise ExocortexError("logging.tensorboard=on but the tensorboard package is not installed; "
                                 "`pip install tensorboard` or --set logging.tensorboard=off")
        if project and importlib.util.find_spec("wandb") is None:
            raise ExocortexError(f"wandb logging was asked for (project '{project}') but wandb is not installed; "
                                 "`pip install wandb`, or unset WANDB_PROJECT / logging.wandb_project")
        if not distributed.is_main():
            return cls()
        writers, run = [], None
        if have_tb and mode != "off":
            from torch.utils.tensorboard import SummaryWriter
            writers.append(SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard" / stage)))
        if project:
            import wandb
            name = c.wandb_run or run_name
            run = wandb.init(project=project, name=f"{name}-{stage}", group=name, config=config)
        return cls(writers, run)

    def log(self, stage: str, record: dict) -> None:
        if not self.writers and self.wandb is None:
            return
        step = record["step"]
        scalars = {f"{stage}/{k}": float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for w in self.writers:
            for tag, v in scalars.items():
                w.add_scalar(tag, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.wandb is not None:
            self.wandb.finish()
