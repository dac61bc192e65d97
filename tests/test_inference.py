"""Whole-video inference: prefix KV-cache reuse, `glus predict` outputs and resumable, rank-split submissions."""

from __future__ import annotations

import json
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

from datamodules.datamodule import resolve_shards
from datamodules.records import Expression
from datamodules.shards import write_shards
from datamodules.synthetic import DATASET, synthetic_records
from glus_lightning.backbones import build_backbone
from glus_lightning.backbones.base import PrefixCache
from glus_lightning.checkpoints.state import trainable_state
from glus_lightning.cli import main
from glus_lightning.config import compose, load_group
from glus_lightning.inference.predictor import load_module, segment_video, video_batch
from glus_lightning.inference.sources import Video, read_input, shard_records
from glus_lightning.inference.submission import ANNOTATIONS, write_submission, write_zip
from glus_lightning.inference.writers import LEGEND_ROW, LEGIBLE_WIDTH, PALETTE, write_overlay

FRAMES, WINDOW = 7, 3  # 7 frames in windows of 3: the last window is short


def synthetic_val(root: Path, videos: int, frames: int) -> Path:
    """Synthetic validation videos with two expressions each, one video per shard."""
    records = [replace(r, expressions=r.expressions[:2]) for r in synthetic_records(3, "val", videos, frames, 40)]
    write_shards(records, root / "val", DATASET, "val", videos_per_shard=1)
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_val(tmp_path_factory.mktemp("synthetic"), 1, FRAMES)


@pytest.fixture(scope="module")
def split_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A split of two short videos (two shards) for submissions."""
    return synthetic_val(tmp_path_factory.mktemp("split"), 2, 4)


def tiny_config(data_root: Path, *overrides: str) -> list[str]:
    return [f"data.root={data_root}", "data.num_context=2", f"inference.window={WINDOW}", "segmenter.image_size=64", "seed=1",
            *overrides]


@pytest.fixture(scope="module")
def checkpoint(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the tiny model whose SAM2 object-score head says "present".

    Untrained, that head calls every object absent and SAM2 blanks every mask; tests of masks need some pixels on.
    """
    model = load_module(compose(tiny_config(data_root)))
    head = model.segmenter.sam.sam_mask_decoder.pred_obj_score_head
    with torch.no_grad():
        [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1].bias.fill_(10.0)
    path = tmp_path_factory.mktemp("ckpt") / "present.ckpt"
    torch.save({"state_dict": trainable_state(model, model.state_dict()), "hyper_parameters": dict(model.hparams)}, path)
    return path


@pytest.fixture(scope="module")
def module(data_root: Path, checkpoint: Path):
    return load_module(compose(tiny_config(data_root, f"ckpt_path={checkpoint}")))


def val_urls(cfg: DictConfig) -> list[str]:
    return resolve_shards(cfg.data.root, cfg.data.val[0].shards)


