"""SAM2 memory-bank segmenter: the ``sam2`` package's modules prompted by projected ``[SEG]`` embeddings."""

from glus_lightning.segmentation.memory import MemoryBank
from glus_lightning.segmentation.sam2_build import CheckpointMismatchError, SegmenterConfigError
from glus_lightning.segmentation.segmenter import (
    FrameFeatures,
    MemorySegmenter,
    SegmentOutput,
    TrackOutput,
    build_segmenter,
)

__all__ = [
    "CheckpointMismatchError",
    "FrameFeatures",
    "MemoryBank",
    "MemorySegmenter",
    "SegmentOutput",
    "SegmenterConfigError",
    "TrackOutput",
    "build_segmenter",
]
