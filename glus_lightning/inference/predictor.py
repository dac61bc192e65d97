"""Whole-video segmentation of a ``Video`` for a list of expressions with a ``GLUSModule``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from datamodules.batch import RefVOSBatch
from datamodules.converters import normalize_expression
from datamodules.records import Expression
from datamodules.sampling import eval_context_indices, squash
from datamodules.targets import DenseTargets
from glus_lightning.checkpoints.checkpoint_io import load_checkpoint
from glus_lightning.inference.sources import Video
from glus_lightning.masks import masks_from_logits
from glus_lightning.module import GLUSModule
from glus_lightning.precision import compute_precision


def load_module(cfg: DictConfig, device: torch.device | str = "cpu", module_class: type[GLUSModule] = GLUSModule) -> GLUSModule:
    """The configured model in eval mode, with ``ckpt_path``'s trained weights (``module_class``: the class it was
    trained as, a GLUSModule subclass in experiments).

    Seeded first: the frozen weights of a tiny model are its seeded random init, as in training.
    """
    L.seed_everything(cfg.seed, verbose=False)
    module = module_class(cfg)
    if cfg.ckpt_path is not None:
        checkpoint = load_checkpoint(cfg.ckpt_path)
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"], strict=False)  # frozen weights come from the config
    return module.to(device).eval()


def video_batch(video: Video, expressions: list[Expression], num_context: int, image_size: int) -> RefVOSBatch:
    """One video as a prediction batch: segment-middle context frames, then every frame as a query (no targets)."""
    if not expressions:
        raise ValueError(f"video {video.name!r}: no expression to segment")
    num_frames = len(video.frames)
    context = eval_context_indices(num_frames, num_context)
    squashed = [squash(f, image_size) for f in video.frames]
    order = context + list(range(num_frames))
    return RefVOSBatch(
        frames=torch.stack([squashed[i] for i in order])[None],
        num_context=num_context,
        frame_indices=torch.tensor([order]),
        expressions=[normalize_expression(e.text) for e in expressions],
        expression_ids=[e.exp_id for e in expressions],
        expression_video=torch.zeros(len(expressions), dtype=torch.long),
        expression_objects=[e.obj_ids for e in expressions],
        targets=DenseTargets([]),  # none: a video to segment, not to score
        video_ids=[video.name],
        datasets=[video.dataset],
        video_objects=[()],
        frame_names=[list(video.frame_names)],
        video_sizes=[(int(video.size[0]), int(video.size[1]))],
    )


@torch.no_grad()
def stream_masks(module: GLUSModule, video: Video, expressions: list[Expression],
                 progress: Callable[[int], object] | None = None) -> Iterator[tuple[int, list[int], np.ndarray]]:
    """``(expression index, frame indices, boolean masks (k, H, W))`` at the video's original size, each final when it
    is yielded (``GLUSModule.stream_video``; in frame order per expression when sequential, from each keyframe outwards
    with ``inference.keyframes``): a consumer that writes them keeps nothing per frame, so a long video needs no more
    device memory than a short one. The frames stay on the CPU until their chunk runs. ``progress(n)`` as n more
    frames are through the MLLM."""
    cfg = module.cfg
    batch = video_batch(video, expressions, cfg.data.num_context, cfg.data.image_size)
    chunks = module.stream_video(batch, progress)
    while True:
        with compute_precision(cfg.trainer.precision, module.device):  # each chunk's compute, not the caller's code
            chunk = next(chunks, None)
        if chunk is None:
            return
        rows, frames, logits = chunk
        for row, where, lg in zip(rows.tolist(), frames, logits, strict=True):
            valid = where >= 0
            if valid.any():
                masks = masks_from_logits(lg[valid], video.size, cfg.mask_threshold).cpu().numpy()
                yield row, where[valid].tolist(), masks


def segment_video(module: GLUSModule, video: Video, expressions: list[Expression],
                  progress: Callable[[int], object] | None = None) -> list[np.ndarray]:
    """Boolean masks ``(T, H, W)`` per expression at the video's original size: ``stream_masks`` put together."""
    masks = [np.zeros((len(video.frames), *video.size), dtype=bool) for _ in expressions]
    for e, frame_ids, chunk in stream_masks(module, video, expressions, progress):
        masks[e][frame_ids] = chunk
    return masks
