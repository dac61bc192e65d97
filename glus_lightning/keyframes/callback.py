"""Keyframe self-refinement during ``glus fit``: the frame scorer is refitted before each validation."""

from __future__ import annotations

import lightning as L

from glus_lightning.config import DataConfig, RefineConfig
from glus_lightning.keyframes.refinement import collect_targets, fit_scorer, gather_targets, training_videos
from glus_lightning.module import GLUSModule
from glus_lightning.strategies import gathered


class KeyframeSelfRefinement(L.Callback):
    """Before a validation (or the final checkpoint) at a new step, measure the current model's per-frame IoU on ``refine.videos`` training
    videos (split over ranks, gathered) and fit the frame scorer to it, so keyframe validation and the checkpoint
    written after it use a scorer that knows this model. Every rank fits on the same gathered rows: DDP replicas
    agree, and under FSDP the scorer is its own sharded unit that every rank steps together.
    """

    def __init__(self, refine: RefineConfig, data: DataConfig) -> None:
        self.refine = refine
        self.data = data
        self._step: int | None = None  # global step of the last refinement

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._refine(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Training that ends without a validation at its last step is checkpointed next (``LastCheckpoint`` runs
        after this callback): refine for it too. Not at epoch ends: epochs are not validation or checkpoint steps,
        and a run resumed from a checkpoint at an epoch's last batch would not repeat that epoch's end."""
        self._refine(trainer, pl_module)

    def _refine(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, GLUSModule) or trainer.global_step == self._step:
            return
        was_training = pl_module.training
        pl_module.eval()  # measured as it predicts: eval templates, gated masks, no dropout
        try:
            videos = training_videos(self.data, self.refine.videos, trainer.global_rank, trainer.world_size)
            with gathered(pl_module):  # ranks measure different videos: no per-forward FSDP collectives
                measured = collect_targets(pl_module, videos)
            targets = gather_targets(pl_module, measured)
            stats = fit_scorer(pl_module.frame_scorer, targets, self.refine.steps, self.refine.lr)
        finally:
            pl_module.train(was_training)
        self._step = trainer.global_step
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({"refine/l1_after": stats.l1_after, "refine/keyframe_iou": stats.keyframe_iou,
                                        "refine/oracle_iou": stats.oracle_iou, "refine/first_frame_iou": stats.first_frame_iou},
                                       step=trainer.global_step)
