"""Which memories a frame attends to, and the memory-attention input built from them.

Two protocols share this code (``segmenter.memory``): SAM2's own (the track's first frame is a conditioning frame
attended always, the ``num_maskmem - 1`` nearest other frames, object pointers, temporal position encodings) and the
GLUS reference's (the ``num_maskmem`` nearest frames, no conditioning frame, no pointers, no temporal encoding). With
SAM2's settings the result equals ``SAM2Base._prepare_memory_conditioned_features`` (tested); SAM2's function cannot
express the reference (it requires a conditioning frame and always adds temporal encodings).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sam2.modeling.sam2_base import SAM2Base
from sam2.modeling.sam2_utils import get_1d_sine_pe
from torch import Tensor

from glus_lightning.segmentation.memory import MemoryBank

ENCODER_INPUTS = ("raw", "conditioned")


@dataclass(frozen=True)
class MemoryProtocol:
    """How memories are chosen and used (``segmenter.memory`` less ``backprop``)."""

    conditioning_frame: bool  # the first frame of a track is attended always (SAM2)
    object_pointers: bool  # SAM2's object pointers join the memory tokens
    temporal_encoding: bool  # SAM2's learned temporal position encoding of spatial memories
    eval_stride: int  # at eval: the previous frame, then every eval_stride-th frame further back
    gate_by_object_score: bool  # masks blanked where SAM2's object-score head says "absent"
    encoder_input: str  # memory encoder input: raw image features (SAM2) or memory-conditioned ones
    bank: bool = True  # False: every frame is segmented as a track's first, never attending to memories (an ablation)

    def __post_init__(self) -> None:
        if self.eval_stride < 1:
            raise ValueError(f"segmenter.memory.eval_stride={self.eval_stride}: must be >= 1")
        if self.encoder_input not in ENCODER_INPUTS:
            raise ValueError(f"segmenter.memory.encoder_input={self.encoder_input!r} is not valid; valid: {', '.join(ENCODER_INPUTS)}")

    def spatial_slots(self, num_maskmem: int) -> range:
        """Temporal positions of the non-conditioning memories: ``t_rel = num_maskmem - t_pos`` frames back."""
        return range(1 if self.conditioning_frame else 0, num_maskmem)

    def farthest_memory(self, num_maskmem: int, stride: int) -> int:
        """How many frames back the farthest spatial memory can be (what a bank must keep)."""
        farthest_rel = max((num_maskmem - t for t in self.spatial_slots(num_maskmem)), default=1)
        return 1 if farthest_rel <= 1 else (farthest_rel - 1) * stride + 1


def memory_frame(frame_idx: int, t_rel: int, stride: int, reverse: bool) -> int:
    """The frame ``t_rel`` memory slots before ``frame_idx``: the previous frame, then every ``stride``-th one (SAM2's rule)."""
    if t_rel == 1:
        return frame_idx + 1 if reverse else frame_idx - 1
    if reverse:
        return -(-(frame_idx + 2) // stride) * stride + (t_rel - 2) * stride
    return ((frame_idx - 2) // stride) * stride - (t_rel - 2) * stride


def condition_on_memory(sam: SAM2Base, protocol: MemoryProtocol, vision_top: Tensor, pos_top: Tensor,
                        size: tuple[int, int], memory: MemoryBank | None, frame_idx: int) -> Tensor:
    """Top-level features ``(HW, N, C)`` of N frames conditioned on ``memory`` -> ``[N, C, H, W]``.

    An empty bank (or none) adds ``no_mem_embed``, as SAM2's ``directly_add_no_mem_embed`` does.
    """
    n, c = vision_top.shape[1], sam.hidden_dim
    h, w = size
    if memory is None or memory.is_empty:
        return (vision_top + sam.no_mem_embed).permute(1, 2, 0).view(n, c, h, w)
    reverse = memory.is_reverse(frame_idx)
    stride = 1 if sam.training else protocol.eval_stride
    cond = memory.output_dict["cond_frame_outputs"]
    recent = memory.output_dict["non_cond_frame_outputs"]
    chosen = [(0, entry) for entry in cond.values()]
    for t_pos in protocol.spatial_slots(sam.num_maskmem):
        entry = recent.get(memory_frame(frame_idx, sam.num_maskmem - t_pos, stride, reverse))
        if entry is not None:
            chosen.append((t_pos, entry))
    tokens, positions = [], []
    for t_pos, entry in chosen:
        tokens.append(entry["maskmem_features"].flatten(2).permute(2, 0, 1))
        pos = entry["maskmem_pos_enc"][-1].flatten(2).permute(2, 0, 1)
        positions.append(pos + sam.maskmem_tpos_enc[sam.num_maskmem - t_pos - 1] if protocol.temporal_encoding else pos)
    num_pointer_tokens = 0
    if protocol.object_pointers:
        pointers, pointer_pos = object_pointer_tokens(sam, memory, frame_idx, reverse, n)
        if pointers is not None:
            tokens.append(pointers)
            positions.append(pointer_pos)
            num_pointer_tokens = pointers.shape[0]
    if not tokens:  # no memory within reach (e.g. a stride that skips every stored frame)
        return (vision_top + sam.no_mem_embed).permute(1, 2, 0).view(n, c, h, w)
    out = sam.memory_attention(
        curr=[vision_top], curr_pos=[pos_top], memory=torch.cat(tokens), memory_pos=torch.cat(positions),
        num_obj_ptr_tokens=num_pointer_tokens,
    )
    return out.permute(1, 2, 0).view(n, c, h, w)


def object_pointer_tokens(sam: SAM2Base, memory: MemoryBank, frame_idx: int, reverse: bool,
                          n: int) -> tuple[Tensor | None, Tensor | None]:
    """SAM2's object-pointer tokens and their temporal encodings: the conditioning frames' pointers and those of up to
    ``max_obj_ptrs_in_encoder - 1`` frames just behind ``frame_idx`` (``(P, N, mem_dim)`` each, or None)."""
    c = sam.hidden_dim
    max_pointers = sam.max_obj_ptrs_in_encoder  # the stream is open-ended: SAM2's min(num_frames, max) is the max
    cond = memory.output_dict["cond_frame_outputs"]
    if not sam.training and sam.only_obj_ptrs_in_the_past_for_eval:
        cond = {t: e for t, e in cond.items() if (t >= frame_idx if reverse else t <= frame_idx)}
    sign = -1 if reverse else 1
    found = [((frame_idx - t) * sign if sam.use_signed_tpos_enc_to_obj_ptrs else abs(frame_idx - t), e["obj_ptr"])
             for t, e in cond.items()]
    recent = memory.output_dict["non_cond_frame_outputs"]
    for t_diff in range(1, max_pointers):
        t = frame_idx + t_diff if reverse else frame_idx - t_diff
        if t < 0:
            break
        if t in recent:
            found.append((t_diff, recent[t]["obj_ptr"]))
    if not found:
        return None, None
    distances, pointers = zip(*found, strict=True)
    ptrs = torch.stack(pointers)  # (P, N, C)
    if sam.add_tpos_enc_to_obj_ptrs:
        dim = c if sam.proj_tpos_enc_in_obj_ptrs else sam.mem_dim
        t = torch.tensor(distances, device=ptrs.device)
        pos = sam.obj_ptr_tpos_proj(get_1d_sine_pe(t / (max_pointers - 1), dim=dim))
        pos = pos.unsqueeze(1).expand(-1, n, sam.mem_dim)
    else:
        pos = ptrs.new_zeros(len(distances), n, sam.mem_dim)
    if sam.mem_dim < c:  # a pointer becomes C / mem_dim tokens
        ptrs = ptrs.reshape(-1, n, c // sam.mem_dim, sam.mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
        pos = pos.repeat_interleave(c // sam.mem_dim, dim=0)
    return ptrs, pos
