"""Frames of a video file, decoded with PyAV (an optional dependency, imported only when a video file is read).

Shared by ``glus prepare folder`` (:mod:`datamodules.own_folder`) and ``glus predict --input clip.mp4``
(:mod:`glus_lightning.inference.sources`), so that both name a video's frames alike: a mask drawn for frame
``00012`` of a clip is the mask of the frame ``glus predict`` writes as ``00012.png``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm")


def video_file_frames(path: Path) -> Iterator[np.ndarray]:
    """The frames of a video file's first video stream, decoded one at a time (RGB uint8 ``(H, W, 3)``), so that a
    caller that keeps only some of them never holds the whole decoded video. ``ValueError`` when it cannot be decoded."""
    import av  # optional dependency: only video files need it

    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                yield frame.to_ndarray(format="rgb24")
    except (av.FFmpegError, IndexError) as err:
        raise ValueError(f"{path}: cannot decode a video stream: {err}") from err


def video_frame_name(index: int) -> str:
    """The name of frame ``index`` of a video file: ``00000``, ``00001`` ... (its mask is ``<name>.png``)."""
    return f"{index:05d}"
