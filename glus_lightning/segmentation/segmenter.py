"""SAM2 memory-bank segmenter prompted by one embedding per frame (the projected ``[SEG]`` token).

Per frame, as in GLUS: image features -> ``no_mem_embed`` if the bank is empty, else memory attention over
the bank (memories chosen per ``segmenter.memory``, ``conditioning.py``) -> mask decoder with the prompt as
the only sparse token and ``no_mask_embed`` as the dense prompt, single-mask output -> memory encoder on the
predicted mask -> push to the bank.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from sam2.modeling.sam2_base import NO_OBJ_SCORE, SAM2Base
from sam2.modeling.sam2_utils import DropPath
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from glus_lightning.config import SegmenterConfig
from glus_lightning.precision import cast_frozen, torch_dtype
from glus_lightning.segmentation.conditioning import MemoryProtocol, condition_on_memory
from glus_lightning.segmentation.memory import MemoryBank
from glus_lightning.segmentation.sam2_build import SegmenterConfigError, apply_freezing, build_sam2, load_official_checkpoint

BACKPROP = ("full", "checkpointed", "none")  # segmenter.memory.backprop

# SAM2's pixel normalisation (ImageNet statistics), a property of its pretrained image encoder.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


@dataclass
class FrameFeatures:
    """SAM2 image features of frames with any leading shape ``[*]`` (``[F]`` after encoding, ``[N, T]`` per track).

    ``levels`` is the pyramid as SAM2's mask decoder takes it, finest first: ``[*, C/8, S/4, S/4]`` and
    ``[*, C/4, S/8, S/8]`` (already through the decoder's conv_s0 / conv_s1), then ``[*, C, S/16, S/16]``.
    ``pos`` is the top level's sine position encoding ``[1, C, S/16, S/16]``, the same for every frame.
    Indexing (``features[index]``) applies to the leading dims, so frames encoded once are gathered per track.
    """

    levels: tuple[Tensor, ...]
    pos: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.levels[-1].shape[:-3]

    def __getitem__(self, index: object) -> FrameFeatures:
        return FrameFeatures(tuple(level[index] for level in self.levels), self.pos)


@dataclass
class SegmentOutput:
    """One frame of N tracks."""

    mask_logits: Tensor  # [N, 1, S/4, S/4] low-res mask logits
    iou_pred: Tensor  # [N]
    object_score_logits: Tensor  # [N]


@dataclass
class TrackOutput:
    """T frames of N tracks, in the order they were given."""

    mask_logits: Tensor  # [N, T, S/4, S/4]
    iou_pred: Tensor  # [N, T]
    object_score_logits: Tensor  # [N, T]


def cat_tracks(parts: Sequence[TrackOutput]) -> TrackOutput:
    """Frames of the same tracks, concatenated along the frame axis."""
    return TrackOutput(*(torch.cat([getattr(p, f.name) for p in parts], dim=1) for f in fields(TrackOutput)))


def _in_weight_dtype(method: Callable) -> Callable:
    """Run a ``MemorySegmenter`` entry point under ``weight_dtype_compute``."""

    @functools.wraps(method)
    def wrapper(self: MemorySegmenter, *args: Any, **kwargs: Any) -> Any:
        with self.weight_dtype_compute():
            return method(self, *args, **kwargs)

    return wrapper


class MemorySegmenter(nn.Module):
    """Wraps a ``SAM2Base`` (``self.sam``, official state-dict layout) for prompt-embedding video segmentation.

    Frozen parts among the image encoder, memory attention and memory encoder have their dropout and drop-path
    rates zeroed (``without_randomness``): a frozen module is a fixed function, its dropout would only add noise.
    ``backprop`` (``segmenter.memory.backprop``) says how training differentiates through the memory path.
    """

    def __init__(self, sam: SAM2Base, backprop: str, protocol: MemoryProtocol) -> None:
        super().__init__()
        if backprop not in BACKPROP:
            raise ValueError(f"segmenter.memory.backprop={backprop!r} is not valid; valid: {', '.join(BACKPROP)}")
        self.sam = sam
        self.backprop = backprop
        self.protocol = protocol
        self.prompt_dim: int = sam.sam_prompt_embed_dim
        self.image_size: int = sam.image_size
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(3, 1, 1), persistent=False)

    # ------------------------------------------------------------------------------------------ frames
    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the image encoder's first layer holds (bf16 when frozen in bf16 or under ``bf16-true``)."""
        return self.sam.image_encoder.trunk.patch_embed.proj.weight.dtype

    def weight_dtype_compute(self) -> AbstractContextManager:
        """Autocast to the weights' half dtype (``bf16-true``): SAM2's own code makes some inputs in fp32 (grids, position
        encodings), which bf16 weights cannot multiply; fp32 weights keep whatever autocast is in force."""
        dtype = self.input_dtype
        return nullcontext() if dtype == torch.float32 else torch.autocast(self.pixel_mean.device.type, dtype=dtype)

    @_in_weight_dtype
    def encode_frames(self, frames: Tensor) -> FrameFeatures:
        """Image features of uint8 frames ``[*, 3, S, S]``; the image encoder sees each frame once."""
        size = self.image_size
        if frames.dtype != torch.uint8 or frames.dim() < 4 or tuple(frames.shape[-3:]) != (3, size, size):
            raise ValueError(f"encode_frames expects uint8 frames [*, 3, {size}, {size}], got {frames.dtype} {tuple(frames.shape)}")
        lead = frames.shape[:-3]
        pixels = (frames.flatten(0, -4).float() / 255.0 - self.pixel_mean) / self.pixel_std
        out = self.sam.forward_image(pixels.to(self.input_dtype))
        levels = out["backbone_fpn"][-self.sam.num_feature_levels :]
        return FrameFeatures(tuple(level.unflatten(0, lead) for level in levels), out["vision_pos_enc"][-1][:1])

    @staticmethod
    def select(features: FrameFeatures, index: Tensor) -> FrameFeatures:
        """Gather frames along the leading dim (e.g. ``index [E, T]`` of each expression's frames)."""
        if index.dtype != torch.long:
            raise ValueError(f"select expects a long index tensor, got {index.dtype}")
        return features[index]

    def withhold_prompts(self, prompts: Tensor, withheld: Tensor) -> Tensor:
        """``prompts [N, T, D]`` with the frames where ``withheld [N, T]`` is true given SAM2's not-a-point token, the
        prompt SAM2's own decoder gets for a frame it has no click on (one token, where SAM2 pads to two)."""
        no_prompt = self.sam.sam_prompt_encoder.not_a_point_embed.weight[0]
        return torch.where(withheld[..., None], no_prompt.to(prompts.dtype), prompts)

    # ------------------------------------------------------------------------------------------ memory
    def new_memory(self, batch_size: int) -> MemoryBank:
        """An empty bank for ``batch_size`` tracks, keeping every frame SAM2 may still select."""
        sam, protocol = self.sam, self.protocol
        spatial = protocol.farthest_memory(sam.num_maskmem, protocol.eval_stride)
        pointers = sam.max_obj_ptrs_in_encoder - 1 if protocol.object_pointers else 1  # farthest object pointer
        return MemoryBank(batch_size, max(spatial, pointers), protocol.conditioning_frame)

    @_in_weight_dtype
    def step(self, features: FrameFeatures, prompts: Tensor, memory: MemoryBank, frame_idx: int) -> SegmentOutput:
        """Segment one frame of N tracks (``features`` shape ``[N]``, ``prompts [N, prompt_dim]``), then memorise it.

        The direction is read from the bank: a frame before the newest memory tracks backward (SAM2's
        ``track_in_reverse``), so memories and pointer positions count temporal distance the right way.
        """
        n = memory.batch_size
        if tuple(features.shape) != (n,) or tuple(prompts.shape) != (n, self.prompt_dim):
            raise ValueError(
                f"step expects features of shape ({n},) and prompts ({n}, {self.prompt_dim}) for a bank of {n} tracks, "
                f"got {tuple(features.shape)} and {tuple(prompts.shape)}"
            )
        if frame_idx < 0:
            raise ValueError(f"frame_idx must be >= 0, got {frame_idx}")
        if memory.is_empty or not self.protocol.bank:  # no_mem_embed, as a track's first frame
            pix_feat = self._condition(features, None, frame_idx)
        else:  # memory attention; its bank as of now (later pushes must not change a recomputation)
            pix_feat = self._memory_path(self._condition, features, memory.fork(), frame_idx)
        high_res = list(features.levels[:-1]) if self.sam.use_high_res_features_in_sam else None
        masks, gated, iou_pred, obj_scores, obj_ptr = self._decode(pix_feat, high_res, prompts.to(pix_feat.dtype))
        encoder_input = pix_feat if self.protocol.encoder_input == "conditioned" else features.levels[-1]
        maskmem_features, maskmem_pos_enc = self._memory_path(self._encode_memory, encoder_input, gated, obj_scores)
        if self.backprop == "none":
            obj_ptr = obj_ptr.detach()
        memory.push(frame_idx, maskmem_features, maskmem_pos_enc, obj_ptr)
        return SegmentOutput(masks if self.training else gated, iou_pred[:, 0], obj_scores[:, 0])

    def _memory_path(self, fn: Callable, *args: Any) -> Any:
        """``fn`` (memory attention or encoder) as ``backprop`` says: with its graph, checkpointed, or without gradients."""
        if self.backprop == "full" or not torch.is_grad_enabled():
            return fn(*args)
        if self.backprop == "none":
            with torch.no_grad():
                return fn(*args)
        return checkpoint(fn, *args, use_reentrant=False)

    def _encode_memory(self, top: Tensor, gated: Tensor, obj_scores: Tensor) -> tuple[Tensor, Tensor]:
        """SAM2's memory encoder on top-level features ``[N, C, H, W]`` and their (object-score gated) predicted masks.

        Without gating, the object counts as present for SAM2.1's no-object memory embedding too.
        """
        if not self.protocol.gate_by_object_score:
            obj_scores = torch.ones_like(obj_scores)
        masks_for_memory = F.interpolate(gated, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        maskmem_features, maskmem_pos_enc = self.sam._encode_new_memory(
            current_vision_feats=[top.flatten(2).permute(2, 0, 1)],  # SAM2's (HW, N, C) layout
            feat_sizes=[tuple(top.shape[-2:])],
            pred_masks_high_res=masks_for_memory,
            object_score_logits=obj_scores,
            is_mask_from_pts=False,
        )
        return maskmem_features, maskmem_pos_enc[-1]

    @_in_weight_dtype
    def segment_without_memory(self, features: FrameFeatures, prompts: Tensor) -> SegmentOutput:
        """Segment N independent frames as the first frame of a track (``no_mem_embed``), memorising nothing.

        What a keyframe gets: the same output as ``step`` on an empty bank, for any number of frames at once.
        """
        n = features.shape[0]
        if len(features.shape) != 1 or tuple(prompts.shape) != (n, self.prompt_dim):
            raise ValueError(
                f"segment_without_memory expects features of shape (N,) and prompts (N, {self.prompt_dim}), "
                f"got {tuple(features.shape)} and {tuple(prompts.shape)}"
            )
        pix_feat = self._condition(features, None, 0)
        high_res = list(features.levels[:-1]) if self.sam.use_high_res_features_in_sam else None
        masks, gated, iou_pred, obj_scores, _ = self._decode(pix_feat, high_res, prompts.to(pix_feat.dtype))
        return SegmentOutput(masks if self.training else gated, iou_pred[:, 0], obj_scores[:, 0])

    def _condition(self, features: FrameFeatures, memory: MemoryBank | None, frame_idx: int) -> Tensor:
        """Top-level features of N frames conditioned on the bank (``no_mem_embed`` when it is empty or None)."""
        n = features.shape[0]
        top = features.levels[-1]
        vision_top = top.flatten(2).permute(2, 0, 1)  # SAM2's (HW, N, C) layout
        pos_top = features.pos.flatten(2).permute(2, 0, 1).expand(-1, n, -1)
        return condition_on_memory(self.sam, self.protocol, vision_top, pos_top, tuple(top.shape[-2:]), memory, frame_idx)

    def _decode(self, pix_feat: Tensor, high_res: list[Tensor] | None, prompts: Tensor) -> tuple[Tensor, ...]:
        """SAM2's mask decoder with the prompt as its single sparse token.

        Returns the raw single-mask logits, the same masks blanked where the object score says "absent"
        (SAM2's hard choice, what it memorises and outputs at inference; raw logits keep the mask loss's
        gradient when the score is wrong), IoU and object-score predictions ``[N, 1]`` and object pointers.
        """
        sam = self.sam
        n = pix_feat.shape[0]
        _, dense = sam.sam_prompt_encoder(points=None, boxes=None, masks=None)  # no_mask_embed everywhere
        masks, iou_pred, tokens, obj_scores = sam.sam_mask_decoder(
            image_embeddings=pix_feat,
            image_pe=sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=prompts[:, None],
            dense_prompt_embeddings=dense.expand(n, -1, -1, -1),
            multimask_output=False,  # the mask decoder's stability fallback (at eval) is set at build time
            repeat_image=False,
            high_res_features=high_res,
        )
        masks = masks.float()
        obj_ptr = sam.obj_ptr_proj(tokens[:, 0])
        if not sam.pred_obj_scores:
            return masks, masks, iou_pred, obj_scores, obj_ptr
        if not self.protocol.gate_by_object_score:  # the GLUS reference: its object-score head was never trained
            return masks, masks, iou_pred, obj_scores, obj_ptr
        present = obj_scores > 0
        gated = torch.where(present[:, :, None, None], masks, NO_OBJ_SCORE)
        if sam.use_obj_ptrs_in_encoder:  # pointer of an absent object: (partly) SAM2's learned no-object pointer
            weight = obj_scores.sigmoid() if sam.soft_no_obj_ptr else present.to(obj_ptr.dtype)
            if sam.fixed_no_obj_ptr:
                obj_ptr = weight * obj_ptr
            obj_ptr = obj_ptr + (1 - weight) * sam.no_obj_ptr
        return masks, gated, iou_pred, obj_scores, obj_ptr

    def track(
        self,
        features: FrameFeatures,
        prompts: Tensor,
        memory: MemoryBank | None = None,
        frame_ids: Sequence[int] | None = None,
    ) -> TrackOutput:
        """Segment T frames of N tracks in the given order (``features [N, T]``, ``prompts [N, T, prompt_dim]``).

        ``frame_ids`` (default ``0..T-1``) are the frames' indices in their video; descending ids propagate
        backward. Pass ``memory`` to continue from an earlier window; by default a new bank is used.
        """
        if len(features.shape) != 2 or tuple(prompts.shape) != (*features.shape, self.prompt_dim):
            raise ValueError(
                f"track expects features of shape (N, T) and prompts (N, T, {self.prompt_dim}), "
                f"got {tuple(features.shape)} and {tuple(prompts.shape)}"
            )
        n, t = features.shape
        frame_ids = list(range(t)) if frame_ids is None else [int(f) for f in frame_ids]
        if len(frame_ids) != t:
            raise ValueError(f"track got {len(frame_ids)} frame_ids for {t} frames")
        memory = self.new_memory(n) if memory is None else memory
        outs = [self.step(features[:, i], prompts[:, i], memory, f) for i, f in enumerate(frame_ids)]
        return TrackOutput(
            mask_logits=torch.cat([o.mask_logits for o in outs], dim=1),
            iou_pred=torch.stack([o.iou_pred for o in outs], dim=1),
            object_score_logits=torch.stack([o.object_score_logits for o in outs], dim=1),
        )


def build_segmenter(cfg: SegmenterConfig) -> MemorySegmenter:
    """The configured SAM2 (official architecture or the test size), official weights if set, frozen per config."""
    if cfg.memory.backprop == "none" and cfg.train_memory:
        raise SegmenterConfigError(
            "segmenter.memory.backprop=none runs memory attention and the memory encoder without gradients, "
            "so segmenter.train_memory=true would train nothing there: set train_memory=false or backprop=full|checkpointed"
        )
    if not 0.0 <= cfg.memory.unprompted_frames < 1.0:
        raise SegmenterConfigError(f"segmenter.memory.unprompted_frames={cfg.memory.unprompted_frames} must be in [0, 1)")
    sam = build_sam2(cfg)
    if cfg.checkpoint is not None:
        load_official_checkpoint(sam, cfg.checkpoint, f"SAM2 {cfg.version} size {cfg.size} (max_memories {cfg.max_memories})")
    apply_freezing(sam, cfg)
    cast_frozen(sam, torch_dtype(cfg.dtype, "segmenter.dtype"))  # what trains stays fp32 (precision.py)
    for part in (sam.image_encoder, sam.memory_attention, sam.memory_encoder):
        if not any(p.requires_grad for p in part.parameters()):
            without_randomness(part)
    m = cfg.memory
    sam.memory_temporal_stride_for_eval = m.eval_stride  # SAM2's own name for it, kept in agreement
    protocol = MemoryProtocol(m.conditioning_frame, m.object_pointers, m.temporal_encoding, m.eval_stride,
                              m.gate_by_object_score, m.encoder_input, m.bank)
    return MemorySegmenter(sam, m.backprop, protocol)


def without_randomness(module: nn.Module) -> None:
    """Zero every dropout and drop-path rate in ``module`` (``nn.Dropout``, SAM2's attention ``dropout_p`` and
    ``DropPath``): in training mode it then computes what it computes in eval mode, so a frozen part is a fixed function
    without being held in eval mode (Lightning warns about eval-mode modules at fit start; every mode switch of the
    model, e.g. after validation, would have to restore it)."""
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
        elif isinstance(sub, DropPath):
            sub.drop_prob = 0.0
        if isinstance(getattr(sub, "dropout_p", None), float):
            sub.dropout_p = 0.0
