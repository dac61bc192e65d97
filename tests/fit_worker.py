"""``glus fit`` in a subprocess for the scale and resume tests, recording what they compare.

    python tests/fit_worker.py OUT_DIR [--hang-at-step N] key=value ...

Each rank appends ``{"step", "loss", "videos", "frames", "expressions", "object_keys"}`` per training step to ``OUT_DIR/losses.rank<r>.jsonl`` and, at the end of
training, the float64 sum of its (gathered) trainable parameters, how many are FSDP2 shards and the dtypes of trainable and
frozen parameters and of the Adam moments to ``OUT_DIR/params.rank<r>.json``
its frame scorer's state (refined flag, parameter sum, FSDP2 shards) to ``OUT_DIR/scorer.rank<r>.json``
and, with the contrastive loss on, its bank's keys and pointer to ``OUT_DIR/bank.rank<r>.json``.
After each validation, its J&F and the keys of the expressions scored (all ranks') go to ``OUT_DIR/val.rank<r>.json``;
each validation inside ``fit`` appends ``{"step", "J&F"}`` to ``OUT_DIR/val_steps.rank<r>.jsonl``, and each checkpoint
written appends ``{"step", "epoch", "batch"}`` to ``OUT_DIR/saves.rank<r>.jsonl``. Per-step records also hold the
epoch and batch index (``"epoch"``, ``"batch"``).
``--hang-at-step N`` stops before step N (its checkpoints already written), touches ``OUT_DIR/hung`` and sleeps,
so that the test can kill the process there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from glus_lightning import runner
from glus_lightning.config import compose
from glus_lightning.heads.contrastive_keys import row_keys


class Recorder(L.Callback):
    def __init__(self, out: Path, hang_at_step: int | None) -> None:
        self.out, self.hang_at_step = out, hang_at_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.hang_at_step:
            (self.out / "hung").touch()
            time.sleep(3600)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        with open(self.out / f"losses.rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step - 1, "loss": float(outputs["loss"]), "videos": batch.video_ids,
                                "frames": batch.frame_indices.tolist(), "expressions": batch.expressions,
                                "object_keys": row_keys(batch).objects, "epoch": trainer.current_epoch,
                                "batch": batch_idx}) + "\n")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        jf = float(trainer.callback_metrics["val/J&F"])
        (self.out / f"val.rank{trainer.global_rank}.json").write_text(json.dumps({
            "J&F": jf, "expressions": sorted(pl_module.expression_scores)}))
        if trainer.state.fn == TrainerFn.FITTING:
            self._append(f"val_steps.rank{trainer.global_rank}.jsonl", {"step": trainer.global_step, "J&F": jf})

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._append(f"saves.rank{trainer.global_rank}.jsonl", {"step": trainer.global_step, "epoch": trainer.current_epoch,
                                                                "batch": trainer.fit_loop.epoch_loop.batch_idx})

    def _append(self, name: str, record: dict[str, Any]) -> None:
        with open(self.out / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total, sharded = 0.0, 0
        for p in pl_module.parameters():
            if p.requires_grad:
                sharded += hasattr(p, "full_tensor")  # FSDP2 shards are DTensors
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                total += float(full.detach().double().sum())
        adam = {str(state[key].dtype) for opt in trainer.optimizers for state in opt.state.values()
                for key in ("exp_avg", "exp_avg_sq") if key in state}
        (self.out / f"params.rank{trainer.global_rank}.json").write_text(json.dumps({
            "sum": total, "sharded": sharded, "adam_dtypes": sorted(adam),
            "trainable_dtypes": sorted({str(p.dtype) for p in pl_module.parameters() if p.requires_grad}),
            "frozen_dtypes": sorted({str(p.dtype) for p in pl_module.parameters() if not p.requires_grad})}))
        scorer = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in pl_module.frame_scorer.parameters()]
        (self.out / f"scorer.rank{trainer.global_rank}.json").write_text(json.dumps({
            "refined": bool(pl_module.frame_scorer.refined), "sum": sum(float(p.detach().double().sum()) for p in scorer),
            "sharded": sum(hasattr(p, "full_tensor") for p in pl_module.frame_scorer.parameters())}))
        bank = getattr(pl_module, "contrastive", None)
        if bank is not None:
            (self.out / f"bank.rank{trainer.global_rank}.json").write_text(
                json.dumps({"keys": bank.bank_keys.tolist(), "pointer": int(bank.bank_pointer)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--hang-at-step", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    runner.fit(compose(args.overrides), extra_callbacks=[Recorder(args.out, args.hang_at_step)])


if __name__ == "__main__":
    main()