# ------------------------------------------------------------------------------------------ prefix cache
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "internvl"])
def test_prefix_cache_gives_the_outputs_of_the_full_conversation(family: str) -> None:
    torch.manual_seed(0)
    bb = build_backbone(load_group("backbone", f"{family}_tiny"), load_group("prompt", "default")).eval()
    g = torch.Generator().manual_seed(1)
    context, other, query = (torch.randint(0, 256, (n, 3, bb.image_size, bb.image_size), generator=g, dtype=torch.uint8)
                             for n in (2, 2, 3))
    expressions = ["the red circle", "a small blue square moving to the left"]  # different lengths: padded rows
    e = len(expressions)

    def encode(prefix: PrefixCache | None):
        with torch.no_grad():
            return bb.encode(context.expand(e, -1, -1, -1, -1), query.expand(e, -1, -1, -1, -1), expressions, True, prefix)

    full, prefix = encode(None), bb.encode_prefix(context)
    cached = encode(prefix)
    torch.testing.assert_close(cached.seg_hidden, full.seg_hidden, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(cached.lm_loss, full.lm_loss, atol=1e-5, rtol=1e-5)
    assert len(prefix.layers) == bb.hf_model.config.get_text_config().num_hidden_layers
    assert prefix.layers[0][0].shape[0] == 1 and prefix.layers[0][0].shape[2] == len(prefix.ids)
    # the cache is what the query turns attend to: another video's prefix changes the answer
    assert not torch.allclose(encode(bb.encode_prefix(other)).seg_hidden, full.seg_hidden, atol=1e-3)
    encode(prefix)  # reusing a prefix leaves it intact
    assert prefix.layers[0][0].shape[2] == len(prefix.ids)
    if family == "qwen2_5_vl":  # 3-D rope: the continuation's positions start where the prefix's end, not at its length
        assert prefix.next_position < len(prefix.ids)
        shifted = PrefixCache(prefix.ids, prefix.layers, prefix.next_position + 1)
        assert not torch.allclose(encode(shifted).seg_hidden, full.seg_hidden, atol=1e-4)
    # without context frames (data.num_context=0, the ablation) the prefix is the system prompt alone: still exact
    none = context[:0]
    with torch.no_grad():
        bare = bb.encode(none[None].expand(e, -1, -1, -1, -1), query.expand(e, -1, -1, -1, -1), expressions, True)
        bare_cached = bb.encode(none[None].expand(e, -1, -1, -1, -1), query.expand(e, -1, -1, -1, -1), expressions, True,
                                bb.encode_prefix(none))
    torch.testing.assert_close(bare_cached.seg_hidden, bare.seg_hidden, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(bare.seg_hidden, full.seg_hidden, atol=1e-3)  # the context frames mattered


def count_vision_frames(module) -> list[int]:
    """Frames the MLLM's vision tower encodes, counted by a forward hook."""
    seen: list[int] = []
    tower = module.backbone.hf_model.get_submodule(module.backbone.vision_module)
    tower.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    return seen


def test_whole_video_masks_are_identical_with_and_without_prefix_reuse(data_root: Path, checkpoint: Path) -> None:
    on = load_module(compose(tiny_config(data_root, "inference.kv_cache=true", f"ckpt_path={checkpoint}")))
    off = load_module(compose(tiny_config(data_root, "inference.kv_cache=false", f"ckpt_path={checkpoint}")))
    video = next(read_input(val_urls(on.cfg)[0]))
    batch = video_batch(video, video.expressions, on.cfg.data.num_context, on.cfg.data.image_size)
    seen_on, seen_off = count_vision_frames(on), count_vision_frames(off)
    logits_on, logits_off = on.predict_video(batch), off.predict_video(batch)
    e, windows = len(video.expressions), -(-FRAMES // WINDOW)
    assert logits_on.shape[:2] == (e, FRAMES)
    torch.testing.assert_close(logits_on, logits_off, atol=1e-4, rtol=1e-4)
    masks_on, masks_off = logits_on > on.cfg.mask_threshold, logits_off > off.cfg.mask_threshold
    assert masks_on.any() and not masks_on.all()
    assert torch.equal(masks_on, masks_off)
    # every frame once whatever the number of expressions; context frames once per video with the reuse, once per
    # window without it
    assert e > 1
    assert sum(seen_on) == 2 + FRAMES
    assert sum(seen_off) == windows * 2 + FRAMES


def test_predict_step_gives_masks_at_the_targets_size(data_root: Path, module) -> None:
    from datamodules.datamodule import RefVOSDataModule

    cfg = module.cfg
    batch = next(iter(RefVOSDataModule(compose(tiny_config(data_root, "data.num_workers=0")).data).val_dataloader()))
    out = module.predict_step(batch, 0)
    assert out["expression_ids"] == batch.expression_ids and out["frame_names"] == batch.frame_names[0]
    targets = [batch.targets.expression_target(e) for e in range(len(batch.targets))]
    assert [tuple(m.shape) for m in out["masks"]] == [tuple(t.shape) for t in targets]
    assert all(m.dtype == torch.bool for m in out["masks"]) and cfg.inference.window == WINDOW
    assert not module.segmenter.sam.sam_mask_decoder.training


# ------------------------------------------------------------------------------------------ glus predict
def check_outputs(out: Path, frame_names: list[str], size: tuple[int, int], exp_ids: list[str]) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_frames"] == len(frame_names) and (summary["height"], summary["width"]) == size
    assert [e["exp_id"] for e in summary["expressions"]] == exp_ids
    for entry in summary["expressions"]:
        files = sorted(p.name for p in (out / entry["masks"]).iterdir())
        assert files == sorted(f"{name}.png" for name in frame_names)  # every frame, under its own name
        masks = [np.asarray(Image.open(out / entry["masks"] / f"{name}.png")) for name in frame_names]
        assert all(m.shape == size and set(np.unique(m)) <= {0, 255} for m in masks)
        assert entry["frames_with_object"] == sum(bool(m.any()) for m in masks)
        assert entry["mean_area"] == pytest.approx(np.mean([m.mean() / 255 for m in masks]))
    assert summary["window"] == WINDOW and summary["frames_per_second"] > 0
    with Image.open(out / summary["overlay"]) as gif:
        assert gif.n_frames == len(frame_names)
    return summary


def test_predict_a_folder_a_video_file_and_a_shard(data_root: Path, split_root: Path, module, tmp_path: Path) -> None:
    shard = resolve_shards(str(data_root), "val/val-*.tar")[0]
    video = next(read_input(shard))
    folder = tmp_path / "clip"
    folder.mkdir()
    for name, frame in zip(video.frame_names, video.frames, strict=True):
        Image.fromarray(frame).save(folder / f"{name}.png")
    config = tiny_config(data_root, f"ckpt_path={module.cfg.ckpt_path}")

    assert main(["predict", *config, "--input", str(folder), "--expression", "the red circle",
                 "--expression", "The square.", "--out", str(tmp_path / "out")]) == 0
    summary = check_outputs(tmp_path / "out" / "clip", video.frame_names, video.size, ["0", "1"])
    assert [e["text"] for e in summary["expressions"]] == ["the red circle", "The square."]
    # the same frames give the same masks as segmenting them directly (the model is rebuilt from the same seed)
    done: list[int] = []
    direct = segment_video(module, video, [Expression("0", "the red circle", ())], progress=done.append)
    assert done == [WINDOW, WINDOW, FRAMES - 2 * WINDOW]  # after each window, every frame once
    log = (tmp_path / "out" / "predict.log").read_text().splitlines()  # what was printed, also in a file
    assert len(log) == 1 and f"clip: {FRAMES} frames x 2 expressions" in log[0] and "frames/s), peak memory" in log[0]
    assert summary["peak_memory_bytes"] > 2**20 and summary["peak_memory_kind"] == "process peak RSS"
    written = np.stack([np.asarray(Image.open(tmp_path / "out/clip/masks/0" / f"{n}.png")) for n in video.frame_names])
    np.testing.assert_array_equal(written == 255, direct[0])

    split = resolve_shards(str(split_root), "val/val-*.tar")[1]  # a shard's videos, with their own expressions
    assert main(["predict", *config, "--input", split, "--out", str(tmp_path / "shard")]) == 0
    for v in read_input(split):
        check_outputs(tmp_path / "shard" / v.name, v.frame_names, v.size, [e.exp_id for e in v.expressions])

    av = pytest.importorskip("av")
    mp4 = tmp_path / "clip.mp4"
    with av.open(str(mp4), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = video.size[1], video.size[0], "yuv420p"
        for frame in video.frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    assert main(["predict", *config, "inference.overlay=mp4", "--input", str(mp4), "--expression", "the red circle",
                 "--out", str(tmp_path / "mp4")]) == 0
    names = [f"{i:05d}" for i in range(FRAMES)]
    summary = json.loads((tmp_path / "mp4/clip/summary.json").read_text())
    assert summary["overlay"] == "overlay.mp4" and (tmp_path / "mp4/clip/overlay.mp4").stat().st_size > 0
    assert sorted(p.stem for p in (tmp_path / "mp4/clip/masks/0").iterdir()) == names


def test_bad_inputs_fail_with_clear_errors(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(FileNotFoundError, match="no frames"):
        next(read_input(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        next(read_input(tmp_path / "missing.mp4"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="expected a folder of frames"):
        next(read_input(tmp_path / "notes.txt"))
    assert main(["predict", *tiny_config(data_root), "inference.overlay=avi", "--input", str(tmp_path)]) == 2
    assert main(["predict", *tiny_config(data_root), "--input", str(tmp_path / "notes.txt")]) == 2
    assert main(["predict", *tiny_config(data_root), "--submission", "mevis", "--rank", "2", "--world-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "inference.overlay='avi'" in err and "notes.txt" in err and "rank 2 / world size 2" in err
    with pytest.raises(ValueError, match=".gif or .mp4"):
        write_overlay(tmp_path / "o.avi", [np.zeros((4, 4, 3), np.uint8)], [np.zeros((1, 4, 4), bool)], 5, 0.5)



def test_overlay_names_each_expression_in_its_mask_colour(tmp_path: Path) -> None:
    """Each mask is tinted in its palette colour and a legend under the (enlarged) frame names it in that colour."""
    frame = np.full((32, 32, 3), 100, np.uint8)
    masks = [np.zeros((1, 32, 32), bool), np.zeros((1, 32, 32), bool)]
    masks[0][0, :8, :8] = True  # top-left: the first expression
    masks[1][0, 24:, 24:] = True  # bottom-right: the second
    labels = ["the red circle moving up", "the red circle moving down"]
    write_overlay(tmp_path / "o.gif", [frame], masks, 5, 0.5, labels)
    with Image.open(tmp_path / "o.gif") as gif:
        image = np.asarray(gif.convert("RGB")).astype(int)
    factor = LEGIBLE_WIDTH // 32  # 32 px frames are enlarged 10x so the text fits beside them
    assert image.shape == (32 * factor + LEGEND_ROW * 2 + 4, 32 * factor, 3)
    for k, (y, x) in enumerate([(4, 4), (28, 28)]):  # the masks' centres, enlarged: 100 blended with the colour
        expected = 0.5 * 100 + 0.5 * PALETTE[k]
        assert np.abs(image[y * factor, x * factor] - expected).max() <= 8  # GIF palette quantisation
    assert np.abs(image[16 * factor, 16 * factor] - 100).max() <= 8  # untinted where no mask is
    for k in range(2):  # each legend row: a swatch and the sentence, drawn in the expression's colour
        row = image[32 * factor + 2 + k * LEGEND_ROW : 32 * factor + 2 + (k + 1) * LEGEND_ROW]
        coloured = (np.abs(row - PALETTE[k]) <= 8).all(-1)
        assert coloured[:, :LEGEND_ROW].sum() >= (LEGEND_ROW - 6) ** 2  # the swatch
        assert coloured[:, LEGEND_ROW:].sum() > 100  # the text's strokes
        other = (np.abs(row - PALETTE[1 - k]) <= 8).all(-1)
        assert other.sum() == 0
    with pytest.raises(ValueError, match="2 masks for 1 legend labels"):
        write_overlay(tmp_path / "p.gif", [frame], masks, 5, 0.5, labels[:1])


# ------------------------------------------------------------------------------------------ submission
def test_submission_layout_resume_and_rank_split(split_root: Path, module, tmp_path: Path) -> None:
    urls = resolve_shards(str(split_root), "val/val-*.tar")
    assert len(urls) == 2
    records = list(shard_records(urls))
    every = {(r.video, e.exp_id) for r in records for e in r.expressions}
    frames = {r.video: r.frame_names for r in records}
    out = tmp_path / "sub"

    stats = [write_submission(module, urls, out, rank, 2) for rank in (0, 1)]
    assert stats[0].written + stats[1].written == len(every) and min(s.written for s in stats) > 0
    assert stats[0].other_ranks == stats[1].written and stats[0].skipped == 0
    done = {(p.parent.name, p.name) for p in (out / ANNOTATIONS).glob("*/*")}
    assert done == every
    # split by video: every video's expressions were written by one rank (its features computed once)
    assert len(records) >= 2 and all(len(r.expressions) >= 1 for r in records)
    assert [s.written for s in stats] == [sum(len(r.expressions) for r in records[rank::2]) for rank in (0, 1)]
    for video, exp_id in every:
        files = sorted(p.stem for p in (out / ANNOTATIONS / video / exp_id).iterdir())
        assert files == sorted(frames[video])

    # resume: nothing left to do; a lost folder and a crashed run's temp folder are redone, nothing else
    again = write_submission(module, urls, out, 0, 1)
    assert (again.written, again.skipped) == (0, len(every))
    video, exp_id = min(every)
    lost = out / ANNOTATIONS / video / exp_id
    for p in lost.iterdir():
        p.unlink()
    lost.rmdir()
    (lost.parent / f".{exp_id}.crashed.tmp").mkdir()
    again = write_submission(module, urls, out, 0, 1)
    assert (again.written, again.skipped) == (1, len(every) - 1) and lost.is_dir()

    archive = write_zip(out, urls, "mevis")
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
    assert names == {f"{ANNOTATIONS}/{v}/{x}/{f}.png" for v, x in every for f in frames[v]}


def test_zip_refuses_an_incomplete_submission(split_root: Path, module, tmp_path: Path) -> None:
    urls = resolve_shards(str(split_root), "val/val-*.tar")
    first = next(iter(shard_records(urls)))
    assert len(first.expressions) > 1  # so that a split by expression would differ
    assert write_submission(module, urls, tmp_path, 0, 4).written == len(first.expressions)  # rank 0 of 4: the first video
    with pytest.raises(RuntimeError, match="no predictions yet"):
        write_zip(tmp_path, urls, "mevis")


# ------------------------------------------------------------------------------------------ long videos
@pytest.mark.parametrize("keyframes", [False, True])
def test_streamed_inference_memory_does_not_grow_with_video_length(module, keyframes: bool) -> None:
    """Peak tensor memory of segmenting a 1000-frame video chunk by chunk is within 10% of a 100-frame one's
    (sequential), and grows by no more than each frame's prompt and scores from 20 to 200 frames (from keyframes).

    Counted as a GPU's allocator would count it (``LiveTensorBytes``): everything inference makes, not the input
    batch (the video's frames at the model's input size, which stay on the CPU, one chunk at a time on the model's
    device) nor the consumer (masks written as they come). Keeping the low-resolution logits of every frame alone
    would outgrow the bound (checked below). Keyframe mode keeps each frame's prompt and two scores until the tracks
    run (the scorer rates every frame first): bounded here by their bytes (at SAM2-L's 1024 px a frame's image
    features, which it used to keep, are 8 MiB; a frame's prompt and scores are 1 KiB per expression).
    """
    from glus_lightning.masks import masks_from_logits
    from glus_lightning.tensor_memory import LiveTensorBytes

    cfg = module.cfg
    rng = np.random.default_rng(0)
    pool = list(rng.integers(0, 256, (16, 48, 40, 3), dtype=np.uint8))  # 16 distinct frames, cycled
    expressions = [Expression("0", "the red circle", ()), Expression("1", "the blue square", ())]
    refined = module.frame_scorer.refined.clone()
    module.frame_scorer.refined.fill_(True)  # rates by its random weights: any keyframes will do here
    cfg.inference.keyframes = keyframes
    peaks = {}
    try:
        lengths = (20, 200) if keyframes else (100, 1000)
        for length in lengths:
            video = Video("long", [f"{i:05d}" for i in range(length)], [pool[i % len(pool)] for i in range(length)])
            batch = video_batch(video, expressions, cfg.data.num_context, cfg.data.image_size)
            tracker = LiveTensorBytes()
            seen = torch.zeros(len(expressions), length, dtype=torch.long)
            with tracker.mode:
                for rows, frames, logits in module.stream_video(batch):
                    valid = frames >= 0
                    seen[rows[:, None].expand_as(frames)[valid], frames[valid]] += 1
                    per_frame_bytes = logits[0, 0].nelement() * logits.element_size() * len(expressions)
                    masks_from_logits(logits.flatten(0, 1), video.size, cfg.mask_threshold)  # consumed, then dropped
            assert (seen == 1).all()  # every frame of every expression exactly once
            peaks[length] = tracker.peak
    finally:
        cfg.inference.keyframes = False
        module.frame_scorer.refined.copy_(refined)
    short, long = lengths
    extra = long - short
    if not keyframes:
        assert extra * per_frame_bytes > 0.1 * peaks[short]  # the bound would catch keeping every frame's logits
        assert peaks[short] > 0 and peaks[long] <= 1.1 * peaks[short], peaks
        return
    # kept per frame: each expression's prompt and two scores, plus the scorer's inputs and hidden layer while it rates
    prompt_dim, hidden = module.segmenter.prompt_dim, cfg.refine.hidden
    rated = len(expressions) * 4 * (2 * (prompt_dim + 2) + (prompt_dim + 2) + hidden)
    assert peaks[long] - peaks[short] <= extra * rated, peaks
    features = module.segmenter.encode_frames(batch.query_frames[0, :1])
    kept_before = sum(level.nelement() * level.element_size() for level in features.levels) + 2 * per_frame_bytes
    assert kept_before > 2 * rated  # what it kept per frame before (features, memoryless and final logits) breaks the bound


def test_a_prefix_cache_is_shared_by_the_conversations_not_copied_and_never_grows() -> None:
    """``PrefixCache.past(E)`` holds views of the one stored prefix; a forward's layer joins it with its own tokens for
    attention and keeps nothing of them (a ``DynamicCache`` copied the prefix E times and kept every layer's join)."""
    keys, values = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    prefix = PrefixCache(list(range(5)), [(keys, values)], 5)
    past = prefix.past(3)
    layer = past.cache.layers[0]
    assert layer.keys.shape == (3, 2, 5, 4) and layer.keys.untyped_storage().data_ptr() == keys.untyped_storage().data_ptr()
    new_k, new_v = torch.randn(3, 2, 2, 4), torch.randn(3, 2, 2, 4)
    joined_k, joined_v = past.cache.update(new_k, new_v, 0)
    torch.testing.assert_close(joined_k, torch.cat([keys.expand(3, -1, -1, -1), new_k], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(joined_v[:, :, 5:], new_v, rtol=0, atol=0)
    assert past.cache.get_seq_length() == 5 and layer.keys.shape[2] == 5  # nothing appended


def test_bf16_weights_predict_as_the_trainer_computes(data_root: Path, checkpoint: Path, module) -> None:
    """Outside a Trainer, inference enters the autocast of ``trainer.precision``: bf16 frozen weights next to fp32
    trained ones (the demo's vision tower) raised a dtype error without it; the masks match the fp32 model's."""
    half = load_module(compose(tiny_config(data_root, f"ckpt_path={checkpoint}", "backbone.dtype=bfloat16",
                                           "segmenter.dtype=bfloat16", "trainer.precision=bf16-mixed")))
    video = next(read_input(val_urls(module.cfg)[0]))
    full, bf16 = (segment_video(m, video, video.expressions) for m in (module, half))
    for a, b in zip(full, bf16, strict=True):
        assert a.any() and not a.all()
        assert (a == b).mean() > 0.98
    assert not torch.is_autocast_enabled("cpu")  # the caller's code between chunks runs as it was
