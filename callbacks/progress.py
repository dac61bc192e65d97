"""Training progress counted in optimiser steps: a progress bar on a terminal, plain-text lines in log files."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only

PROGRESS_FILE = "progress.log"


def planned_steps(trainer: L.Trainer) -> int | None:
    """The optimiser steps the run will take (``max_steps``, else epochs x steps per epoch), None when unbounded."""
    if trainer.max_steps > 0:
        return trainer.max_steps
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.num_training_batches != float("inf"):
        return int(trainer.max_epochs * trainer.num_training_batches // trainer.accumulate_grad_batches)
    return None


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar, counting optimiser steps of the whole run (its own counts micro-batches of an epoch against
    the remaining optimiser steps: "40/4" with accumulation 10)."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.total = planned_steps(trainer)
        self.train_progress_bar.n = self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.set_description("steps")
        self.train_progress_bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable and trainer.global_step != bar.n:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))


class TextProgress(L.Callback):
    """Every ``every_n_steps`` optimiser steps a line "step, loss, steps/s, ETA", and one per validation, appended to
    ``log_file`` and, with ``echo`` (stdout is not a terminal: CI logs, nohup, SLURM), printed. Rank 0 only."""

    def __init__(self, every_n_steps: int, log_file: Path, echo: bool) -> None:
        self.every_n_steps = every_n_steps
        self.log_file = Path(log_file)
        self.echo = echo
        self._start: tuple[float, int] = (time.monotonic(), 0)
        self._last = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = (time.monotonic(), trainer.global_step)
        self._last = trainer.global_step
        self.write(f"training from step {trainer.global_step} to {planned_steps(trainer) or 'the end'}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step, total = trainer.global_step, planned_steps(trainer)
        if step == self._last or (step % self.every_n_steps and step != total):
            return
        self._last = step
        started, first = self._start
        rate = (step - first) / max(time.monotonic() - started, 1e-9)
        eta = f"ETA {format_seconds((total - step) / rate)}" if total and rate > 0 else "ETA ?"
        loss = trainer.callback_metrics.get("train/loss")
        loss_text = f"loss {float(loss):.4f}" if loss is not None else "loss ?"
        self.write(f"step {step}/{total or '?'}  {loss_text}  {rate:.3f} steps/s  {eta}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        scores = {k: float(v) for k in ("val/J&F", "val/J", "val/F") if (v := trainer.callback_metrics.get(k)) is not None}
        text = "  ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in scores.items()) or "no score"
        self.write(f"validation at step {trainer.global_step}: {text}")

    @rank_zero_only
    def write(self, text: str, echo: bool | None = None) -> None:
        """``text`` with the time, appended to the log file and printed when ``echo`` (default: the callback's)."""
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {text}"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("a") as f:
            f.write(line + "\n")
        if self.echo if echo is None else echo:
            print(line, flush=True)


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
