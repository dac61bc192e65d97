"""Progress in optimiser steps: the bar counts steps (not micro-batches), the text lines land in progress.log."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks.progress import StepProgressBar, TextProgress, format_seconds


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/J&F", 0.25)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    x = torch.randn(40, 2)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=2)


def run(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=6, accumulate_grad_batches=3, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path, **kwargs)
    trainer.fit(Regression(), train_dataloaders=loader(), val_dataloaders=loader())
    return trainer


def test_the_bar_counts_optimiser_steps_of_the_run(tmp_path: Path) -> None:
    bar = StepProgressBar()
    trainer = run(tmp_path, [bar], limit_val_batches=0)
    assert trainer.global_step == 6  # 18 micro-batches
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (6, 6)


def test_text_lines_every_n_steps_with_loss_rate_eta_and_validation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "run" / "progress.log"
    run(tmp_path, [TextProgress(4, log, echo=True)], enable_progress_bar=False, val_check_interval=12,
        check_val_every_n_epoch=None, limit_val_batches=1)
    lines = log.read_text().splitlines()
    assert capsys.readouterr().out.splitlines()[-len(lines):] == lines  # echoed as written
    texts = [line.split("  ", 1)[1] for line in lines]
    assert texts[0] == "training from step 0 to 6"
    steps = [int(m.group(1)) for t in texts if (m := re.match(r"step (\d+)/6  loss \d+\.\d{4}  \d+\.\d{3} steps/s  ETA ", t))]
    assert steps == [4, 6]  # every 4 optimiser steps, and the last
    assert "validation at step 4: J&F 0.2500" in texts  # after the 12th micro-batch = 4th step


def test_format_seconds() -> None:
    assert (format_seconds(59), format_seconds(61), format_seconds(3 * 3600 + 125)) == ("0m59s", "1m01s", "3h02m")
