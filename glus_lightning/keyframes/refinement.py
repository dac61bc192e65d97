"""Keyframe self-refinement: the model measures its own per-frame quality on training videos, the frame scorer learns it.

For every (training video, expression, frame) the current model segments the frame as a keyframe would be
segmented (empty memory), and the IoU of that mask with the ground truth becomes the scorer's target: the model's
own quality supervises the scorer. Frames where the target object is absent get target 0, since a keyframe has to
show the object to anchor the memory. ``glus refine-scores`` (``command.py``) runs the loop once for a checkpoint
and writes the targets and a checkpoint with the fitted scorer; during ``glus fit`` with ``inference.keyframes`` the
``KeyframeSelfRefinement`` callback (``callback.py``) runs it before each validation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from datamodules.batch import RefVOSBatch
from datamodules.datamodule import collate, resolve_shards
from datamodules.sampling import build_sample, plan_eval
from datamodules.targets import Targets
from glus_lightning.config import DataConfig
from glus_lightning.inference.sources import shard_records
from glus_lightning.keyframes.scorer import FrameScorer
from glus_lightning.masks import masks_from_logits
from glus_lightning.metrics import mask_iou
from glus_lightning.module import GLUSModule
from glus_lightning.strategies import gather_from_ranks


@dataclass
class ScoreTargets:
    """The scorer's training set: one row per (video, expression, frame)."""

    inputs: Tensor  # float [N, prompt_dim + 2] FrameScorer inputs
    targets: Tensor  # float [N] IoU of the memoryless mask (0 where the object is absent)
    groups: Tensor  # long [N] the (video, expression) of the row: keyframes are picked within a group
    frames: Tensor  # long [N] the row's frame index in its video

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in asdict(self).items()}, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ScoreTargets:
        return cls(**load_file(path))


@dataclass
class RefineStats:
    """How well the scorer fits its targets and what keyframes it picks (IoU at the picked frame, mean over groups)."""

    rows: int
    expressions: int
    l1_before: float
    l1_after: float
    keyframe_iou: float  # at the frame the fitted scorer picks
    oracle_iou: float  # at the best frame (what a perfect scorer picks)
    first_frame_iou: float  # at frame 0 (where sequential tracking starts)


def keyframe_targets(logits: Tensor, targets: Targets, threshold: float) -> Tensor:
    """``[E, T]`` IoU of thresholded memoryless logits ``[E, T, h, w]`` with each target ``[T, H, W]``; 0 where it is empty.

    Targets are built one expression at a time (``targets.expression_target(e)``) and freed after use.
    """
    if len(targets) != len(logits):
        raise ValueError(f"{len(logits)} expressions of logits, {len(targets)} targets")
    rows = []
    for e, lg in enumerate(logits):
        target = targets.expression_target(e).bool()
        pred = masks_from_logits(lg, tuple(target.shape[-2:]), threshold)
        present = target.flatten(1).any(1)
        rows.append(torch.where(present.cpu(), mask_iou(pred, target).float().cpu(), 0.0))
        del target, pred
    return torch.stack(rows)


@torch.no_grad()
def collect_targets(module: GLUSModule, batches: Iterable[RefVOSBatch], progress: bool = False) -> ScoreTargets:
    """Segment every frame of every expression of ``batches`` (one video each) without memory and measure its IoU."""
    inputs, targets, groups, frames = [], [], [], []
    group = 0
    for batch in tqdm(batches, desc="refine: measure", unit="video", disable=not progress):
        batch = batch.to(module.device)
        evidence = module.frame_evidence(batch)
        iou = keyframe_targets(evidence.mask_logits, batch.targets, module.cfg.mask_threshold)
        num_exp, num_frames = iou.shape
        inputs.append(evidence.scorer_inputs.flatten(0, 1).cpu())
        targets.append(iou.flatten())
        groups.append(torch.arange(group, group + num_exp).repeat_interleave(num_frames))
        frames.append(torch.arange(num_frames).repeat(num_exp))
        group += num_exp
    if not inputs:
        raise ValueError("keyframe self-refinement got no training video to measure (check data.train and refine.videos)")
    return ScoreTargets(torch.cat(inputs), torch.cat(targets), torch.cat(groups), torch.cat(frames))


