"""How long a stage trains: a fixed number of steps, or as many as fit in a time budget (measured while it runs),
and the learning-rate schedule over those steps."""
from __future__ import annotations

from exocortex.config import TrainConfig
from exocortex.errors import ExocortexError
from exocortex.train import parallel

PROVISIONAL_STEPS = 10_000  # the schedule's length until a time budget has measured a step


class StepBudget:
    """`total` steps, or (total=None) as many as fit in `minutes`. A time budget times real steps after the first
    two (which include compilation), sets the total after five, then re-measures at 30% of its steps and again just
    before the warmdown (at most 55%), over everything counted in `elapsed` (evals, hooks, checkpoints), so a
    slower machine or a heavier eval is counted too; the second catches a machine that slows down as it runs (a
    pretraining that kept the 30% estimate ran 8% over). A new total that would move the warmdown's start to or before the current step is not taken:
    the learning rate never jumps. Re-measures happen at steps, not times, so every rank takes part in the same
    broadcast, and every rank takes rank 0's total."""

    def __init__(self, stage: str, total: int | None, minutes: float, warmdown_frac: float = 0.0):
        if total is None and not minutes:
            raise ExocortexError(f"{stage}: no budget; set max_steps, tokens_per_param, epochs or time_minutes")
        self.total = total
        self.seconds = minutes * 60 if total is None else None
        self.warmdown_frac = warmdown_frac
        self.retime_at = (0.3, min(0.55, 0.9 * (1 - warmdown_frac)))
        self._timed_steps, self._timed_seconds, self._retimes, self._first_two = 0, 0.0, 0, 0.0

    @property
    def schedule_total(self) -> int:
        return self.total or PROVISIONAL_STEPS

    def done(self, step: int) -> bool:
        return self.total is not None and step >= self.total

    def _constant(self, step: int, total: int) -> bool:
        """Whether `step` is before the warmdown of a `total`-step schedule."""
        return step < total - round(self.warmdown_frac * total)

    def measure(self, step: int, dt: float, elapsed: float) -> bool:
        """Account for step `step` (which took dt; `elapsed` so far); True when the total changed."""
        if self.seconds is None or step <= 2:
            if step == 2:
                self._first_two = elapsed
            return False
        self._timed_steps += 1
        self._timed_seconds += dt
        n = self._timed_steps
        if n == 5:
            self.total = parallel.broadcast_int(step + max(1, int((self.seconds - elapsed) / (self._timed_seconds / n))))
            return True
        if n > 5 and self._retimes < len(self.retime_at) and step >= self.retime_at[self._retimes] * self.total:
            self._retimes += 1
            per_step = (elapsed - self._first_two) / (step - 2)
            total = parallel.broadcast_int(step + max(1, int((self.seconds - elapsed) / per_step)))
            if total != self.total and self._constant(step, self.total) and self._constant(step, total):
                self.total = total
                return True
        return False


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
