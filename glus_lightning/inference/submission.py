"""Official-server submissions: ``Annotations/<video>/<exp_id>/<frame>.png`` for a whole split, resumable and
split across processes.

Work is split by video: process ``rank`` of ``world_size`` takes the videos (in shard order) whose running index is
``rank`` modulo ``world_size``, so ranks never overlap, together cover everything, and each video's frame features
and prompt prefix are computed by one process, once for all of its expressions.
An expression's folder is renamed into place only when all its frames are written, so an existing folder means
"done": a rerun skips it, and a crash leaves nothing half written under its name.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from glus_lightning.inference.predictor import segment_video
from glus_lightning.inference.sources import record_video, shard_records
from glus_lightning.inference.writers import write_masks_atomically
from glus_lightning.module import GLUSModule

SUBMISSION_FORMATS = ("mevis", "ref-youtube-vos")  # both servers take the same Annotations layout
ANNOTATIONS = "Annotations"


@dataclass
class SubmissionStats:
    written: int = 0  # expressions segmented and written by this process
    skipped: int = 0  # of this rank, already done (resume)
    other_ranks: int = 0  # expressions left to the other processes
    lost_races: int = 0  # written by another process while this one worked on them


def expression_dir(out: Path, video: str, exp_id: str) -> Path:
    return out / ANNOTATIONS / video / exp_id


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else the launcher's ``RANK`` / ``WORLD_SIZE``, else a single process."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world size {world_size}: need world_size >= 1 and 0 <= rank < world_size")
    return rank, world_size


def write_submission(
    module: GLUSModule | Callable[[], GLUSModule], urls: list[str], out: Path, rank: int = 0, world_size: int = 1
) -> SubmissionStats:
    """Segment this rank's unfinished expressions of every video in ``urls``; the model is built on first need."""
    stats = SubmissionStats()
    for index, record in enumerate(shard_records(urls)):
        if index % world_size != rank:
            stats.other_ranks += len(record.expressions)
            continue
        todo = []
        for expression in record.expressions:
            if expression_dir(out, record.video, expression.exp_id).is_dir():
                stats.skipped += 1
            else:
                todo.append(expression)
        if not todo:
            continue
        if not isinstance(module, GLUSModule):
            module = module()
        masks = segment_video(module, record_video(record), todo)
        for expression, mask in zip(todo, masks, strict=True):
            if write_masks_atomically(expression_dir(out, record.video, expression.exp_id), record.frame_names, mask):
                stats.written += 1
            else:
                stats.lost_races += 1
    return stats


def missing_expressions(urls: list[str], out: Path) -> list[str]:
    """``video/exp_id`` of every expression of the split without a finished folder."""
    return [
        f"{r.video}/{e.exp_id}" for r in shard_records(urls) for e in r.expressions
        if not expression_dir(out, r.video, e.exp_id).is_dir()
    ]


def write_zip(out: Path, urls: list[str], name: str) -> Path:
    """``<out>/<name>.zip`` of the complete ``Annotations`` tree (written to a temp file, then renamed)."""
    missing = missing_expressions(urls, out)
    if missing:
        raise RuntimeError(f"{len(missing)} expressions have no predictions yet (e.g. {missing[:3]}); run the remaining ranks first")
    path = out / f"{name}.zip"
    tmp = path.with_name(f".{path.name}.tmp")
    root = out / ANNOTATIONS
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(root.rglob("*.png")):
            if not any(part.startswith(".") for part in file.relative_to(root).parts):  # temp folders of live runs
                archive.write(file, file.relative_to(out).as_posix())
    os.replace(tmp, path)
    return path
