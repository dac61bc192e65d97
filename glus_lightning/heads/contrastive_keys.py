"""Stable keys of the rows the object-contrastive loss compares: one row per (expression, query frame).

A key is the same in every process and run, so rows pushed into the bank by one step (or one rank) are recognised
by later steps (and every rank): the same object set, the same expression, the same frame.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from datamodules.batch import RefVOSBatch

EMPTY = -1  # the key of an empty bank slot and of padding rows in a push (a crc32 is never negative)


def stable_key(text: str) -> int:
    """A key that is the same in every process and run (Python's ``hash`` of a str is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


@dataclass(frozen=True)
class RowKeys:
    """Host-side keys of a batch's E expressions and their rows (row ``e * Q + q``).

    Kept as Python lists: the candidate rules run on the host, so keys built here cost no device round trip.
    """

    video: list[int]  # [E] "dataset/video"
    objects: list[int]  # [E] "dataset/video/sorted object ids": two expressions of one object set share it
    expression: list[int]  # [E] "dataset/video/exp_id"
    frame: list[list[int]]  # [E][Q] "dataset/video/frame name" of each query frame
    dataset: list[str]  # [E] the dataset as its shards record it (mevis, ref-youtube-vos, synthetic, ...)

    @property
    def num_expressions(self) -> int:
        return len(self.objects)


def row_keys(batch: RefVOSBatch) -> RowKeys:
    """The keys of a batch's expressions and rows (expressions of a video share its query frames)."""
    video, objects, expression, frame, dataset = [], [], [], [], []
    for e, b in enumerate(batch.expression_video.tolist()):
        name = f"{batch.datasets[b]}/{batch.video_ids[b]}"
        video.append(stable_key(name))
        objects.append(stable_key(f"{name}/{','.join(str(o) for o in sorted(batch.expression_objects[e]))}"))
        expression.append(stable_key(f"{name}/{batch.expression_ids[e]}"))
        frame.append([stable_key(f"{name}/{f}") for f in batch.frame_names[b]])
        dataset.append(batch.datasets[b])
    return RowKeys(video, objects, expression, frame, dataset)
