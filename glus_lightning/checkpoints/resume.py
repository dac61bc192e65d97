"""What makes a resumed run continue exactly as an uninterrupted one: data position and randomness.

Both are made functions of the loop position that Lightning saves and restores (epoch, batch index), not of
state that happens to be in memory when a checkpoint is written: Lightning restores a checkpoint written at
the end-of-epoch validation as an unfinished epoch that it starts again (and ends at once), which creates a
data iterator more than the uninterrupted run did; counters and global generators would drift by that.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


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
