"""Keyframe propagation: every frame once, in both directions from the keyframe, under its own frame index; keyframes
are the frames the scorer rates best."""

from __future__ import annotations

import pytest
import torch
from test_segmenter import frames_like, make, prompts_like

from glus_lightning.keyframes.evidence import FrameEvidence
from glus_lightning.keyframes.propagation import pick_keyframes, propagation_order, track_from_keyframes
from glus_lightning.keyframes.scorer import FrameScorer

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
    out = track_from_keyframes(seg, features, prompts, [keyframe, keyframe])
    expected, out_f, out_b = reference(seg, features, prompts, keyframe)
    torch.testing.assert_close(out.mask_logits, expected)
    torch.testing.assert_close(out_b.mask_logits[:, 0], out_f.mask_logits[:, 0])  # the keyframe: same both ways
    if keyframe == 0:  # from the first frame it is plain sequential tracking
        torch.testing.assert_close(out.mask_logits, seg.track(seg.select(features, torch.arange(T).expand(2, -1)), prompts).mask_logits)


@torch.no_grad()
def test_tracks_with_different_keyframes_each_follow_their_own(video):
    seg, features, prompts = video
    out = track_from_keyframes(seg, features, prompts, [T - 1, 1])
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


def scorer_of_iou_pred(prompt_dim: int, refined: bool = True, hidden: int = 4) -> FrameScorer:
    """A scorer whose score rises with SAM2's predicted IoU alone: sigmoid(relu(iou + 10) - 10)."""
    scorer = FrameScorer(prompt_dim, hidden=hidden)
    with torch.no_grad():
        for p in scorer.parameters():
            p.zero_()
        scorer.net[0].weight[0, prompt_dim] = 1.0  # input columns: normalised prompt, IoU, presence
        scorer.net[0].bias[0] = 10.0
        scorer.net[2].weight[0, 0] = 1.0
        scorer.net[2].bias[0] = -10.0
    scorer.refined.fill_(refined)
    return scorer


def evidence_with(iou_pred: torch.Tensor, prompt_dim: int) -> FrameEvidence:
    e, t = iou_pred.shape
    return FrameEvidence(torch.randn(e, t, prompt_dim), iou_pred, torch.randn(e, t))


def test_keyframes_are_the_frames_of_highest_score():
    iou = torch.tensor([[0.1, 0.7, 0.3, -0.2, 0.5, 0.0], [0.9, 0.1, 0.2, 0.3, 0.4, 0.95], [-0.5, -0.1, -0.3, -0.9, -0.2, -0.4]])
    assert pick_keyframes(scorer_of_iou_pred(8), evidence_with(iou, 8)) == [1, 5, 1]


def test_an_unfitted_scorer_is_refused_with_the_command_that_fits_it():
    with pytest.raises(RuntimeError, match="glus refine-scores"):
        pick_keyframes(scorer_of_iou_pred(8, refined=False), evidence_with(torch.rand(2, T), 8))


@torch.no_grad()
@pytest.mark.parametrize("stride", [1, 3])
def test_distinct_keyframes_run_in_one_batched_pass_bit_equal_to_separate_tracks(stride):
    """Five tracks, five different keyframes: one forward and one backward sweep per class of keyframes modulo the
    memory stride (one at SAM2's stride 1), not one per keyframe; each track bit-equal to its own forward and backward
    tracks under its real frame indices (the stride's every-3rd-frame memory rule included), run at the batch size of
    its pass, in its place there: CPU kernels round differently at other batch sizes and places (about 1e-7 here),
    which is no difference of method."""
    seg = make([f"memory.eval_stride={stride}"]).eval()
    features = seg.encode_frames(frames_like(seg, T))
    prompts = prompts_like(seg, 5, T, seed=1)
    keyframes = [4, 0, 5, 2, 3]
    calls: list[int] = []
    real_track = seg.track
    seg.track = lambda *a, **k: calls.append(1) or real_track(*a, **k)
    out = track_from_keyframes(seg, features, prompts, keyframes)
    seg.track = real_track
    residues = len({k % stride for k in keyframes})
    assert len(calls) == 3 * residues  # per pass: the keyframe, the rest forward, backward
    for row, keyframe in enumerate(keyframes):
        group = [i for i, k in enumerate(keyframes) if k % stride == keyframe % stride]  # this track's pass
        expected, _, _ = reference(seg, features, prompts[row : row + 1].expand(len(group), -1, -1), keyframe)
        assert torch.equal(out.mask_logits[row], expected[group.index(row)]), (row, keyframe)
