"""How long a stage trains: a fixed number of steps, or as many as fit in a time budget (measured while it runs),
and the learning-rate schedule over those steps."""
from __future__ import annotations

from exocortex.config import TrainConfig
from exocortex.errors import ExocortexError
from exocortex.train import parallel

PROVISIONAL_STEPS = 10_000  # the schedule's length until a time budget has measured a step


class StepBudget:
    """`total` steps, or (total=None) as many as fit in `minutes`. A time budget times real steps after the first
    two (which include compilation), sets the total after five, then re-measures once at 30% of the budget,
    still in the constant-LR phase, over everything counted in `elapsed` (evals, hooks, checkpoints), so a
    slower machine or a heavier eval is counted too. Every rank takes rank 0's total."""

    def __init__(self, stage: str, total: int | None, minutes: float):
        if total is None and not minutes:
            raise ExocortexError(f"{stage}: no budget; set max_steps, tokens_per_param, epochs or time_minutes")
        self.total = total
        self.seconds = minutes * 60 if total is None else None
        self._timed_steps, self._timed_seconds, self._retimed, self._first_two = 0, 0.0, False, 0.0

    @property
    def schedule_total(self) -> int:
        return self.total or PROVISIONAL_STEPS

    def done(self, step: int) -> bool:
        return self.total is not None and step >= self.total

    def measure(self, step: int, dt: float, elapsed: float) -> bool:
        """Account for step `step` (which took dt; `elapsed` so far); True when the total changed."""
        changed = False
        if self.seconds is not None and step > 2:
            self._timed_steps += 1
            self._timed_seconds += dt
            n = self._timed_steps
            if n == 5 or (n > 5 and not self._retimed and elapsed > 0.3 * self.seconds):
                self._retimed = n > 5
                per_step = (elapsed - self._first_two) / (step - 2) if self._retimed else self._timed_seconds / n
                self.total = parallel.broadcast_int(step + max(1, int((self.seconds - elapsed) / per_step)))
                changed = True
        if step == 2:
            self._first_two = elapsed
        return changed


def lr_multiplier(step: int, total: int, t: TrainConfig) -> float:
    """Linear warmup, constant, linear warmdown to final_lr_frac."""
    warmup = max(1, round(t.warmup_frac * total)) if t.warmup_frac > 0 else 0
    warmdown = round(t.warmdown_frac * total)
    if step < warmup:
        return (step + 1) / warmup
    if warmdown > 0 and step >= total - warmdown:
        frac = (total - step) / warmdown
        return frac + (1 - frac) * t.final_lr_frac
    return 1.0
