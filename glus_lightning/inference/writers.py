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


def write_overlay(path: Path, frames: list[np.ndarray], masks: list[np.ndarray], fps: int, alpha: float) -> None:
    """An animated GIF (``.gif``) or an MP4 (``.mp4``, PyAV) of the masks over the frames."""
    images = overlay_frames(frames, masks, alpha)
    if path.suffix == ".gif":
        first, *rest = (Image.fromarray(i) for i in images)
        first.save(path, save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)
        return
    if path.suffix != ".mp4":
        raise ValueError(f"{path}: overlays are .gif or .mp4")
    import av

    height, width = images[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
        for image in images:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[: stream.height, : stream.width]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
