"""Preemption: SIGUSR1/SIGTERM set a flag; at the next step boundary all ranks agree, save and stop.

SLURM sends USR1 (``--signal=B:USR1@120``) before the time limit and torchrun forwards SIGTERM;
the handler only sets a flag, so the step in flight finishes. Ranks agree with one all-reduce
(any rank signalled → all stop), write a checkpoint, and the run exits with status 0 so the
requeued job resumes from it.
"""

from __future__ import annotations

import signal
from typing import Any

import torch

from trainer.callbacks import Callback, TrainerView
from trainer.distributed import all_reduce

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption(Callback):
    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def on_train_start(self, trainer: TrainerView) -> None:
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handler)

    def on_step_end(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        flag = all_reduce(torch.tensor([float(self.requested)], device=trainer.env.device))
        if flag.item() > 0:
            trainer.save_checkpoint()
            trainer.stop(f"preempted at step {trainer.step}, checkpoint saved", reason="preempted")

    def on_train_end(self, trainer: TrainerView) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
