"""The memory bank of N tracks: SAM2's per-frame memories, explicit and bounded."""

from __future__ import annotations

from torch import Tensor


class MemoryBank:
    """Memories (spatial features, their position encodings, object pointers) of N tracks, by frame index.

    Stored in SAM2's ``output_dict`` layout (``conditioning.py`` selects from it): the first frame pushed into an
    empty bank is the conditioning frame (always attended) unless ``conditioning_frame`` is False, later frames are
    non-conditioning memories, of which the nearest ones behind the current frame are attended, plus object
    pointers of up to ``window`` frames back. After a push, non-conditioning frames
    ``window`` or more frames from the newest one can no longer be selected by the next frame and are dropped,
    so storage stays bounded (``1 + window`` frames in a one-way pass, ``2 * window`` at most) however long the video.
    """

    def __init__(self, batch_size: int, window: int, conditioning_frame: bool = True) -> None:
        if batch_size < 1 or window < 1:
            raise ValueError(f"MemoryBank needs batch_size >= 1 and window >= 1, got {batch_size} and {window}")
        self.batch_size = batch_size
        self.window = window
        self.conditioning_frame = conditioning_frame  # False: the first frame is a memory like the others (GLUS reference)
        self.output_dict: dict[str, dict[int, dict[str, Tensor | list[Tensor]]]] = {
            "cond_frame_outputs": {},
            "non_cond_frame_outputs": {},
        }
        self.last_frame: int | None = None

    def __len__(self) -> int:
        return sum(len(frames) for frames in self.output_dict.values())

    @property
    def is_empty(self) -> bool:
        return self.last_frame is None

    @property
    def frames(self) -> list[int]:
        """Frame indices held, sorted."""
        return sorted(f for frames in self.output_dict.values() for f in frames)

    def fork(self) -> MemoryBank:
        """An independent bank holding the same memories (e.g. a keyframe's, to track from it in both directions)."""
        bank = MemoryBank(self.batch_size, self.window, self.conditioning_frame)
        bank.output_dict = {kind: dict(frames) for kind, frames in self.output_dict.items()}
        bank.last_frame = self.last_frame
        return bank

    def is_reverse(self, frame_idx: int) -> bool:
        """Whether stepping ``frame_idx`` goes backward in time from the newest memory."""
        return self.last_frame is not None and frame_idx < self.last_frame

    def push(self, frame_idx: int, maskmem_features: Tensor, maskmem_pos_enc: Tensor, obj_ptr: Tensor) -> None:
        """Store one frame's memory for all N tracks and drop those that can no longer be selected."""
        if frame_idx in self.frames:
            raise ValueError(f"frame {frame_idx} is already in the memory bank (frames {self.frames}); use a new bank")
        for name, t in (("maskmem_features", maskmem_features), ("maskmem_pos_enc", maskmem_pos_enc), ("obj_ptr", obj_ptr)):
            if t.shape[0] != self.batch_size:
                raise ValueError(f"{name} has batch {t.shape[0]}, the memory bank holds {self.batch_size} tracks")
        kind = "cond_frame_outputs" if self.is_empty and self.conditioning_frame else "non_cond_frame_outputs"
        entry = {"maskmem_features": maskmem_features, "maskmem_pos_enc": [maskmem_pos_enc], "obj_ptr": obj_ptr}
        self.output_dict[kind][frame_idx] = entry
        self.last_frame = frame_idx
        recent = self.output_dict["non_cond_frame_outputs"]
        for old in [f for f in recent if abs(f - frame_idx) >= self.window]:
            del recent[old]
