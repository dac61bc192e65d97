"""Keyframe propagation: every frame once, in both directions from the keyframe, under its own frame index."""

from __future__ import annotations

import pytest
import torch
from test_segmenter import frames_like, make, prompts_like

from glus_lightning.segmentation.segmenter import propagation_order

T = 6


@pytest.fixture(scope="module")
def video():
    seg = make().eval()
    features = seg.encode_frames(frames_like(seg, T))
    return seg, features, prompts_like(seg, 2, T)


@pytest.mark.parametrize("keyframe", [0, 2, T - 1])
def test_propagation_order_covers_every_frame_once_starting_at_the_keyframe(keyframe):
    forward, backward = propagation_order(T, keyframe)
    assert forward[0] == keyframe
    assert sorted(forward + backward) == list(range(T))
    assert forward == sorted(forward) and backward == sorted(backward, reverse=True)
    assert all(f > keyframe for f in forward[1:]) and all(f < keyframe for f in backward)


def test_propagation_order_rejects_a_frame_outside_the_video():
    with pytest.raises(ValueError, match="keyframe 6 is not a frame of a 6-frame video"):
        propagation_order(T, T)


def reference(seg, features, prompts, keyframe):
    """Independent computation: forward pass from the keyframe, and a fresh backward pass from the keyframe again."""
    forward = list(range(keyframe, T))
    backward = list(range(keyframe, -1, -1))  # the keyframe is segmented again, with an empty memory
    rows = prompts.shape[0]
    out_f = seg.track(seg.select(features, torch.tensor(forward).expand(rows, -1)), prompts[:, forward], frame_ids=forward)
    out_b = seg.track(seg.select(features, torch.tensor(backward).expand(rows, -1)), prompts[:, backward], frame_ids=backward)
    logits = torch.empty(rows, T, *out_f.mask_logits.shape[-2:])
    logits[:, forward] = out_f.mask_logits
    logits[:, backward[1:]] = out_b.mask_logits[:, 1:]
    return logits, out_f, out_b


@torch.no_grad()
@pytest.mark.parametrize("keyframe", [0, 3, T - 1])
def test_keyframe_tracks_match_separate_forward_and_backward_tracks(video, keyframe):
    seg, features, prompts = video
    out = seg.track_from_keyframes(features, prompts, [keyframe, keyframe])
    expected, out_f, out_b = reference(seg, features, prompts, keyframe)
    torch.testing.assert_close(out.mask_logits, expected)
    torch.testing.assert_close(out_b.mask_logits[:, 0], out_f.mask_logits[:, 0])  # the keyframe: same both ways
    if keyframe == 0:  # from the first frame it is plain sequential tracking
        torch.testing.assert_close(out.mask_logits, seg.track(seg.select(features, torch.arange(T).expand(2, -1)), prompts).mask_logits)


@torch.no_grad()
def test_tracks_with_different_keyframes_each_follow_their_own(video):
    seg, features, prompts = video
    out = seg.track_from_keyframes(features, prompts, [T - 1, 1])
    for row, keyframe in enumerate([T - 1, 1]):
        expected, _, _ = reference(seg, features, prompts[row : row + 1], keyframe)
        torch.testing.assert_close(out.mask_logits[row], expected[0])
    assert tuple(out.iou_pred.shape) == tuple(out.object_score_logits.shape) == (2, T)


@torch.no_grad()
def test_segment_without_memory_equals_a_first_step_and_keeps_nothing(video):
    seg, features, prompts = video
    alone = seg.segment_without_memory(features, prompts[0])
    for t in range(T):
        first = seg.track(seg.select(features, torch.tensor([[t]])), prompts[:1, t : t + 1], frame_ids=[t])
        torch.testing.assert_close(alone.mask_logits[t, 0], first.mask_logits[0, 0])
        torch.testing.assert_close(alone.iou_pred[t], first.iou_pred[0, 0])
