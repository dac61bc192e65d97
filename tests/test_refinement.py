"""Keyframe self-refinement end to end on the tiny synthetic data: targets, scorer, keyframe inference, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli_fit import tiny_run
from test_keyframes import scorer_of_iou_pred
from test_module import tiny_config

from datamodules.batch import RefVOSBatch
from datamodules.datamodule import RefVOSDataModule
from glus_lightning.checkpoints.checkpoint_io import load_checkpoint
from glus_lightning.cli import main
from glus_lightning.config import compose
from glus_lightning.inference.command import predict_to_folder
from glus_lightning.inference.predictor import load_module
from glus_lightning.inference.sources import record_video, shard_records
from glus_lightning.keyframes.refinement import ScoreTargets, collect_targets, fit_scorer, keyframe_targets, training_videos
from glus_lightning.module import GLUSModule
from glus_lightning.runner import fit, validate


def val_video(cfg) -> RefVOSBatch:
    return next(iter(RefVOSDataModule(cfg.data).val_dataloader()))


@pytest.fixture(scope="module")
def model(data_root: Path) -> GLUSModule:
    torch.manual_seed(0)
    return GLUSModule(tiny_config(data_root, "inference.window=4")).eval()


def test_targets_are_the_measured_iou_of_memoryless_masks(model: GLUSModule, data_root: Path) -> None:
    batch = val_video(model.cfg)
    evidence = model.frame_evidence(batch)
    targets = keyframe_targets(evidence.mask_logits, batch.targets, model.cfg.mask_threshold)
    num_exp, num_frames = len(batch.expressions), batch.num_query
    assert targets.shape == (num_exp, num_frames)
    for e in range(num_exp):
        target = batch.targets.expression_target(e)
        for t in range(num_frames):  # independent: segment frame t alone as the first frame of a fresh track
            alone = model.segmenter.track(model.segmenter.select(evidence.features, torch.tensor([[t]])),
                                          evidence.prompts[e : e + 1, t : t + 1], frame_ids=[t])
            logits = torch.nn.functional.interpolate(alone.mask_logits[:, :1], size=tuple(target.shape[-2:]),
                                                     mode="bilinear", align_corners=False)[0, 0]
            pred = (logits > model.cfg.mask_threshold).numpy()
            gt = target[t].numpy().astype(bool)
            expected = (pred & gt).sum() / (pred | gt).sum() if gt.any() else 0.0
            assert targets[e, t].item() == pytest.approx(float(expected), abs=1e-6)


def test_scorer_learns_its_targets_and_keyframe_inference_runs(model: GLUSModule, data_root: Path) -> None:
    videos = list(training_videos(model.cfg.data, 3))
    assert [b.video_ids[0] for b in videos] == ["train_00000", "train_00001", "train_00002"]
    targets = collect_targets(model, videos)
    rows = sum(len(b.expressions) * b.num_query for b in videos)
    assert targets.inputs.shape == (rows, model.segmenter.prompt_dim + 2) and len(targets.groups.unique()) == sum(
        len(b.expressions) for b in videos)
    frames = [t for b in videos for _ in b.expressions for t in range(b.num_query)]  # rows: video, expression, frame
    assert targets.frames.tolist() == frames
    scorer = model.frame_scorer
    before = [p.clone() for p in scorer.parameters()]
    stats = fit_scorer(scorer, targets, steps=200, lr=1e-2)
    assert stats.l1_after < stats.l1_before and bool(scorer.refined)
    with torch.no_grad():
        scores = scorer(targets.inputs)
    groups = [targets.groups == g for g in targets.groups.unique()]
    at_best_score = [float(targets.targets[rows][scores[rows].argmax()]) for rows in groups]
    assert stats.keyframe_iou == pytest.approx(np.mean(at_best_score))
    assert stats.oracle_iou == pytest.approx(np.mean([float(targets.targets[rows].max()) for rows in groups]))
    first = [iou for iou, t in zip(targets.targets.tolist(), frames, strict=True) if t == 0]
    assert stats.first_frame_iou == pytest.approx(sum(first) / len(first)) and len(first) == len(targets.groups.unique())
    assert not any(p.requires_grad for p in scorer.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, scorer.parameters()))


@torch.no_grad()
def test_keyframe_inference_tracks_each_expression_from_its_best_rated_frame(data_root: Path) -> None:
    torch.manual_seed(0)
    model = GLUSModule(tiny_config(data_root, "inference.window=4", "inference.keyframes=true")).eval()
    model.frame_scorer.load_state_dict(scorer_of_iou_pred(model.segmenter.prompt_dim, hidden=model.cfg.refine.hidden).state_dict())
    batch = val_video(model.cfg)
    logits = model.predict_video(batch)
    evidence = model.frame_evidence(batch)
    seg, num_frames = model.segmenter, batch.num_query
    keyframes = evidence.iou_pred.argmax(1).tolist()  # the scorer rates frames by SAM2's IoU alone
    assert len(set(keyframes)) > 1 or keyframes[0] != 0, "pick a video whose keyframes are not all frame 0"
    for e, keyframe in enumerate(keyframes):  # independent: a forward track from the keyframe, a fresh backward one
        forward, backward = list(range(keyframe, num_frames)), list(range(keyframe, -1, -1))
        prompts = evidence.prompts[e : e + 1]
        ahead = seg.track(seg.select(evidence.features, torch.tensor([forward])), prompts[:, forward], frame_ids=forward)
        behind = seg.track(seg.select(evidence.features, torch.tensor([backward])), prompts[:, backward], frame_ids=backward)
        torch.testing.assert_close(logits[e, forward], ahead.mask_logits[0])
        torch.testing.assert_close(logits[e, backward[1:]], behind.mask_logits[0, 1:])


def test_keyframe_inference_without_a_refined_scorer_says_what_to_run(data_root: Path) -> None:
    torch.manual_seed(0)
    module = GLUSModule(tiny_config(data_root, "inference.keyframes=true")).eval()
    with pytest.raises(RuntimeError, match="glus refine-scores"):
        module.predict_video(val_video(module.cfg))


def test_targets_round_trip_through_safetensors(tmp_path: Path) -> None:
    targets = ScoreTargets(torch.rand(5, 4), torch.rand(5), torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 0, 1, 2]))
    loaded = ScoreTargets.load(targets.save(tmp_path / "t.safetensors"))
    for name in ("inputs", "targets", "groups", "frames"):
        assert torch.equal(getattr(loaded, name), getattr(targets, name))


def test_refine_scores_command_then_keyframe_predict_writes_every_frame_under_its_name(data_root: Path, tmp_path: Path) -> None:
    overrides = [f"data.root={data_root}", "data.num_workers=0", "data.num_context=2", "data.num_query=3",
                 f"run_dir={tmp_path}", "refine.videos=2", "refine.steps=20", "inference.overlay=none"]
    out = tmp_path / "refined.ckpt"
    assert main(["refine-scores", *overrides, "--out", str(out), "--no-progress"]) == 0
    checkpoint = load_checkpoint(out)
    assert bool(checkpoint["state_dict"]["frame_scorer.refined"])
    assert ScoreTargets.load(tmp_path / "refined.targets.safetensors").targets.numel() > 0

    cfg = compose([*overrides, f"ckpt_path={out}", "inference.keyframes=true"])
    module = load_module(cfg)
    assert bool(module.frame_scorer.refined)
    record = next(shard_records(sorted(str(p) for p in (data_root / "val").glob("*.tar"))))
    video = record_video(record)
    predict_to_folder(module, video, [], tmp_path / "pred", source="test")
    batch = val_video(cfg)
    logits = module.predict_video(batch)
    for e, expression in enumerate(video.expressions):
        written = sorted(p.stem for p in (tmp_path / "pred" / "masks" / expression.exp_id).glob("*.png"))
        assert written == sorted(video.frame_names)
        for t, name in enumerate(video.frame_names):
            mask = np.asarray(Image.open(tmp_path / "pred" / "masks" / expression.exp_id / f"{name}.png")) > 0
            expected = torch.nn.functional.interpolate(logits[e, t][None, None].float(), size=video.size, mode="bilinear",
                                                       align_corners=False)[0, 0] > cfg.mask_threshold
            assert np.array_equal(mask, expected.numpy()), (expression.exp_id, name)


def test_fit_with_keyframes_refines_the_scorer_before_validation_and_checkpoints_it(tmp_path: Path) -> None:
    cfg = compose([*tiny_run(tmp_path), "trainer.max_steps=2", "inference.keyframes=true", "refine.videos=2", "refine.steps=10"])
    results = fit(cfg)
    run = tmp_path / "runs" / "demo" / "version_0"
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert bool(state["frame_scorer.refined"]) and "frame_scorer.net.0.weight" in state
    # the checkpoint holds the scorer the final validation used: validating it from the file gives the same J&F
    again = validate(compose([*tiny_run(tmp_path), "inference.keyframes=true", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]))
    assert again["val/J&F"] == pytest.approx(results["val/J&F"], abs=1e-6)
    events = EventAccumulator(str(run)).Reload()
    assert "refine/keyframe_iou" in events.Tags()["scalars"]