def gather_targets(module: L.LightningModule, targets: ScoreTargets) -> ScoreTargets:
    """Every rank's rows in rank order (groups renumbered to stay distinct); unchanged on a single process."""
    if module.trainer.world_size == 1:
        return targets
    device = module.device
    counts = gather_from_ranks(torch.tensor([len(targets.targets)], device=device)).flatten().tolist()
    most = max(counts)

    def gathered(t: torch.Tensor) -> list[torch.Tensor]:
        padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=device)
        padded[: len(t)] = t.to(device)
        per_rank = gather_from_ranks(padded).cpu()  # [world, most, ...]
        return [per_rank[r, :n] for r, n in enumerate(counts)]

    rows = {field.name: gathered(getattr(targets, field.name)) for field in fields(ScoreTargets)}
    num_groups = gather_from_ranks(torch.tensor([int(targets.groups.max()) + 1], device=device)).flatten().cpu()
    offsets = num_groups.cumsum(0) - num_groups  # groups of earlier ranks come first
    rows["groups"] = [groups + offset for groups, offset in zip(rows["groups"], offsets, strict=True)]
    return ScoreTargets(**{name: torch.cat(parts) for name, parts in rows.items()})


def training_videos(cfg: DataConfig, count: int, rank: int = 0, world_size: int = 1) -> Iterator[RefVOSBatch]:
    """The first ``count`` videos of the training shards (sorted), whole, with every expression; this rank's share.

    Targets stay per-object RLE (``ObjectTargets``), decoded one expression at a time by ``keyframe_targets``.
    """
    urls = sorted({url for entry in cfg.train for url in resolve_shards(cfg.root, entry.shards)})
    for index, record in enumerate(shard_records(urls)):
        if index >= count:
            return
        if index % world_size == rank:
            yield collate([build_sample(record, plan_eval(record, cfg.num_context), cfg.image_size, lazy_targets=True)])


def _picked(scores: Tensor, targets: ScoreTargets) -> Tensor:
    """Target IoU at the highest-scored row of each group."""
    picked = []
    for group in targets.groups.unique():
        rows = (targets.groups == group).nonzero().flatten()
        picked.append(targets.targets[rows[scores[rows].argmax()]])
    return torch.stack(picked)


def fit_scorer(scorer: FrameScorer, targets: ScoreTargets, steps: int, lr: float) -> RefineStats:
    """Full-batch AdamW on the squared error to the targets (deterministic: replicas fitted on the same rows agree)."""
    if steps < 1:
        raise ValueError(f"refine.steps must be >= 1, got {steps}")
    device = next(scorer.parameters()).device
    with torch.inference_mode(False), torch.enable_grad():  # may be called inside Lightning's validation loop
        inputs, wanted = targets.inputs.clone().to(device), targets.targets.clone().to(device)
        with torch.no_grad():
            before = scorer(inputs)
        scorer.requires_grad_(True)
        optimizer = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=0.0)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            F.mse_loss(scorer(inputs), wanted).backward()
            optimizer.step()
        scorer.requires_grad_(False)
        with torch.no_grad():
            after = scorer(inputs)
        scorer.refined.fill_(True)
    cpu = targets.targets
    return RefineStats(
        rows=len(cpu),
        expressions=int(targets.groups.unique().numel()),
        l1_before=float((before.cpu() - cpu).abs().mean()),
        l1_after=float((after.cpu() - cpu).abs().mean()),
        keyframe_iou=float(_picked(after.cpu(), targets).mean()),
        oracle_iou=float(_picked(cpu, targets).mean()),
        first_frame_iou=float(cpu[targets.frames == 0].mean()),  # every group has one frame 0
    )


def format_stats(stats: RefineStats) -> str:
    return "\n".join([
        f"scorer fitted on {stats.rows} frames of {stats.expressions} expressions",
        f"  mean |predicted - measured IoU|: {stats.l1_before:.4f} before, {stats.l1_after:.4f} after",
        (f"  IoU at the keyframe it picks: {stats.keyframe_iou:.4f}  (best frame {stats.oracle_iou:.4f}, "
         f"first frame {stats.first_frame_iou:.4f})"),
    ])
