"""RefVOSDataModule and GLUS sampling on tiny shards written here (frames 24x32, squashed to 16)."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from datamodules.batch import RefVOSBatch
from datamodules.datamodule import RefVOSDataModule, resolve_shards, shard_samples
from datamodules.prepare import prepare_synthetic
from datamodules.records import Expression, RecordError, VideoRecord, encode_rle, frame_member
from datamodules.sampling import (
    build_sample,
    eval_context_indices,
    keep_planned_frames,
    plan_eval,
    plan_train,
    train_context_indices,
    train_query_indices,
)
from datamodules.shards import MANIFEST, Manifest, ShardFormatError, write_shards
from glus_lightning.config import ConfigError, DataConfig, compose

H, W, S = 24, 32, 16
LEVEL = 7  # frame t is a flat grey of value LEVEL * t, so a decoded frame tells its index


def box(t: int, x0: int, width: int) -> np.ndarray:
    """Object mask: a box that moves down one row per frame."""
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[2 + t % 10 : 10 + t % 10, x0 : x0 + width] = 1
    return mask


def make_video(dataset: str, video: str, frames: int = 10) -> VideoRecord:
    """Objects 1 and 2 overlap (columns 10-15); expression "both" refers to the pair."""
    jpegs = []
    for t in range(frames):
        buf = io.BytesIO()
        Image.fromarray(np.full((H, W, 3), LEVEL * t, dtype=np.uint8)).save(buf, "JPEG", quality=95)
        jpegs.append(buf.getvalue())
    shapes = {1: (4, 12), 2: (10, 14), 3: (26, 4)}
    return VideoRecord(
        dataset=dataset,
        video=video,
        frame_names=[f"{video}_{t:03d}" for t in range(frames)],
        height=H,
        width=W,
        expressions=[
            Expression("0", "the left one", (1,)),
            Expression("1", "both", (1, 2)),
            Expression("2", "the right one", (3,)),
            Expression("3", "the middle one", (2,)),
        ],
        frames=jpegs,
        masks={obj: [encode_rle(box(t, *shape)) for t in range(frames)] for obj, shape in shapes.items()},
    )


def write_dataset(root: Path, name: str, videos: int, per_shard: int, frames: int = 10) -> list[str]:
    records = [make_video(name, f"{name}{i:02d}", frames) for i in range(videos)]
    write_shards(records, root / name, name, "train", videos_per_shard=per_shard)
    return [r.video for r in records]


def data_cfg(root: Path, train: list[dict], val: list[dict] | None = None, **overrides):
    values = {
        "root": str(root), "synthetic": None, "train": train, "val": val or train, "num_context": 2, "num_query": 3,
        "max_expressions": 2, "image_size": S, "batch_size": 2, "num_workers": 0, "samples_per_epoch": 8,
        "shuffle_buffer": 4, "seed": 0, "expression_sampling": "uniform",
    }
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {**values, **overrides})


def source(name: str, pattern: str | None = None, weight: float = 1.0) -> dict:
    return {"name": name, "shards": pattern or f"{name}/train-*.tar", "weight": weight}


def epoch_batches(dm: RefVOSDataModule) -> list[RefVOSBatch]:
    return list(dm.train_dataloader())


def signature(batches: list[RefVOSBatch]) -> list[tuple]:
    return [(b.video_ids, b.frame_indices.tolist(), b.expression_ids) for b in batches]


# --- sampling rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [4, 7, 10, 33])
def test_train_context_is_one_random_frame_per_equal_segment(frames):
    rng, c = random.Random(0), 4
    bounds = np.floor(np.linspace(0, frames, c + 1)).astype(int)  # segment i = [bounds[i], bounds[i+1])
    seen = [set() for _ in range(c)]
    for _ in range(300):
        picks = train_context_indices(frames, c, rng)
        assert len(picks) == c
        for i, p in enumerate(picks):
            assert bounds[i] <= p < bounds[i + 1]
            seen[i].add(p)
    covered = sorted(set().union(*seen))
    assert covered == list(range(frames))  # every frame of every segment gets drawn: random within the segment


def test_eval_context_is_the_middle_of_each_segment():
    for frames in (4, 9, 10, 31, 200):
        bounds = np.floor(np.linspace(0, frames, 5)).astype(int)
        picks = eval_context_indices(frames, 4)
        for i, p in enumerate(picks):
            assert abs(p - (bounds[i] + bounds[i + 1] - 1) / 2) <= 0.5
        assert picks == eval_context_indices(frames, 4)  # fixed, no randomness


def test_query_frames_are_consecutive_from_a_random_start():
    rng = random.Random(1)
    starts = Counter()
    for _ in range(400):
        q = train_query_indices(9, 4, rng)
        assert q == list(range(q[0], q[0] + 4))
        starts[q[0]] += 1
    assert sorted(starts) == list(range(6))  # every start 0..T-Q occurs


def test_short_video_and_video_without_expressions_are_refused_by_name():
    record = make_video("ds", "tiny", frames=2)
    with pytest.raises(RecordError, match="ds/tiny: 2 frames, fewer than the 3 query frames"):
        plan_train(record, 2, 3, 2, random.Random(0))
    record = make_video("ds", "mute")
    record.expressions = []
    with pytest.raises(RecordError, match="ds/mute: no expressions"):
        plan_train(record, 2, 3, 2, random.Random(0))


def test_expressions_drawn_without_replacement_up_to_max():
    record, rng = make_video("ds", "v"), random.Random(2)
    sets = set()
    for _ in range(100):
        plan = plan_train(record, 2, 3, 3, rng)
        ids = [e.exp_id for e in plan.expressions]
        assert len(ids) == 3 == len(set(ids))
        sets.add(frozenset(ids))
    assert len(sets) == 4  # all 4 choose 3 subsets occur
    assert len(plan_train(record, 2, 3, 9, rng).expressions) == 4


def test_sample_decodes_the_planned_frames_and_unions_masks_at_full_resolution():
    record = make_video("ds", "v")
    plan = plan_train(record, 2, 3, 4, random.Random(3))
    slim = keep_planned_frames(record, plan)  # what the shuffle buffer holds
    assert sum(len(f) > 0 for f in slim.frames) == len({*plan.context, *plan.query}) < record.num_frames
    sample = build_sample(slim, plan, S)
    assert sample.frames.dtype == torch.uint8 and sample.frames.shape == (5, 3, S, S)
    levels = sample.frames.float().mean(dim=(1, 2, 3)) / LEVEL
    assert torch.allclose(levels, torch.tensor(plan.context + plan.query, dtype=torch.float), atol=0.2)
    for exp, mask in zip(plan.expressions, sample.targets.dense(), strict=True):
        assert mask.dtype == torch.uint8 and mask.shape == (3, H, W)
        for k, t in enumerate(plan.query):
            expected = np.zeros((H, W), dtype=bool)
            for obj in exp.obj_ids:
                expected |= box(t, *{1: (4, 12), 2: (10, 14), 3: (26, 4)}[obj]).astype(bool)
            assert np.array_equal(mask[k].numpy(), expected.astype(np.uint8))
    both = sample.targets.dense()[[e.exp_id for e in plan.expressions].index("1")]
    assert both.max() == 1  # overlapping objects do not sum to 2


def test_eval_plan_takes_every_frame_and_every_expression():
    record = make_video("ds", "v", frames=7)
    plan = plan_eval(record, 2)
    assert plan.query == list(range(7)) and plan.context == eval_context_indices(7, 2)
    assert [e.exp_id for e in plan.expressions] == ["0", "1", "2", "3"]


# --- training stream --------------------------------------------------------------------------


def test_training_batches_have_the_contract_shapes_and_types(tmp_path):
    write_dataset(tmp_path, "a", videos=3, per_shard=2)
    dm = RefVOSDataModule(data_cfg(tmp_path, [source("a")]))
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 4  # 8 samples per epoch in batches of 2
    for b in batches:
        assert isinstance(b, RefVOSBatch)
        assert b.frames.dtype == torch.uint8 and b.frames.shape == (2, 5, 3, S, S)
        assert b.num_context == 2 and b.num_query == 3 and b.frame_indices.shape == (2, 5)
        assert len(b.expressions) == len(b.expression_ids) == len(b.masks) == len(b.expression_objects) == 4
        assert b.expression_video.tolist() == [0, 0, 1, 1]
        assert all(m.dtype == torch.uint8 and m.shape == (3, H, W) for m in b.masks)
        assert b.datasets == ["a", "a"] and b.video_objects == [(1, 2, 3), (1, 2, 3)]
        for v, names in enumerate(b.frame_names):
            assert names == [f"{b.video_ids[v]}_{t:03d}" for t in b.frame_indices[v, 2:].tolist()]
        # frames really are the indexed ones
        levels = b.frames.float().mean(dim=(2, 3, 4)) / LEVEL
        assert torch.allclose(levels, b.frame_indices.float(), atol=0.2)


def test_mixing_follows_the_weights(tmp_path):
    write_dataset(tmp_path, "a", videos=2, per_shard=1)
    write_dataset(tmp_path, "b", videos=2, per_shard=1)
    cfg = data_cfg(tmp_path, [source("a", weight=1.0), source("b", weight=3.0)], samples_per_epoch=600, batch_size=10,
                   max_expressions=1, shuffle_buffer=8)
    counts = Counter(d for b in epoch_batches(RefVOSDataModule(cfg)) for d in b.datasets)
    assert counts["a"] + counts["b"] == 600
    assert abs(counts["b"] / 600 - 0.75) < 0.06  # binomial sd 0.018


def test_training_is_reproducible_from_the_seed_and_new_each_epoch(tmp_path):
    write_dataset(tmp_path, "a", videos=4, per_shard=2)
    cfg = data_cfg(tmp_path, [source("a")])
    dm1, dm2 = RefVOSDataModule(cfg), RefVOSDataModule(cfg)
    first, second = epoch_batches(dm1), epoch_batches(dm2)
    assert signature(first) == signature(second)
    assert all(torch.equal(x.frames, y.frames) for x, y in zip(first, second))
    next_epoch = epoch_batches(dm1)
    assert signature(next_epoch) != signature(first)
    other_seed = epoch_batches(RefVOSDataModule(data_cfg(tmp_path, [source("a")], seed=1)))
    assert signature(other_seed) != signature(first)
    resumed = RefVOSDataModule(cfg)
    resumed.load_state_dict(dm1.state_dict())  # after two epochs: the third one
    assert signature(epoch_batches(resumed)) == signature(epoch_batches(dm1))


def test_two_workers_draw_different_reproducible_streams_and_fill_the_epoch(tmp_path):
    write_dataset(tmp_path, "a", videos=6, per_shard=2)
    cfg = data_cfg(tmp_path, [source("a")], num_workers=2, samples_per_epoch=12)
    loader = RefVOSDataModule(cfg).train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    by_worker = [signature(batches[w::2]) for w in range(2)]  # the loader alternates between workers
    assert by_worker[0] != by_worker[1]
    assert signature(epoch_batches(RefVOSDataModule(cfg))) == signature(batches)  # reproducible with workers too


def test_two_ranks_draw_different_streams(tmp_path, monkeypatch):
    write_dataset(tmp_path, "a", videos=6, per_shard=2)
    cfg = data_cfg(tmp_path, [source("a")], samples_per_epoch=16)
    streams = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = RefVOSDataModule(cfg).train_dataloader()
        streams.append(signature(list(loader)))
        assert len(loader) == 4  # 16 samples per epoch over 2 ranks, batches of 2
    assert streams[0] != streams[1]


# --- corrupt data -----------------------------------------------------------------------------


def write_corrupt_shards(root: Path) -> tuple[Path, Path]:
    """A truncated copy of a good shard, and a shard with a bad-JSON sample and an undecodable frame."""
    write_dataset(root / "tmp", "c", videos=2, per_shard=2)
    good = (root / "tmp" / "c" / "train-000000.tar").read_bytes()
    (root / "a").mkdir(exist_ok=True)
    truncated = root / "a" / "train-000001.tar"
    with tarfile.open(root / "tmp" / "c" / "train-000000.tar") as tar:
        third = tar.getmembers()[2]  # a member of the first video
    truncated.write_bytes(good[: third.offset_data + third.size // 2])
    broken = root / "a" / "train-000002.tar"
    bad_json = make_video("a", "badjson").to_sample()
    bad_json["meta.json"] = b'{"dataset": "a", "video": '
    bad_image = make_video("a", "badimage").to_sample()
    for t in range(10):
        bad_image[frame_member(t)] = b"not an image"
    with wds.TarWriter(str(broken)) as sink:
        sink.write(bad_json)
        sink.write(bad_image)
    return truncated, broken


def test_corrupt_shards_and_samples_are_skipped_logged_and_counted(tmp_path, caplog):
    videos = write_dataset(tmp_path, "a", videos=2, per_shard=2)  # a/train-000000.tar is good
    truncated, broken = write_corrupt_shards(tmp_path)
    cfg = data_cfg(tmp_path, [source("a")], samples_per_epoch=40, num_context=1, num_query=1)
    dm = RefVOSDataModule(cfg)
    with caplog.at_level(logging.WARNING, logger="datamodules.datamodule"):
        batches = epoch_batches(dm)
    assert sum(len(b.video_ids) for b in batches) == 40
    seen = {v for b in batches for v in b.video_ids}
    assert videos[0] in seen and videos[1] in seen and not seen & {"badjson", "badimage"}
    skipped = dm.skipped
    assert skipped["shards"] >= 1 and skipped["samples"] >= 2
    text = caplog.text
    assert f"shard at {truncated}" in text
    assert f"sample at {broken}:a/badjson" in text and "meta.json is not valid JSON" in text
    assert f"sample at {broken}:a/badimage" in text and "not a readable image" in text
    skip_lines = [r for r in caplog.records if "skipped a corrupt" in r.getMessage()]
    assert len(skip_lines) == skipped["shards"] + skipped["samples"]


def test_skips_in_workers_are_summed_in_the_main_process(tmp_path):
    write_dataset(tmp_path, "a", videos=2, per_shard=2)
    write_corrupt_shards(tmp_path)
    dm = RefVOSDataModule(data_cfg(tmp_path, [source("a")], samples_per_epoch=40, num_workers=2))
    epoch_batches(dm)
    assert dm.skipped["shards"] >= 2 and dm.skipped["samples"] >= 2  # both workers meet the bad shards


def test_a_shard_cut_inside_a_tar_header_is_flagged_not_silently_short(tmp_path):
    write_dataset(tmp_path, "c", videos=2, per_shard=2)
    good = (tmp_path / "c" / "train-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "c" / "train-000000.tar") as tar:
        second_video = next(m for m in tar.getmembers() if m.name.startswith("c/c01"))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good[: second_video.offset + 7])  # 7 bytes into the header of the second video
    errors = []
    keys = [raw["__key__"] for raw in shard_samples(str(cut), handler=lambda err: errors.append(err) or True)]
    assert keys == ["c/c00"]  # tarfile alone would end here without a word
    assert len(errors) == 1 and "not whole tar blocks: truncated" in str(errors[0]) and str(cut) in str(errors[0])


def test_a_dataset_without_any_usable_video_raises(tmp_path):
    write_corrupt_shards(tmp_path)
    (tmp_path / "a" / "train-000002.tar").unlink()  # left: only the truncated shard
    dm = RefVOSDataModule(data_cfg(tmp_path, [source("a")]))
    with pytest.raises(RuntimeError, match="training dataset 'a': none of its 1 shards gives a usable video"):
        epoch_batches(dm)
    assert dm.skipped["shards"] >= 1


def test_a_pattern_matching_no_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'nothing/train-\*\.tar'"):
        resolve_shards(str(tmp_path), "nothing/train-*.tar")
    with pytest.raises(FileNotFoundError, match="nothing"):
        RefVOSDataModule(data_cfg(tmp_path, [source("nothing")])).train_dataloader()


def test_brace_and_glob_patterns_relative_or_absolute(tmp_path):
    write_dataset(tmp_path, "a", videos=3, per_shard=1)
    expected = [str(tmp_path / "a" / f"train-00000{i}.tar") for i in range(3)]
    assert resolve_shards(str(tmp_path), "a/train-{000000..000002}.tar") == expected
    assert resolve_shards("/elsewhere", str(tmp_path / "a" / "*.tar")) == expected


def test_bad_weight_is_named(tmp_path):
    write_dataset(tmp_path, "a", videos=1, per_shard=1)
    with pytest.raises(ValueError, match=r"data.train\[0\] \(a\): weight must be > 0"):
        RefVOSDataModule(data_cfg(tmp_path, [source("a", weight=0.0)])).train_dataloader()


# --- evaluation stream ------------------------------------------------------------------------


def test_eval_reads_every_video_once_over_ranks_and_workers(tmp_path, monkeypatch):
    videos = write_dataset(tmp_path, "a", videos=7, per_shard=1) + write_dataset(tmp_path, "b", videos=3, per_shard=2)
    cfg = data_cfg(tmp_path, [source("a")], val=[source("a"), source("b")], num_workers=2)
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank = []
        for b in RefVOSDataModule(cfg).val_dataloader():
            assert b.frames.shape == (1, 2 + 10, 3, S, S) and b.num_query == 10
            assert b.frame_indices[0].tolist() == eval_context_indices(10, 2) + list(range(10))
            assert b.expression_ids == ["0", "1", "2", "3"] and len(b.targets) == 4
            assert all(b.targets.expression_target(e).shape == (10, H, W) for e in range(4))
            per_rank += b.video_ids
        assert per_rank  # 9 shards over 2 ranks x 2 workers: every rank has work
        seen += per_rank
    assert sorted(seen) == sorted(videos)  # all videos, none twice


def test_eval_raises_on_corrupt_data(tmp_path):
    write_dataset(tmp_path, "a", videos=2, per_shard=2)
    truncated, _ = write_corrupt_shards(tmp_path)
    cfg = data_cfg(tmp_path, [source("a")], val=[source("a", "a/train-000001.tar")])
    with pytest.raises((RuntimeError, RecordError), match=str(truncated)):
        list(RefVOSDataModule(cfg).val_dataloader())


def test_synthetic_dataset_is_generated_when_missing(tmp_path):
    root = tmp_path / "syn"
    cfg = data_cfg(root, [source("synthetic", "train/train-*.tar")], val=[source("synthetic", "val/val-*.tar")],
                   synthetic={"num_train": 3, "num_val": 2, "frames": 4, "size": 32, "seed": 0,
                              "objects": [2, 4], "lookalike": 0.0, "twins": 0.5, "naming": "shortest",
                              "twin_motion": "crossing"})
    dm = RefVOSDataModule(cfg)
    dm.prepare_data()
    manifest = json.loads((root / "val" / "manifest.json").read_text())
    assert [b.video_ids[0] for b in dm.val_dataloader()] and manifest["videos"] == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch.datasets == ["synthetic", "synthetic"] and batch.masks[0].shape == (3, 32, 32)


# --- shard format version (manifest.json) ------------------------------------------------------


def _synthetic_cfg(root: Path):
    return data_cfg(root, [source("synthetic", "train/train-*.tar")], val=[source("synthetic", "val/val-*.tar")])


def _edit_manifest(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_future_shard_format_is_refused_naming_manifest_versions_and_what_to_do(tmp_path):
    root = tmp_path / "syn"
    prepare_synthetic(root, seed=0, num_train=2, num_val=1, frames=4, size=32)
    for split, open_loader in (("val", RefVOSDataModule.val_dataloader), ("train", RefVOSDataModule.train_dataloader)):
        manifest = root / split / MANIFEST
        _edit_manifest(manifest, lambda m: m.update(format_version=2, glus_lightning_version="9.0.0"))
        with pytest.raises(ShardFormatError) as raised:
            open_loader(RefVOSDataModule(_synthetic_cfg(root)))
        message = str(raised.value)
        assert message.startswith(f"{manifest}: shard format version 2 (written by glus-lightning 9.0.0)")
        assert "reads shard format version 1 only" in message
        # the command that re-prepares it, from the converter options the manifest records
        assert f"move {root / 'train'} and {root / 'val'} aside" in message
        assert (f"glus prepare synthetic --seed 0 --num-train 2 --num-val 1 --frames 4 --size 32 --objects 2 4 --lookalike 0.0 "
                f"--twins 0.25 --naming colour --twin-motion crossing --out {root}") in message
        _edit_manifest(manifest, lambda m: m.update(format_version=1))
    # `glus predict --input <shard>.tar` reads shards without a pattern: refused too
    from glus_lightning.inference.sources import read_input

    _edit_manifest(root / "val" / MANIFEST, lambda m: m.update(format_version=3))
    with pytest.raises(ShardFormatError, match=r"val/manifest.json: shard format version 3"):
        next(read_input(root / "val" / "val-000000.tar"))
    # a version that is not a number is refused the same way; so is a manifest that is not JSON
    _edit_manifest(root / "val" / MANIFEST, lambda m: m.update(format_version="1"))
    with pytest.raises(ShardFormatError, match=r"val/manifest.json: shard format version '1'"):
        RefVOSDataModule(_synthetic_cfg(root)).val_dataloader()
    (root / "val" / MANIFEST).write_text("{")
    with pytest.raises(ShardFormatError, match=r"val/manifest.json: cannot read this manifest.*glus prepare"):
        RefVOSDataModule(_synthetic_cfg(root)).val_dataloader()


def test_synthetic_data_made_with_other_options_is_refused_not_silently_used(tmp_path):
    root = tmp_path / "syn"
    prepare_synthetic(root, seed=0, num_train=2, num_val=1, frames=4, size=32)
    cfg = compose([f"data.root={root}"]).data
    RefVOSDataModule(cfg).prepare_data()  # the same scenes (other counts and sizes): the shards are used as they are
    crowded = compose([f"data.root={root}", "data.synthetic.lookalike=0.5"]).data
    with pytest.raises(ConfigError, match=r"generated with \{'lookalike': 0.0\}.*asks for \{'lookalike': 0.5\}.*delete"):
        RefVOSDataModule(crowded).prepare_data()
    shortest = compose([f"data.root={root}", "data.synthetic.naming=shortest"]).data
    with pytest.raises(ConfigError, match=r"generated with \{'naming': 'colour'\}.*asks for \{'naming': 'shortest'\}"):
        RefVOSDataModule(shortest).prepare_data()
    settled = compose([f"data.root={root}", "data.synthetic.twin_motion=settled"]).data
    with pytest.raises(ConfigError, match=r"generated with \{'twin_motion': 'crossing'\}.*asks for \{'twin_motion': 'settled'\}"):
        RefVOSDataModule(settled).prepare_data()
    for split in ("train", "val"):  # a manifest written before the options existed: made as the generator was then
        _edit_manifest(root / split / MANIFEST,
                       lambda m: [m["converter"]["options"].pop(k) for k in ("objects", "lookalike", "twins", "naming")])
    before = compose([f"data.root={root}", "data.synthetic.naming=shortest", "data.synthetic.twins=0.5"]).data
    RefVOSDataModule(before).prepare_data()
    with pytest.raises(ConfigError, match=r"generated with \{'twins': 0.5, 'naming': 'shortest'\}"):
        RefVOSDataModule(cfg).prepare_data()  # today's defaults
    with pytest.raises(ConfigError, match="lookalike"):
        RefVOSDataModule(crowded).prepare_data()


def test_manifest_of_before_format_versions_still_loads_and_missing_manifest_warns(tmp_path, caplog):
    root = tmp_path / "syn"
    prepare_synthetic(root, seed=0, num_train=2, num_val=1, frames=4, size=32)
    old_keys = {"dataset", "split", "shards", "videos", "frames", "expressions", "objects", "bytes", "skipped"}
    for split in ("train", "val"):  # exactly what glus prepare wrote before manifests recorded versions
        _edit_manifest(root / split / MANIFEST, lambda m: [m.pop(k) for k in set(m) - old_keys])
        assert set(json.loads((root / split / MANIFEST).read_text())) == old_keys
        assert Manifest.load(root / split).format_version == 1 and Manifest.load(root / split).converter is None
    dm = RefVOSDataModule(_synthetic_cfg(root))
    with caplog.at_level(logging.WARNING):
        assert [b.video_ids for b in dm.val_dataloader()] == [["val_00000"]]
        assert next(iter(dm.train_dataloader())).datasets == ["synthetic", "synthetic"]
    assert "manifest" not in caplog.text
    (root / "val" / MANIFEST).unlink()  # shards without a manifest: read as they are, with a warning naming the folder
    with caplog.at_level(logging.WARNING):
        assert [b.video_ids for b in RefVOSDataModule(_synthetic_cfg(root)).val_dataloader()] == [["val_00000"]]
    assert f"{root / 'val'}: no manifest.json beside these shards" in caplog.text


# --- with a Lightning Trainer ------------------------------------------------------------------


class VideoRecorder(L.LightningModule):
    """Trains one scalar on the frames and records which videos each epoch saw."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: list[list[str]] = []

    def on_train_epoch_start(self) -> None:
        self.seen.append([])

    def training_step(self, batch: RefVOSBatch, batch_idx: int) -> torch.Tensor:
        self.seen[-1] += [f"{v}:{i}" for v, i in zip(batch.video_ids, batch.frame_indices.tolist())]
        return (self.scale * batch.frames.float().mean() / 255 - 1) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_runs_epochs_of_the_configured_length_and_checkpoints_the_epoch(tmp_path):
    write_dataset(tmp_path, "a", videos=4, per_shard=2)
    dm = RefVOSDataModule(data_cfg(tmp_path, [source("a")], samples_per_epoch=6))
    model = VideoRecorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert [len(epoch) for epoch in model.seen] == [6, 6] and trainer.global_step == 6
    assert model.seen[0] != model.seen[1]
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["RefVOSDataModule"]
    assert state == {"epoch": 2}
