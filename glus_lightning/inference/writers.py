"""Prediction outputs: 0/255 PNG masks written atomically per expression, overlay GIF/MP4 for people."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

# distinct overlay colours, one per expression (cycled)
PALETTE = np.array([(255, 64, 64), (64, 160, 255), (64, 220, 96), (255, 200, 32), (200, 80, 255), (0, 220, 220)], np.float32)
OVERLAY_KINDS = ("gif", "mp4", "none")


def write_masks(directory: Path, frame_names: list[str], masks: np.ndarray) -> None:
    """``<directory>/<frame>.png`` per frame: single-channel 0/255 at the mask's size."""
    if len(frame_names) != len(masks):
        raise ValueError(f"{directory}: {len(masks)} masks for {len(frame_names)} frame names")
    directory.mkdir(parents=True, exist_ok=True)
    for name, mask in zip(frame_names, masks, strict=True):
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(directory / f"{name}.png")


def read_mask(path: Path) -> np.ndarray:
    """A mask ``write_masks`` wrote, as booleans."""
    with Image.open(path) as image:
        return np.asarray(image) > 0


def write_masks_atomically(directory: Path, frame_names: list[str], masks: np.ndarray) -> bool:
    """Write the masks into a temp folder beside ``directory``, then rename it into place.

    A folder that exists is therefore complete (an interrupted run leaves only a hidden temp folder). Returns
    False, writing nothing, when ``directory`` appeared meanwhile (another process finished it first).
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        write_masks(tmp, frame_names, masks)
        os.rename(tmp, directory)  # atomic; fails if directory exists and is non-empty
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if directory.is_dir():
            return False
        raise
    return True


def overlay_frames(frames: list[np.ndarray], masks: list[np.ndarray], alpha: float) -> list[np.ndarray]:
    """Frames with each expression's mask tinted in its palette colour."""
    out = []
    for t, frame in enumerate(frames):
        image = frame.astype(np.float32)
        for k, mask in enumerate(masks):
            m = mask[t][..., None]
            image = np.where(m, (1 - alpha) * image + alpha * PALETTE[k % len(PALETTE)], image)
        out.append(image.round().astype(np.uint8))
    return out


class OverlayWriter:
    """An animated GIF (``.gif``) or an MP4 (``.mp4``, PyAV) of the masks over the frames, fed window by window.

    An MP4 is encoded as the frames come, so it keeps nothing per frame; a GIF can only be saved whole, so it keeps
    every tinted frame until ``close`` (choose ``inference.overlay=mp4`` or ``none`` for long videos)."""

    def __init__(self, path: Path, fps: int, alpha: float) -> None:
        if path.suffix not in (".gif", ".mp4"):
            raise ValueError(f"{path}: overlays are .gif or .mp4")
        self.path, self.fps, self.alpha = path, fps, alpha
        self.images: list[np.ndarray] = []
        self.container = self.stream = self.av = None

    def add(self, frames: list[np.ndarray], masks: list[np.ndarray]) -> None:
        """``frames`` of one window and each expression's masks ``(len(frames), H, W)`` of them."""
        images = overlay_frames(frames, masks, self.alpha)
        if self.path.suffix == ".gif":
            self.images.extend(images)
            return
        if self.container is None:
            import av

            self.av = av
            height, width = images[0].shape[:2]
            self.container = av.open(str(self.path), "w")
            self.stream = self.container.add_stream("mpeg4", rate=self.fps)
            self.stream.width, self.stream.height, self.stream.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
        for image in images:
            crop = np.ascontiguousarray(image[: self.stream.height, : self.stream.width])
            frame = self.av.VideoFrame.from_ndarray(crop, format="rgb24")
            self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        if self.path.suffix == ".gif" and self.images:
            first, *rest = (Image.fromarray(i) for i in self.images)
            first.save(self.path, save_all=True, append_images=rest, duration=round(1000 / self.fps), loop=0)
            self.images = []
        elif self.container is not None:
            self.container.mux(self.stream.encode())
            self.container.close()
            self.container = None


def write_overlay(path: Path, frames: list[np.ndarray], masks: list[np.ndarray], fps: int, alpha: float) -> None:
    """The whole video's overlay at once (``OverlayWriter``)."""
    writer = OverlayWriter(path, fps, alpha)
    writer.add(frames, masks)
    writer.close()
