"""The NaN/inf and loss-spike guard: skip a bad step, count it, stop after too many."""

from __future__ import annotations

import collections
import math

from common.errors import UserError

HISTORY = 50  # accepted losses the running mean is taken over
MIN_HISTORY = 10  # spikes are judged only once this many steps were accepted


class TrainingDiverged(UserError):
    """Too many skipped steps: the run stops with one line saying why."""


class LossGuard:
    def __init__(self, max_bad_steps: int, spike_factor: float) -> None:
        self.max_bad_steps = max_bad_steps
        self.spike_factor = spike_factor
        self.recent: collections.deque[float] = collections.deque(maxlen=HISTORY)
        self.bad_steps = 0

    def check(self, loss: float, count: int) -> str | None:
        """Why the step with this (global) loss must be skipped, or None to apply it."""
        if count == 0:
            return "no target tokens in the global batch"
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if self.spike_factor and len(self.recent) >= MIN_HISTORY:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                return f"loss spike: {loss:.4g} > {self.spike_factor} × running mean {mean:.4g}"
        return None

    def record(self, step: int, loss: float, reason: str | None) -> None:
        """Count the outcome of ``step``; raise TrainingDiverged once too many were skipped."""
        if reason is None:
            self.recent.append(loss)
            return
        self.bad_steps += 1
        if self.bad_steps > self.max_bad_steps:
            raise TrainingDiverged(
                f"stopped at step {step}: {self.bad_steps} steps skipped (last: {reason}), more than "
                f"train.max_bad_steps={self.max_bad_steps}; lower train.lr or check the data"
            )

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "bad_steps": self.bad_steps}

    def load_state_dict(self, state: dict) -> None:
        self.recent.extend(state["recent"])
        self.bad_steps = state["bad_steps"]
