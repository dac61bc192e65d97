"""Videos to segment, read from a folder of frames, a video file (PyAV) or prepared shards."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from datamodules.datamodule import shard_samples
from datamodules.records import Expression, VideoRecord
from datamodules.shards import check_shard_format
from datamodules.video_files import VIDEO_SUFFIXES, video_file_frames, video_frame_name

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class Video:
    """Frames of one video at their original size (RGB uint8 ``(H, W, 3)``) and where they came from."""

    name: str
    frame_names: list[str]  # one per frame; output masks are written as ``<frame name>.png``
    frames: list[np.ndarray]
    dataset: str = "video"
    expressions: list[Expression] = field(default_factory=list)  # a shard's own expressions

    @property
    def size(self) -> tuple[int, int]:
        return self.frames[0].shape[:2]


def read_folder(path: Path) -> Video:
    """Every image file of a folder, sorted by name; frame names are the file stems."""
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{path}: no frames ({', '.join(IMAGE_SUFFIXES)} files) in this folder")
    frames = []
    for file in files:
        try:
            with Image.open(file) as img:
                frames.append(np.asarray(img.convert("RGB")))
        except OSError as err:
            raise ValueError(f"{file}: not a readable image: {err}") from err
        if frames[-1].shape != frames[0].shape:
            raise ValueError(f"{file}: frame is {frames[-1].shape[:2]}, the first frame {files[0].name} is {frames[0].shape[:2]}")
    return Video(path.name, [f.stem for f in files], frames)


def read_video_file(path: Path) -> Video:
    """Decoded frames of a video file; frame names are their zero-padded indices ``00000``, ``00001`` ..."""
    frames = list(video_file_frames(path))
    if not frames:
        raise ValueError(f"{path}: the video has no frames")
    return Video(path.stem, [video_frame_name(i) for i in range(len(frames))], frames)


def record_video(record: VideoRecord) -> Video:
    return Video(record.video, list(record.frame_names), [record.decode_frame(i) for i in range(record.num_frames)],
                 record.dataset, list(record.expressions))


def shard_records(urls: list[str]) -> Iterator[VideoRecord]:
    """Every stored video of the shards, in order (frames decode lazily); a split of a shard format this code does not
    read is refused first (``check_shard_format``)."""
    check_shard_format(urls)
    for url in urls:
        try:
            for raw in shard_samples(url, handler=wds.reraise_exception):
                yield VideoRecord.from_sample(raw)
        except (tarfile.TarError, OSError) as err:
            raise ValueError(f"shard {url} cannot be read: {err}") from err


def read_input(path: str | Path) -> Iterator[Video]:
    """The videos at ``path``: a folder of frames, a video file, or a ``.tar`` shard (each video in it)."""
    path = Path(path)
    if path.is_dir():
        yield read_folder(path)
    elif path.is_file() and path.suffix.lower() == ".tar":
        yield from (record_video(r) for r in shard_records([str(path)]))
    elif path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        yield read_video_file(path)
    elif not path.exists():
        raise FileNotFoundError(f"--input {str(path)!r} does not exist")
    else:
        raise ValueError(f"--input {str(path)!r}: expected a folder of frames, a .tar shard or a video file ({', '.join(VIDEO_SUFFIXES)})")
