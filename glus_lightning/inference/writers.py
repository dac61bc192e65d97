"""Prediction outputs: 0/255 PNG masks written atomically per expression, overlay GIF/MP4 for people."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# distinct overlay colours, one per expression (cycled)
PALETTE = np.array([(255, 64, 64), (64, 160, 255), (64, 220, 96), (255, 200, 32), (200, 80, 255), (0, 220, 220)], np.float32)
OVERLAY_KINDS = ("gif", "mp4", "none")
LEGEND_ROW = 16  # pixels per expression in an overlay's legend
LEGIBLE_WIDTH = 320  # narrower images are enlarged (nearest neighbour, whole multiples) so their legend's text fits


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


def with_legend(image: np.ndarray, labels: list[str]) -> np.ndarray:
    """``image`` (uint8 ``[H, W, 3]``, tinted by ``overlay_frames``) enlarged to a legible width, over a legend that
    names each mask's colour: the expression it segments, so that grounding shows at a glance."""
    factor = -(-LEGIBLE_WIDTH // image.shape[1])
    if factor > 1:
        image = image.repeat(factor, axis=0).repeat(factor, axis=1)
    legend = Image.new("RGB", (image.shape[1], LEGEND_ROW * len(labels) + 4), (0, 0, 0))
    draw = ImageDraw.Draw(legend)
    font = ImageFont.load_default(size=LEGEND_ROW - 4)
    for k, label in enumerate(labels):
        top = 2 + k * LEGEND_ROW
        colour = tuple(int(c) for c in PALETTE[k % len(PALETTE)])
        draw.rectangle((4, top + 2, 4 + LEGEND_ROW - 5, top + LEGEND_ROW - 3), fill=colour)
        draw.text((LEGEND_ROW + 4, top), label, fill=colour, font=font)
    return np.concatenate([image, np.asarray(legend)], axis=0)


class OverlayWriter:
    """An animated GIF (``.gif``) or an MP4 (``.mp4``, PyAV) of the masks over the frames, fed window by window.

    With ``labels`` (one per mask, the expressions) every frame carries the legend of ``with_legend``. An MP4 is
    encoded as the frames come, so it keeps nothing per frame; a GIF can only be saved whole, so it keeps every tinted
    frame until ``close`` (choose ``inference.overlay=mp4`` or ``none`` for long videos)."""

    def __init__(self, path: Path, fps: int, alpha: float, labels: list[str] | None = None) -> None:
        if path.suffix not in (".gif", ".mp4"):
            raise ValueError(f"{path}: overlays are .gif or .mp4")
        self.path, self.fps, self.alpha, self.labels = path, fps, alpha, labels
        self.images: list[np.ndarray] = []
        self.container = self.stream = self.av = None

    def add(self, frames: list[np.ndarray], masks: list[np.ndarray]) -> None:
        """``frames`` of one window and each expression's masks ``(len(frames), H, W)`` of them."""
        if self.labels is not None and len(self.labels) != len(masks):
            raise ValueError(f"{self.path}: {len(masks)} masks for {len(self.labels)} legend labels")
        images = overlay_frames(frames, masks, self.alpha)
        if self.labels is not None:
            images = [with_legend(image, self.labels) for image in images]
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


def write_overlay(path: Path, frames: list[np.ndarray], masks: list[np.ndarray], fps: int, alpha: float,
                  labels: list[str] | None = None) -> None:
    """The whole video's overlay at once (``OverlayWriter``)."""
    writer = OverlayWriter(path, fps, alpha, labels)
    writer.add(frames, masks)
    writer.close()
