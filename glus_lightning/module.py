"""``GLUSModule``: MLLM backbone -> ``[SEG]`` projection -> SAM2 memory segmenter, trained end to end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from datamodules.batch import RefVOSBatch
from glus_lightning.backbones import build_backbone
from glus_lightning.backbones.base import PrefixCache
from glus_lightning.checkpoints import state as ckpt_state
from glus_lightning.checkpoints.importers import load_init_weights
from glus_lightning.heads.seg_projection import SegProjection
from glus_lightning.losses import iou_prediction_loss, mask_losses, presence_loss, upsample_logits
from glus_lightning.metrics import JAndF
from glus_lightning.segmentation import build_segmenter
from glus_lightning.strategies import is_block


@dataclass
class GLUSOutput:
    lm_loss: Tensor  # scalar
    mask_logits: list[Tensor]  # E tensors [Q, h, w] of low-resolution logits
    prompts: Tensor  # [E, Q, prompt_dim] projected [SEG] embeddings
    iou_pred: Tensor  # [E, Q] SAM2's predicted IoU
    object_logits: Tensor  # [E, Q] SAM2's object-presence logits


class GLUSModule(L.LightningModule):
    """Segments, in every query frame, the object that each expression refers to.

    Built from the full resolved config (saved in every checkpoint as a hyperparameter).
    """

    def __init__(self, config: DictConfig | dict) -> None:
        super().__init__()
        cfg = OmegaConf.create(config)
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)})
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone)
        self.segmenter = build_segmenter(cfg.segmenter)
        self.seg_projection = SegProjection(self.backbone.hidden_size, self.segmenter.prompt_dim)
        if cfg.get("init_weights") is not None:  # published weights from `glus import` (configs saved before the key: none)
            load_init_weights(self, cfg.init_weights)
        self.strict_loading = False  # checkpoints hold the trainable state only; on_load_checkpoint checks it
        self.val_metric = JAndF()
        self.test_metric = JAndF()
        self.expression_scores: dict[str, dict[str, float]] = {}  # last val/test epoch, keys "dataset/video/exp_id"

    # ----------------------------------------------------------------------------------- forward
    def encode_window(self, batch: RefVOSBatch, query: Tensor, prefix: PrefixCache | None = None) -> tuple[Tensor, Tensor]:
        """LM loss and projected ``[SEG]`` prompts ``[E, q, P]`` for query frames ``[B, q, 3, S, S]``.

        ``prefix``: the cached prompt prefix of the (single) video's context frames, see ``MLLMBackbone.encode_prefix``.
        """
        ev = batch.expression_video
        out = self.backbone.encode(
            batch.context_frames[ev], query[ev], batch.expressions, ce_only_seg=self.cfg.loss.ce_only_seg, prefix=prefix
        )
        prompts = self.seg_projection(out.seg_hidden.to(self.seg_projection[0].weight.dtype))
        return out.lm_loss, prompts

    def forward(self, batch: RefVOSBatch) -> GLUSOutput:
        """Training forward: one window of Q query frames per video, memory bank over the window."""
        lm_loss, prompts = self.encode_window(batch, batch.query_frames)
        q = batch.num_query
        features = self.segmenter.encode_frames(batch.query_frames.flatten(0, 1))
        rows = batch.expression_video[:, None] * q + torch.arange(q, device=prompts.device)
        track = self.segmenter.track(self.segmenter.select(features, rows), prompts)
        return GLUSOutput(lm_loss, list(track.mask_logits.unbind(0)), prompts, track.iou_pred, track.object_score_logits)

    @torch.no_grad()
    def predict_video(self, batch: RefVOSBatch) -> Tensor:
        """Mask logits ``[E, T, h, w]`` for every frame of one video (batch of 1 video, all frames as query).

        Windows of ``inference.window`` frames share the evaluation context frames; the memory bank is carried
        across windows, each frame's image features are computed once, and with ``inference.kv_cache`` the prompt
        prefix (system, context frames, instruction) is encoded once per video instead of once per window.
        """
        if batch.frames.shape[0] != 1:
            raise ValueError(f"predict_video takes one video per batch, got {batch.frames.shape[0]}")
        window = self.cfg.inference.window
        if window < 1:
            raise ValueError(f"inference.window must be >= 1, got {window}")
        num_frames = batch.num_query
        prefix = self.backbone.encode_prefix(batch.context_frames[0]) if self.cfg.inference.kv_cache else None
        memory = self.segmenter.new_memory(len(batch.expressions))
        logits = []
        for start in range(0, num_frames, window):
            frame_ids = list(range(start, min(start + window, num_frames)))
            query = batch.query_frames[:, frame_ids]
            _, prompts = self.encode_window(batch, query, prefix)
            features = self.segmenter.encode_frames(query[0])
            rows = torch.arange(len(frame_ids), device=prompts.device).expand(len(batch.expressions), -1)
            track = self.segmenter.track(self.segmenter.select(features, rows), prompts, memory=memory, frame_ids=frame_ids)
            logits.append(track.mask_logits)
        return torch.cat(logits, dim=1)

    # ---------------------------------------------------------------------------------- training
    def training_step(self, batch: RefVOSBatch, batch_idx: int) -> Tensor:
        out = self(batch)
        bce, dice = mask_losses(out.mask_logits, batch.masks)
        presence = presence_loss(out.object_logits, batch.masks)
        iou = iou_prediction_loss(out.iou_pred, out.mask_logits, batch.masks, self.cfg.mask_threshold)
        w = self.cfg.loss
        loss = (w.ce_weight * out.lm_loss + w.bce_weight * bce + w.dice_weight * dice
                + w.object_weight * presence + w.iou_weight * iou)
        n = len(batch.expressions)
        self.log_dict({"train/ce": out.lm_loss, "train/bce": bce, "train/dice": dice, "train/object": presence,
                       "train/iou_pred": iou}, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def validation_step(self, batch: RefVOSBatch, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate_video(batch, self.val_metric)

    def test_step(self, batch: RefVOSBatch, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate_video(batch, self.test_metric)

    def predict_step(self, batch: RefVOSBatch, batch_idx: int) -> dict[str, Any]:
        """Boolean masks ``[T, H, W]`` per expression at the video's original size (the size of ``batch.masks``)."""
        logits = self.predict_video(batch)
        masks = [upsample_logits(lg.float(), tuple(m.shape[-2:])) > self.cfg.mask_threshold for lg, m in zip(logits, batch.masks, strict=True)]
        return {"video": batch.video_ids[0], "dataset": batch.datasets[0], "expression_ids": batch.expression_ids,
                "frame_names": batch.frame_names[0], "masks": masks}

    def _evaluate_video(self, batch: RefVOSBatch, metric: JAndF) -> dict[str, Tensor]:
        """Whole-video masks at the original resolution, scored per expression (validation and test share it)."""
        logits = self.predict_video(batch)
        preds = []
        for lg, target, exp_id in zip(logits, batch.masks, batch.expression_ids, strict=True):
            pred = upsample_logits(lg.float(), tuple(target.shape[-2:])) > self.cfg.mask_threshold
            metric.update(pred, target.bool(), key=f"{batch.datasets[0]}/{batch.video_ids[0]}/{exp_id}")
            preds.append(pred)
        return {"pred_masks": preds}

    def on_validation_epoch_end(self) -> None:
        self._log_scores(self.val_metric, "val")

    def on_test_epoch_end(self) -> None:
        self._log_scores(self.test_metric, "test")

    def _log_scores(self, metric: JAndF, stage: str) -> None:
        """Log ``<stage>/J``, ``/F``, ``/J&F`` and keep the per-expression scores (for CSV tables)."""
        scores = metric.compute()
        self.log_dict({f"{stage}/{k}": v for k, v in scores.items() if k in ("J", "F", "J&F")}, prog_bar=True, sync_dist=False)
        self.expression_scores = metric.per_expression()
        metric.reset()

    # ------------------------------------------------------------------------ scale, checkpoints
    def configure_model(self) -> None:
        """FSDP2 (``trainer.strategy=fsdp``): shard the transformer blocks, then the root, over the (nodes, GPUs) mesh."""
        if self.device_mesh is not None:
            ckpt_state.shard_fsdp2(self, self.device_mesh, is_block, forward_methods=("predict_video",))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only what training changes (frozen weights come from the config)."""
        checkpoint["state_dict"] = ckpt_state.trainable_state(self, checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Fail clearly on a checkpoint of another model or other training switches."""
        ckpt_state.check_checkpoint_fits(self, checkpoint, self.cfg.backbone.family)

    # -------------------------------------------------------------------------------- optimisers
    def configure_optimizers(self) -> dict:
        """AdamW (segmenter optionally at its own lr), linear warm-up then linear decay to 0 at max_steps."""
        o = self.cfg.optim
        seg_params = [p for p in self.segmenter.parameters() if p.requires_grad]
        seg_ids = {id(p) for p in seg_params}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in seg_ids]
        groups = [{"params": rest, "lr": o.lr}]
        if seg_params:
            groups.append({"params": seg_params, "lr": o.segmenter_lr if o.segmenter_lr is not None else o.lr})
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        total = max(int(self.trainer.max_steps), 1)
        warmup = min(int(o.warmup_steps), total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(total - warmup, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
