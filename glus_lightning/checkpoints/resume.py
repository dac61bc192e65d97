"""What makes a resumed run continue exactly as an uninterrupted one: when checkpoints are written, data position
and randomness.

Data position and randomness are functions of the loop position that Lightning saves and restores (epoch, batch
index) and of the training loader's own position (``EpochLoader.state_dict``: pass, batches handed out), not of
state that happens to be in memory when a checkpoint is written: Lightning restores a checkpoint written at the
end-of-epoch validation as an unfinished epoch that it starts again (and ends at once), which creates a data
iterator more than the uninterrupted run did; counters and global generators would drift by that.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn

LAST = "last.ckpt"


class LastCheckpoint(Checkpoint):
    """``last.ckpt`` (the file ``ckpt_path=last`` resumes): every ``every_n_steps`` optimiser steps, after every
    validation and at the end of training, each write replacing the previous one atomically (AtomicCheckpointIO).

    A step that validates is written after its validation, not at its batch end: Lightning restores a batch-end
    checkpoint as "validation not run yet" and skips that validation (its keyframe refit and best checkpoint with
    it), while one written after the validation resumes with the next batch. Only the micro-batch that stepped the
    optimiser is saved: the gradients of an unfinished accumulation cycle are not in a checkpoint. As a ``Checkpoint``
    it runs after the other callbacks (Lightning orders them so), e.g. after the final keyframe refit.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int, validates: Callable[[int], bool]) -> None:
        self.path = Path(dirpath) / LAST
        self.every_n_steps = every_n_steps
        self.validates = validates
        self.last_model_path = ""
        self._saved_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_step = trainer.global_step  # 0, or the step of the checkpoint this run resumed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and not (trainer.enable_validation and self.validates(step)):
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self._saved_step:  # once per step: later micro-batches of the step are past it
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # a full checkpoint: it resumes training
        self._saved_step = trainer.global_step
        self.last_model_path = str(self.path)


class ValidateLastStep(L.Callback):
    """A validation at ``max_steps`` also when it is off the cadence, inside fit, where the best-checkpoint choice sees
    it (after fit, ``trainer.validate`` cannot make the final model the best checkpoint). Lightning validates at once
    when a callback asks the fit loop to stop; ``min_epochs=0`` (``runner.trainer_arguments``) lets it stop in the
    first epoch too."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class DataEpochFromLoop(L.Callback):
    """The training stream's pass number (``RefVOSDataModule`` state ``{"epoch"}``) = Lightning's epoch."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.datamodule is not None:  # set before the epoch's loader is iterated
            trainer.datamodule.load_state_dict({"epoch": trainer.current_epoch})


class StepSeed(L.Callback):
    """Seeds torch (CPU, CUDA), NumPy and Python before each training batch from (seed, rank, epoch, batch):
    paraphrase draws and dropout of a batch are the same whether or not the run was interrupted before it."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        step_seed = int(np.random.SeedSequence([self.seed, trainer.global_rank, trainer.current_epoch, batch_idx]).generate_state(1)[0])
        torch.manual_seed(step_seed)
        np.random.seed(step_seed)
        random.seed(step_seed)
