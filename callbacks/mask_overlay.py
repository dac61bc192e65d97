"""TensorBoard images of predicted and ground-truth masks over the query frames, for people to look at."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from datamodules.batch import RefVOSBatch
from glus_lightning.inference.writers import overlay_frames, with_legend
from glus_lightning.masks import masks_from_logits

PRED_COLOUR = (255, 60, 60)  # prediction filled in red
TARGET_COLOUR = (60, 255, 60)  # ground-truth outline in green


def overlay(frames: Tensor, pred: Tensor, target: Tensor, alpha: float = 0.5) -> Tensor:
    """uint8 ``[T, 3, H, W]`` frames with the prediction filled and the target's outline drawn.

    ``pred`` and ``target`` are boolean ``[T, h, w]`` masks of any size; they are resized to the frames.
    """
    size = tuple(frames.shape[-2:])
    pred = F.interpolate(pred[:, None].float(), size=size, mode="nearest")[:, 0].bool()
    target = F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0]
    outline = (F.max_pool2d(target[:, None], 3, 1, 1)[:, 0] - target).bool()
    out = frames.float().clone()
    pred_rgb = torch.tensor(PRED_COLOUR, dtype=out.dtype, device=out.device)[None, :, None, None]
    out = torch.where(pred[:, None], (1 - alpha) * out + alpha * pred_rgb, out)
    target_rgb = torch.tensor(TARGET_COLOUR, dtype=out.dtype, device=out.device)[None, :, None, None]
    out = torch.where(outline[:, None], target_rgb.expand_as(out), out)
    return out.round().clamp(0, 255).to(torch.uint8)


class MaskOverlayLogger(L.Callback):
    """Logs, for the first ``num_videos`` validation videos, one strip per expression (frames side by side, the
    prediction against the target's outline) and one of every expression's prediction in its own colour, named in a
    legend (which object each sentence picked, at a glance).

    Reads the module's ``validation_step`` output ``{"mask_logits": [E, T, h, w]}``; each prediction is thresholded
    at the video's resolution, as it is scored.
    """

    def __init__(self, num_videos: int) -> None:
        self.num_videos = num_videos

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: RefVOSBatch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx >= self.num_videos or not trainer.is_global_zero or trainer.sanity_checking:
            return
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None or not outputs:
            return
        frames = batch.query_frames[0]
        threshold = pl_module.cfg.mask_threshold
        preds = []
        for e, logits in enumerate(outputs["mask_logits"]):  # one expression at a time: targets are built when used
            target = batch.targets.expression_target(e).bool()
            pred = masks_from_logits(logits, tuple(target.shape[-2:]), threshold)  # as scored
            strip = torch.cat(list(overlay(frames, pred, target)), dim=-1)  # [3, S, T*S]
            preds.append(F.interpolate(pred[:, None].float(), size=tuple(frames.shape[-2:]), mode="nearest")[:, 0].bool())
            del target, pred
            tag = f"val_overlay/{batch.video_ids[0]}/{e}: {batch.expressions[e]}"
            logger.experiment.add_image(tag, strip, global_step=trainer.global_step)
        tinted = overlay_frames(list(frames.permute(0, 2, 3, 1).cpu().numpy()), [p.cpu().numpy() for p in preds], 0.5)
        strip = with_legend(np.concatenate(tinted, axis=1), batch.expressions)  # [H', T*S', 3]
        logger.experiment.add_image(f"val_overlay/{batch.video_ids[0]}/all expressions", strip, global_step=trainer.global_step,
                                    dataformats="HWC")
