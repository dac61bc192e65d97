"""``glus prepare revos`` and ``glus prepare lv-vis``: bit-exact round trips, no-target and category expressions, bad
input, the CLI, and one GLUS-A training step on tiny data of all five training datasets."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_official import (
    decode_rle_independently,
    revos_video_name,
    write_tiny_lv_vis,
    write_tiny_mevis,
    write_tiny_ref_youtube_vos,
    write_tiny_revos,
)
from omegaconf import OmegaConf
from test_prepare import check_manifest, expected_text, read_shards

from datamodules.formats import ConversionError
from datamodules.prepare import prepare_official
from datamodules.records import VideoRecord
from datamodules.shards import MANIFEST, Manifest, ShardFormatError, check_manifest_format

# ---------------------------------------------------------------- ReVOS


def test_revos_round_trip_is_bit_identical_and_keeps_no_target_expressions(tmp_path: Path) -> None:
    root = write_tiny_revos(tmp_path / "ReVOS", {"train": 3, "valid": 2})
    mask_dict = json.loads((root / "mask_dict.json").read_text())
    for split, count in (("train", 3), ("valid", 2)):  # one root, one mask_dict for both splits
        manifest = prepare_official("revos", root, split, tmp_path / "out", videos_per_shard=2, skip_bad=False, min_frames=1)
        meta = json.loads((root / f"meta_expressions_{split}_.json").read_text())["videos"]
        records = read_shards(tmp_path / "out" / split)
        assert [r.video for r in records] == list(meta) == [revos_video_name(split, v) for v in range(count)]
        assert all(r.dataset == "revos" and "/" not in r.key.split("/", 1)[1] for r in records)  # slashes of names kept in meta only
        no_target = 0
        for record in records:
            entry = meta[record.video]
            assert record.frame_names == entry["frames"]
            for name, data in zip(record.frame_names, record.frames):
                assert data == (root / "JPEGImages" / record.video / f"{name}.jpg").read_bytes()
            assert [e.exp_id for e in record.expressions] == list(entry["expressions"])
            for exp in record.expressions:
                source = entry["expressions"][exp.exp_id]
                assert exp.text == expected_text(source["exp"])
                shown = [a for a in source["anno_id"] if any(mask_dict[a])]  # objects null in every frame add nothing
                assert exp.obj_ids == tuple(sorted(o for o, a in zip(source["obj_id"], source["anno_id"]) if a in shown))
                no_target += not shown
                for t in range(record.num_frames):
                    truth = np.zeros((record.height, record.width), np.uint8)
                    for anno in source["anno_id"]:
                        truth |= decode_rle_independently(mask_dict[anno][t], record.height, record.width)
                    np.testing.assert_array_equal(record.expression_mask(exp, t), truth)
            for obj_id, rles in record.masks.items():
                anno = next(a for e in entry["expressions"].values() for o, a in zip(e["obj_id"], e["anno_id"]) if o == obj_id)
                assert rles == mask_dict[anno]  # RLE copied unchanged
        # per video: exp 2 (empty id lists) and exp 3 (an object null in every frame) have no target; exp 5 keeps box 1 only
        assert no_target == 2 * count and manifest.no_target_expressions == no_target
        assert records[1].expressions[5].obj_ids == (1,) and records[1].expressions[2].obj_ids == ()
        check_manifest(tmp_path / "out" / split, records, shards=(count + 1) // 2)


def _revos_meta(root: Path) -> Path:
    return root / "meta_expressions_train_.json"


def _revos_edit(path: Callable[[Path], Path], edit: Callable[[dict, str], None]) -> Callable[[Path, str], None]:
    def apply(root: Path, video: str) -> None:
        data = json.loads(path(root).read_text())
        edit(data, video)
        path(root).write_text(json.dumps(data))
    return apply


def _first_anno(root: Path, video: str) -> str:
    return json.loads(_revos_meta(root).read_text())["videos"][video]["expressions"]["0"]["anno_id"][0]


def _bad_rle(root: Path, video: str) -> None:
    anno = _first_anno(root, video)
    _revos_edit(lambda r: r / "mask_dict.json", lambda d, v: d[anno][0].update(counts="0"))(root, video)


BAD_REVOS = {  # name -> (edit of the second train video, words the message must contain)
    "missing frame": (lambda r, v: (r / "JPEGImages" / v / "00002.jpg").unlink(), ["00002.jpg", "missing"]),
    "malformed rle": (_bad_rle, ["expression 0", "mask_dict.json", "frame 0", "malformed RLE"]),
    "anno id missing": (
        lambda r, v: _revos_edit(lambda r: r / "mask_dict.json", lambda d, _: d.pop(_first_anno(r, v)))(r, v),
        ["expression 0", "no mask", "anno_id"],
    ),
    "ids of different lengths": (
        _revos_edit(_revos_meta, lambda d, v: d["videos"][v]["expressions"]["1"].update(obj_id=[1])),
        ["expression 1", "differ in length"],
    ),
    "too short": (
        _revos_edit(_revos_meta, lambda d, v: d["videos"][v].update(frames=d["videos"][v]["frames"][:3])),
        ["3 usable frames", "min_frames=4"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_REVOS))
def test_bad_revos_video_is_named_or_skipped(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    edit, words = BAD_REVOS[case]
    root = write_tiny_revos(tmp_path / "ReVOS", {"train": 3})
    bad = revos_video_name("train", 1)
    edit(root, bad)
    with pytest.raises(ConversionError) as err:
        prepare_official("revos", root, "train", tmp_path / "strict", videos_per_shard=5, skip_bad=False, min_frames=4)
    assert bad in str(err.value) and all(w in str(err.value) for w in words), str(err.value)
    capsys.readouterr()
    manifest = prepare_official("revos", root, "train", tmp_path / "lenient", videos_per_shard=5, skip_bad=True, min_frames=4)
    assert f"skipping video {bad!r}" in capsys.readouterr().err
    assert [s["video"] for s in manifest.skipped] == [bad] and manifest.no_target_expressions == 4  # the 2 kept videos' only
    assert [r.video for r in read_shards(tmp_path / "lenient" / "train")] == [revos_video_name("train", v) for v in (0, 2)]


def test_revos_split_without_its_meta_file_is_named(tmp_path: Path) -> None:
    root = write_tiny_revos(tmp_path / "ReVOS", {"train": 1})
    with pytest.raises(ConversionError, match=r"meta_expressions_valid_\.json: file not found"):
        prepare_official("revos", root, "valid", tmp_path / "out", videos_per_shard=5, skip_bad=True, min_frames=1)


# ---------------------------------------------------------------- LV-VIS


def _lv_vis_truth(root: Path, split: str, at_root: bool = False) -> tuple[dict, dict[int, str]]:
    data = json.loads(((root if at_root else root / split) / f"{split}_instances.json").read_text())
    return data, {c["id"]: c["name"] for c in data["categories"]}


def check_lv_vis_records(records: list[VideoRecord], data: dict, names: dict[int, str], root: Path, split: str) -> None:
    """Against the official instances file: category expressions of every instance, the masks decoded independently."""
    assert [r.video for r in records] == [v["file_names"][0].split("/")[0] for v in data["videos"]]
    forms = set()
    for record, video in zip(records, data["videos"]):
        assert record.dataset == "lv-vis" and record.frame_names == [f.split("/")[1][:-4] for f in video["file_names"]]
        for name, data_bytes in zip(record.frame_names, record.frames):
            assert data_bytes == (root / split / "JPEGImages" / record.video / f"{name}.jpg").read_bytes()
        anns = [a for a in data["annotations"] if a["video_id"] == video["id"]]
        categories = sorted({a["category_id"] for a in anns})
        # the referent of a category name is every instance of it: "dog" is both dogs
        assert {e.text: e.obj_ids for e in record.expressions} == {
            names[c].replace("_", " "): tuple(sorted(a["id"] for a in anns if a["category_id"] == c)) for c in categories}
        assert record.object_ids == sorted(a["id"] for a in anns)
        for ann in anns:
            for t, rle in enumerate(ann["segmentations"]):
                forms.add(type(rle["counts"]).__name__ if rle else "null")
                stored = record.masks[ann["id"]][t]
                assert stored is None if rle is None else isinstance(stored["counts"], str)  # stored compressed
                truth = decode_rle_independently(rle, record.height, record.width)
                np.testing.assert_array_equal(record.object_mask(ann["id"], t), truth)
    assert forms == {"list", "str", "null"}  # both RLE forms were read


@pytest.mark.parametrize("at_root", [False, True], ids=["split-folder", "root"])
def test_lv_vis_official_layout_round_trip(tmp_path: Path, at_root: bool) -> None:
    root = write_tiny_lv_vis(tmp_path / "LVVIS", "train", num_videos=3, at_root=at_root)
    manifest = prepare_official("lv-vis", root, "train", tmp_path / "out", videos_per_shard=2, skip_bad=False, min_frames=1)
    data, names = _lv_vis_truth(root, "train", at_root)
    records = read_shards(tmp_path / "out" / "train")
    check_lv_vis_records(records, data, names, root, "train")
    texts = {e.exp_id: e.text for r in records for e in r.expressions}
    assert texts == {"1": "aerosol can", "7": "dog", "3": "bow (weapon)"}  # exp_id: the category id; zebra is in no video
    assert manifest.converter["options"]["layout"] == "official" and manifest.no_target_expressions == 0
    check_manifest(tmp_path / "out" / "train", records, shards=2)


def test_lv_vis_visa_layout_reads_as_mevis_and_is_preferred(tmp_path: Path) -> None:
    root = write_tiny_lv_vis(tmp_path / "lvvis", "train", num_videos=3, visa=True, official=True)
    data, names = _lv_vis_truth(root, "train")
    manifest = prepare_official("lv-vis", root, "train", tmp_path / "out", videos_per_shard=5, skip_bad=False, min_frames=1)
    assert manifest.converter["options"]["layout"] == "visa"  # what GLUS trains on, when both are there
    check_lv_vis_records(read_shards(tmp_path / "out" / "train"), data, names, root, "train")
    (root / "train" / "train_instances.json").unlink()  # the VISA files alone
    prepare_official("lv-vis", root, "train", tmp_path / "visa_only", videos_per_shard=5, skip_bad=False, min_frames=1)
    assert [r.expressions for r in read_shards(tmp_path / "visa_only" / "train")] == [
        r.expressions for r in read_shards(tmp_path / "out" / "train")]


def _lv_vis_edit(edit: Callable[[dict, dict], None]) -> Callable[[Path, int], None]:
    """Edit the instances file: ``edit(data, video entry)`` for the video of id ``video_id``."""
    def apply(root: Path, video_id: int) -> None:
        path = root / "train" / "train_instances.json"
        data = json.loads(path.read_text())
        edit(data, next(v for v in data["videos"] if v["id"] == video_id))
        path.write_text(json.dumps(data))
    return apply


def _first_ann(data: dict, video: dict) -> dict:
    return next(a for a in data["annotations"] if a["video_id"] == video["id"])


def _shorten(data: dict, video: dict) -> None:
    video.update(file_names=video["file_names"][:3], length=3)
    for ann in data["annotations"]:
        if ann["video_id"] == video["id"]:
            ann["segmentations"] = ann["segmentations"][:3]


BAD_LV_VIS = {  # name -> (edit of video 00001 (id 11), words the message must contain)
    "missing frame": (lambda r, v: (r / "train" / "JPEGImages" / "00001" / "00002.jpg").unlink(), ["00002.jpg", "missing"]),
    "rle of wrong size": (
        _lv_vis_edit(lambda d, v: _first_ann(d, v)["segmentations"][0].update(size=[3, 3])),
        ["train_instances.json", "annotation 4 (category 'dog')", "frame 0", "malformed RLE", "frame size"],
    ),
    "list counts not covering the frame": (
        _lv_vis_edit(lambda d, v: _first_ann(d, v)["segmentations"][0]["counts"].append(5)),
        ["annotation 4", "malformed RLE", "do not cover"],
    ),
    "unknown category": (_lv_vis_edit(lambda d, v: _first_ann(d, v).update(category_id=42)), ["annotation 4", "'category_id' 42"]),
    "instance without any mask": (
        _lv_vis_edit(lambda d, v: _first_ann(d, v).update(segmentations=[None] * 5)),
        ["annotation 4", "no mask in any frame"],
    ),
    "segmentations per frame": (
        _lv_vis_edit(lambda d, v: _first_ann(d, v)["segmentations"].pop()),
        ["annotation 4", "expected a list of 5 RLEs"],
    ),
    "file outside its folder": (_lv_vis_edit(lambda d, v: v["file_names"].__setitem__(1, "00001/x/1.jpg")), ["'00001/x/1.jpg'"]),
    "too short": (_lv_vis_edit(_shorten), ["3 usable frames", "min_frames=4"]),
}


@pytest.mark.parametrize("case", list(BAD_LV_VIS))
def test_bad_lv_vis_video_is_named_or_skipped(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    edit, words = BAD_LV_VIS[case]
    root = write_tiny_lv_vis(tmp_path / "LVVIS", "train", num_videos=3, frames=5)
    edit(root, 11)
    with pytest.raises(ConversionError) as err:
        prepare_official("lv-vis", root, "train", tmp_path / "strict", videos_per_shard=5, skip_bad=False, min_frames=4)
    assert "video '00001' (id 11)" in str(err.value) and all(w in str(err.value) for w in words), str(err.value)
    capsys.readouterr()
    manifest = prepare_official("lv-vis", root, "train", tmp_path / "lenient", videos_per_shard=5, skip_bad=True, min_frames=4)
    assert "skipping video '00001'" in capsys.readouterr().err
    assert [s["video"] for s in manifest.skipped] == ["00001"]
    assert [r.video for r in read_shards(tmp_path / "lenient" / "train")] == ["00000", "00002"]


def test_bad_lv_vis_visa_layout_video_is_named_or_skipped(tmp_path: Path) -> None:
    root = write_tiny_lv_vis(tmp_path / "lvvis", "train", num_videos=3, visa=True, official=False)
    path = root / "train" / "mask_dict.json"
    masks = json.loads(path.read_text())
    masks["5"][0]["counts"] = "0"  # the second dog of video 00001
    path.write_text(json.dumps(masks))
    with pytest.raises(ConversionError, match=r"meta_expressions.json: video '00001' expression 2 \('dog'\) object 5 .*"
                                              r"mask_dict.json\) frame 0: malformed RLE"):
        prepare_official("lv-vis", root, "train", tmp_path / "strict", videos_per_shard=5, skip_bad=False, min_frames=1)
    manifest = prepare_official("lv-vis", root, "train", tmp_path / "lenient", videos_per_shard=5, skip_bad=True, min_frames=1)
    assert [s["video"] for s in manifest.skipped] == ["00001"] and manifest.videos == 2


def test_lv_vis_faults_of_the_whole_split_raise_even_with_skip_bad(tmp_path: Path) -> None:
    root = write_tiny_lv_vis(tmp_path / "LVVIS", "train", num_videos=2)
    with pytest.raises(ConversionError, match=r"neither meta_expressions.json .* nor val_instances.json"):
        (root / "val").mkdir()
        prepare_official("lv-vis", root, "val", tmp_path / "out", videos_per_shard=5, skip_bad=True, min_frames=1)
    _lv_vis_edit(lambda d, v: d["annotations"][3].update(video_id=99))(root, 10)
    with pytest.raises(ConversionError, match=r"train_instances.json: annotations\[3\] \(id 4\): 'video_id' 99 is not the id"):
        prepare_official("lv-vis", root, "train", tmp_path / "out", videos_per_shard=5, skip_bad=True, min_frames=1)
    _lv_vis_edit(lambda d, v: d.pop("annotations"))(root, 10)
    with pytest.raises(ConversionError, match=r"train_instances.json: 'annotations' must be a list"):
        prepare_official("lv-vis", root, "train", tmp_path / "out", videos_per_shard=5, skip_bad=True, min_frames=1)


# ---------------------------------------------------------------- CLI and manifest


def test_cli_prepares_revos_and_lv_vis_and_the_manifest_says_how_to_redo_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from glus_lightning.cli import main

    revos = write_tiny_revos(tmp_path / "ReVOS", {"train": 3})
    lvvis = write_tiny_lv_vis(tmp_path / "LVVIS", "train", num_videos=2)
    out = tmp_path / "data"
    assert main(["prepare", "revos", "--root", str(revos), "--split", "train", "--out", str(out / "revos"), "--min-frames", "4",
                 "--skip-bad"]) == 0
    assert "revos/train: 3 videos, 18 frames, 14 expressions" in capsys.readouterr().out  # 6 of them without a target
    assert main(["prepare", "lv-vis", "--root", str(lvvis), "--split", "train", "--out", str(out / "lv-vis"),
                 "--videos-per-shard", "1"]) == 0
    assert "lv-vis/train: 2 videos, 10 frames, 5 expressions, 7 objects in 2 shards" in capsys.readouterr().out
    written = json.loads((out / "revos" / "train" / MANIFEST).read_text())
    assert written["no_target_expressions"] == 6
    assert written["converter"] == {"name": "revos", "version": 1, "options": {
        "root": str(revos.resolve()), "split": "train", "videos_per_shard": 50, "skip_bad": True, "min_frames": 4}}
    assert Manifest.load(out / "lv-vis" / "train").converter["options"]["layout"] == "official"
    for name, root, flags in (("revos", revos, "--videos-per-shard 50 --min-frames 4 --skip-bad"),
                              ("lv-vis", lvvis, "--videos-per-shard 1 --min-frames 1")):
        path = out / name / "train" / MANIFEST
        path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))
        with pytest.raises(ShardFormatError) as err:
            check_manifest_format(path)
        assert f"`glus prepare {name} --root {root.resolve()} --split train {flags} --out {out / name}`" in str(err.value)


# ---------------------------------------------------------------- GLUS-A on all five


def _prepare_all(src: Path, data: Path) -> None:
    """Tiny train splits of the five GLUS-A datasets (and MeViS valid_u for validation) under ``data/<name>/``."""
    write_tiny_mevis(src / "mevis", "train", num_videos=2, frames=6, size=48)
    write_tiny_mevis(src / "mevis", "valid_u", num_videos=1, frames=5, size=48, seed=1)
    write_tiny_ref_youtube_vos(src / "yvos", "train", num_videos=2, frames=6)
    write_tiny_ref_youtube_vos(src / "davis", "train", num_videos=2, frames=6, seed=1)
    write_tiny_revos(src / "ReVOS", {"train": 2}, frames=6)
    write_tiny_lv_vis(src / "LVVIS", "train", num_videos=2, frames=6)
    for name, root, split in (("mevis", "mevis", "train"), ("mevis", "mevis", "valid_u"), ("ref-youtube-vos", "yvos", "train"),
                              ("ref-davis17", "davis", "train"), ("revos", "ReVOS", "train"), ("lv-vis", "LVVIS", "train")):
        prepare_official(name, src / root, split, data / name, videos_per_shard=50, skip_bad=False, min_frames=4)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # training_step called without a Trainer
def test_glus_a_trains_a_step_on_every_dataset_of_its_mixture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from datamodules.datamodule import RefVOSDataModule
    from glus_lightning.cli import main
    from glus_lightning.config import compose
    from glus_lightning.module import GLUSModule

    data = tmp_path / "data"
    _prepare_all(tmp_path / "src", data)
    overrides = ["experiment=glus_a", "backbone=llava_tiny", "segmenter=test", "trainer=cpu", f"data.root={data}",
                 f"run_dir={tmp_path / 'runs'}", "data.num_workers=0", "data.batch_size=1", "trainer.max_steps=1",
                 "refine.videos=2", "refine.steps=2"]
    cfg = compose(overrides)
    assert [s.name for s in cfg.data.train] == ["mevis", "ref-youtube-vos", "ref-davis17", "revos", "lv-vis"]
    torch.manual_seed(0)
    model = GLUSModule(cfg)
    for source in cfg.data.train:  # each dataset of the mixture gives a batch the model trains on
        alone = OmegaConf.merge(cfg.data, {"train": [OmegaConf.to_container(source)], "batch_size": 1, "max_expressions": 6})
        batch = next(iter(RefVOSDataModule(alone).train_dataloader()))
        assert set(batch.datasets) == {source.name}
        loss = model.training_step(batch, 0)
        assert torch.isfinite(loss), source.name
        empty = [e for e, objects in enumerate(batch.expression_objects) if not objects]
        assert bool(empty) == (source.name == "revos")  # every expression of a video: ReVOS's no-target ones too
        assert all(not batch.masks[e].any() for e in empty)
    assert main(["fit", *overrides]) == 0  # and `glus fit` of the composed experiment: one step, then validation
    assert "Checkpoints: last" in capsys.readouterr().out
    ckpt = torch.load(next((tmp_path / "runs").glob("*/version_0/checkpoints/last.ckpt")), map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1
