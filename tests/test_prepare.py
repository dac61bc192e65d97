"""Conversion of the official layouts into shards: round trips, counts, text, bad input, the CLI."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from fixtures_official import write_tiny_mevis, write_tiny_ref_youtube_vos
from PIL import Image
from pycocotools import mask as coco_mask

from datamodules.converters import normalize_expression
from datamodules.formats import ConversionError, rle_string_runs
from datamodules.prepare import configure_prepare_parser, prepare_official, run_prepare
from datamodules.records import VideoRecord
from datamodules.shards import MANIFEST, Manifest


def read_shards(out_dir: Path) -> list[VideoRecord]:
    manifest = Manifest.load(out_dir)
    dataset = wds.WebDataset([str(out_dir / name) for name in manifest.shards], shardshuffle=False, empty_check=False)
    return [VideoRecord.from_sample(sample) for sample in dataset]


def expected_text(raw: str) -> str:
    """Independent of ``normalize_expression``: the fixtures' raw text only adds case, spaces and periods."""
    return " ".join(raw.replace(".", " ").split()).lower()


def check_manifest(out_dir: Path, records: list[VideoRecord], shards: int) -> None:
    manifest = Manifest.load(out_dir)
    assert manifest.videos == len(records)
    assert manifest.frames == sum(len(r.frame_names) for r in records)
    assert manifest.expressions == sum(len(r.expressions) for r in records)
    assert manifest.objects == sum(len(r.masks) for r in records)
    assert len(manifest.shards) == shards
    assert manifest.bytes == sum((out_dir / name).stat().st_size for name in manifest.shards)


def _ids_as_strings(meta: dict) -> None:
    """MeViS ids may be numbers or strings: make those of one video strings."""
    for exp in meta["videos"]["train_00002"]["expressions"].values():
        exp.update(obj_id=[str(i) for i in exp["obj_id"]], anno_id=[str(i) for i in exp["anno_id"]])


def test_mevis_round_trip_is_bit_identical(tmp_path: Path) -> None:
    root = write_tiny_mevis(tmp_path / "mevis", num_videos=3)
    _edit_json(_mevis_meta(root), _ids_as_strings)
    manifest = prepare_official("mevis", root, "train", tmp_path / "out", videos_per_shard=2, skip_bad=False, min_frames=1)
    meta = json.loads((root / "train" / "meta_expressions.json").read_text())["videos"]
    mask_dict = json.loads((root / "train" / "mask_dict.json").read_text())
    records = read_shards(tmp_path / "out" / "train")
    assert manifest.dataset == "mevis" and [r.video for r in records] == list(meta)
    checked = 0
    for record in records:
        entry = meta[record.video]
        assert record.frame_names == entry["frames"]
        for name, data in zip(record.frame_names, record.frames):
            assert data == (root / "train" / "JPEGImages" / record.video / f"{name}.jpg").read_bytes()
        assert [e.exp_id for e in record.expressions] == list(entry["expressions"])
        for exp in record.expressions:
            source = entry["expressions"][exp.exp_id]
            assert exp.text == expected_text(source["exp"])
            assert exp.obj_ids == tuple(sorted(int(o) for o in source["obj_id"]))  # ids as numbers or strings
            for obj_id, anno_id in zip(source["obj_id"], source["anno_id"]):
                rles = mask_dict[str(anno_id)]
                assert record.masks[int(obj_id)] == rles  # RLE copied unchanged
                for t, rle in enumerate(rles):
                    truth = np.zeros((record.height, record.width), np.uint8) if rle is None else coco_mask.decode(
                        {"size": rle["size"], "counts": rle["counts"].encode()}
                    )
                    np.testing.assert_array_equal(record.object_mask(int(obj_id), t), truth)
                    checked += 1
    assert checked > 30
    check_manifest(tmp_path / "out" / "train", records, shards=2)


@pytest.mark.parametrize("dataset", ["ref-youtube-vos", "ref-davis17"])
def test_palette_layout_keeps_annotated_frames_and_every_mask(tmp_path: Path, dataset: str) -> None:
    root = write_tiny_ref_youtube_vos(tmp_path / "src", num_videos=3, frames=11, annotate_every=5)
    prepare_official(dataset, root, "train", tmp_path / "out", videos_per_shard=1, skip_bad=False, min_frames=3)
    meta = json.loads((root / "meta_expressions" / "train" / "meta_expressions.json").read_text())["videos"]
    records = read_shards(tmp_path / "out" / "train")
    assert [r.video for r in records] == list(meta) and all(r.dataset == dataset for r in records)
    for record in records:
        annotated = sorted(p.stem for p in (root / "train" / "Annotations" / record.video).glob("*.png"))
        assert record.frame_names == annotated == ["00000", "00025", "00050"]  # every 5th frame of 11
        pngs = [np.asarray(Image.open(root / "train" / "Annotations" / record.video / f"{n}.png")) for n in annotated]
        assert record.object_ids == sorted({int(i) for png in pngs for i in np.unique(png) if i})
        for obj_id in record.object_ids:
            for t, png in enumerate(pngs):
                np.testing.assert_array_equal(record.object_mask(obj_id, t), (png == obj_id).astype(np.uint8))
        for t, name in enumerate(record.frame_names):
            assert record.frames[t] == (root / "train" / "JPEGImages" / record.video / f"{name}.jpg").read_bytes()
            assert record.decode_frame(t).shape == (40, 56, 3)
        for exp in record.expressions:
            source = meta[record.video]["expressions"][exp.exp_id]
            assert exp.text == expected_text(source["exp"]) and exp.obj_ids == (int(source["obj_id"]),)
    check_manifest(tmp_path / "out" / "train", records, shards=3)


def test_unlabelled_splits_keep_every_frame_and_no_masks(tmp_path: Path) -> None:
    mevis = write_tiny_mevis(tmp_path / "mevis", split="valid", num_videos=2)
    (mevis / "valid" / "mask_dict.json").unlink()
    yvos = write_tiny_ref_youtube_vos(tmp_path / "yvos", split="valid", num_videos=2, frames=7, labelled=False)
    for dataset, root, frames in (("mevis", mevis, 6), ("ref-youtube-vos", yvos, 7)):
        prepare_official(dataset, root, "valid", tmp_path / dataset, videos_per_shard=5, skip_bad=False, min_frames=1)
        records = read_shards(tmp_path / dataset / "valid")
        assert len(records) == 2
        for record in records:
            assert record.num_frames == frames and record.masks == {}
            assert record.expressions and all(e.obj_ids == () and e.text == e.text.lower() for e in record.expressions)


def test_normalize_expression() -> None:
    assert normalize_expression("  The Red  Circle.\n") == "the red circle"
    assert normalize_expression("A dog running . ") == "a dog running"
    assert normalize_expression("cat...") == "cat"
    assert normalize_expression("mr. smith's dog") == "mr. smith's dog"  # only trailing periods go


def test_rle_check_reads_runs_of_real_rles() -> None:
    rng = np.random.default_rng(0)
    for size in [(1, 1), (7, 5), (240, 320), (480, 640)]:
        for density in (0.0, 0.01, 0.5, 1.0):
            mask = (rng.random(size) < density).astype(np.uint8)
            if density == 0.01:
                mask[size[0] // 4 : size[0] // 2, : size[1] // 3] = 1  # long runs need multi-char numbers
            counts = coco_mask.encode(np.asfortranarray(mask))["counts"].decode()
            flat = mask.flatten(order="F")
            bounds = np.concatenate(([0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]))
            runs = np.diff(bounds) if flat[0] == 0 else np.concatenate(([0], np.diff(bounds)))
            np.testing.assert_array_equal(rle_string_runs(counts, "here"), runs)


# ---------------------------------------------------------------- bad input


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _mevis_meta(root: Path) -> Path:
    return root / "train" / "meta_expressions.json"


def _mevis_masks(root: Path) -> Path:
    return root / "train" / "mask_dict.json"


def _first_anno(root: Path, video: str) -> str:
    entry = json.loads(_mevis_meta(root).read_text())["videos"][video]
    return str(next(iter(entry["expressions"].values()))["anno_id"][0])


def _set_rle(root: Path, video: str, change: Callable[[list], None]) -> None:
    anno = _first_anno(root, video)
    _edit_json(_mevis_masks(root), lambda d: change(d[anno]))


def _first_visible(rles: list) -> int:
    return next(i for i, r in enumerate(rles) if r is not None)


BAD_MEVIS = {  # name -> (edit of video train_00001, words the message must contain)
    "missing frame": (lambda r, v: (r / "train" / "JPEGImages" / v / "00002.jpg").unlink(), ["00002.jpg", "missing"]),
    "unreadable image": (lambda r, v: (r / "train" / "JPEGImages" / v / "00003.jpg").write_bytes(b"not a jpeg"), ["00003.jpg"]),
    "truncated image": (
        lambda r, v: (r / "train" / "JPEGImages" / v / "00001.jpg").write_bytes((r / "train" / "JPEGImages" / v / "00001.jpg").read_bytes()[:400]),
        ["00001.jpg", "not a readable image"],
    ),
    "malformed rle counts": (
        lambda r, v: _set_rle(r, v, lambda rles: rles[_first_visible(rles)].update(counts="0")),
        ["malformed RLE", "mask_dict.json"],
    ),
    "rle of wrong size": (
        lambda r, v: _set_rle(r, v, lambda rles: rles[_first_visible(rles)].update(size=[3, 3])),
        ["malformed RLE", "frame size"],
    ),
    "object without any mask": (lambda r, v: _set_rle(r, v, lambda rles: rles.__setitem__(slice(None), [None] * len(rles))), ["no mask"]),
    "anno id missing": (lambda r, v: _edit_json(_mevis_masks(r), lambda d: d.pop(_first_anno(r, v))), ["no mask", "anno_id"]),
    "object id not a number": (
        lambda r, v: _edit_json(_mevis_meta(r), lambda d: d["videos"][v]["expressions"]["0"].update(obj_id=["dog"])),
        ["expression 0", "'obj_id'", "'dog'"],
    ),
    "malformed video entry": (lambda r, v: _edit_json(_mevis_meta(r), lambda d: d["videos"][v].update(frames="oops")), ["'frames'"]),
}


@pytest.mark.parametrize("case", list(BAD_MEVIS))
def test_bad_mevis_video_is_an_error_or_skipped(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    edit, words = BAD_MEVIS[case]
    root = write_tiny_mevis(tmp_path / "src", num_videos=3)
    edit(root, "train_00001")
    with pytest.raises(ConversionError) as err:
        prepare_official("mevis", root, "train", tmp_path / "strict", videos_per_shard=5, skip_bad=False, min_frames=1)
    assert "train_00001" in str(err.value) and all(w in str(err.value) for w in words), str(err.value)
    assert not list((tmp_path / "strict" / "train").glob("*.tar"))  # a failed run leaves no partial shards
    capsys.readouterr()
    manifest = prepare_official("mevis", root, "train", tmp_path / "lenient", videos_per_shard=5, skip_bad=True, min_frames=1)
    assert "skipping video 'train_00001'" in capsys.readouterr().err
    assert manifest.videos == 2 and [s["video"] for s in manifest.skipped] == ["train_00001"]
    assert Manifest.load(tmp_path / "lenient" / "train").skipped == manifest.skipped
    assert [r.video for r in read_shards(tmp_path / "lenient" / "train")] == ["train_00000", "train_00002"]


def _yvos_meta(root: Path) -> Path:
    return root / "meta_expressions" / "train" / "meta_expressions.json"


BAD_YVOS = {  # name -> (edit of video vid001, words the message must contain)
    "missing frame": (lambda r, v: (r / "train" / "JPEGImages" / v / "00010.jpg").unlink(), ["00010.jpg", "missing"]),
    "unreadable image": (lambda r, v: (r / "train" / "JPEGImages" / v / "00005.jpg").write_bytes(b"\xff\xd8garbage"), ["00005.jpg"]),
    "unreadable annotation": (lambda r, v: (r / "train" / "Annotations" / v / "00005.png").write_bytes(b"garbage"), ["00005.png"]),
    "rgb annotation": (
        lambda r, v: Image.new("RGB", (56, 40)).save(r / "train" / "Annotations" / v / "00005.png"),
        ["00005.png", "palette"],
    ),
    "object without any mask": (
        lambda r, v: _edit_json(_yvos_meta(r), lambda d: d["videos"][v]["expressions"]["0"].update(obj_id="7")),
        ["expression 0", "object 7", "no mask"],
    ),
    "object id not a number": (
        lambda r, v: _edit_json(_yvos_meta(r), lambda d: d["videos"][v]["expressions"]["1"].update(obj_id="dog")),
        ["expression 1", "'dog'"],
    ),
    "too short after dropping unannotated frames": (
        lambda r, v: [p.unlink() for p in sorted((r / "train" / "Annotations" / v).glob("*.png"))[2:]],
        ["2 usable frames", "min_frames=4"],
    ),
    "no expressions": (lambda r, v: _edit_json(_yvos_meta(r), lambda d: d["videos"][v].update(expressions={})), ["'expressions'"]),
}


@pytest.mark.parametrize("case", list(BAD_YVOS))
def test_bad_ref_youtube_vos_video_is_an_error_or_skipped(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    edit, words = BAD_YVOS[case]
    root = write_tiny_ref_youtube_vos(tmp_path / "src", num_videos=3, frames=6)
    edit(root, "vid001")
    with pytest.raises(ConversionError) as err:
        prepare_official("ref-youtube-vos", root, "train", tmp_path / "strict", videos_per_shard=5, skip_bad=False, min_frames=4)
    assert "vid001" in str(err.value) and all(w in str(err.value) for w in words), str(err.value)
    capsys.readouterr()
    manifest = prepare_official("ref-youtube-vos", root, "train", tmp_path / "lenient", videos_per_shard=5, skip_bad=True, min_frames=4)
    assert "skipping video 'vid001'" in capsys.readouterr().err
    assert manifest.videos == 2 and [s["video"] for s in manifest.skipped] == ["vid001"]
    assert [r.video for r in read_shards(tmp_path / "lenient" / "train")] == ["vid000", "vid002"]


@pytest.mark.parametrize("which", ["meta_expressions.json", "mask_dict.json"])
def test_malformed_json_file_names_file_line_and_column_even_with_skip_bad(tmp_path: Path, which: str) -> None:
    root = write_tiny_mevis(tmp_path / "src", num_videos=2)
    path = root / "train" / which
    path.write_text('{\n  "videos": {\n    "a": [1, 2,, 3]\n  }\n}')
    with pytest.raises(ConversionError, match=r"line 3 column 16") as err:
        prepare_official("mevis", root, "train", tmp_path / "out", videos_per_shard=5, skip_bad=True, min_frames=1)
    assert str(path) in str(err.value)


def test_skip_bad_message_is_a_line_of_its_own_not_a_warning_from_inside_tqdm(tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = write_tiny_ref_youtube_vos(tmp_path / "src", num_videos=3, frames=5)
    (root / "train" / "JPEGImages" / "vid001" / "00010.jpg").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = prepare_official("ref-youtube-vos", root, "train", tmp_path / "out", videos_per_shard=5, skip_bad=True, min_frames=1)
    # a warning raised in the record generator was attributed to the tqdm line that drew the next record
    assert not [w for w in caught if "vid001" in str(w.message)], [f"{w.filename}:{w.lineno}" for w in caught]
    # tqdm.write clears the bar ("\r"), writes the message and its newline, then redraws the bar
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if "vid001" in line]
    assert len(lines) == 1 and lines[0].startswith("skipping video 'vid001': ") and "00010.jpg" in lines[0], lines
    assert [s["video"] for s in manifest.skipped] == ["vid001"]


@pytest.mark.parametrize("bad", ["vid000", "vid001"])  # before any record was written, after the first shard
def test_failed_run_leaves_no_new_empty_folder_and_keeps_existing_ones(tmp_path: Path, bad: str) -> None:
    root = write_tiny_ref_youtube_vos(tmp_path / "src", num_videos=3, frames=5)
    (root / "train" / "JPEGImages" / bad / "00010.jpg").unlink()

    def fail(out: Path) -> None:
        with pytest.raises(ConversionError, match=bad):
            prepare_official("ref-youtube-vos", root, "train", out, videos_per_shard=1, skip_bad=False, min_frames=1)

    fail(tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()  # neither OUT/train nor the OUT and parent this run created
    (tmp_path / "kept" / "train").mkdir(parents=True)
    fail(tmp_path / "kept")
    assert (tmp_path / "kept" / "train").is_dir() and not any((tmp_path / "kept" / "train").iterdir())
    (tmp_path / "mine" / "train").mkdir(parents=True)
    (tmp_path / "mine" / "train" / "notes.txt").write_text("mine")
    fail(tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine" / "train").iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------- CLI


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="glus prepare")
    configure_prepare_parser(parser)
    return parser.parse_args(argv)


def test_cli_converts_skips_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_tiny_ref_youtube_vos(tmp_path / "src", num_videos=3, frames=5)
    (root / "train" / "JPEGImages" / "vid002" / "00010.jpg").unlink()
    argv = ["ref-youtube-vos", "--root", str(root), "--split", "train", "--out", str(tmp_path / "out"), "--videos-per-shard", "2"]

    assert run_prepare(_parse(argv)) == 1
    assert "vid002" in capsys.readouterr().err and not list((tmp_path / "out" / "train").glob("*.tar"))

    assert run_prepare(_parse([*argv, "--out", str(tmp_path / "out2"), "--skip-bad"])) == 0
    captured = capsys.readouterr()
    assert "skipping video 'vid002'" in captured.err
    line = captured.out
    assert "ref-youtube-vos/train: 2 videos, 10 frames" in line and "skipped 1" in line and str(tmp_path / "out2" / "train") in line
    assert len(Manifest.load(tmp_path / "out2" / "train").shards) == 1

    assert run_prepare(_parse([*argv, "--out", str(tmp_path / "out2"), "--skip-bad"])) == 1  # refuses to mix with old shards
    assert "already holds 1 shards" in capsys.readouterr().err


def test_cli_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(["mevis", "--root", "r", "--split", "train", "--out", "o", "--videos-per-shard", "0"])
    assert "must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["kinetics", "--out", "o"])
    assert _parse(["synthetic", "--out", "o", "--frames", "8"]).frames == 8


# ---------------------------------------------------------------- manifest provenance


def test_manifest_records_shard_format_converter_options_and_package_version(tmp_path: Path) -> None:
    root = write_tiny_ref_youtube_vos(tmp_path / "src", num_videos=3, frames=5)
    argv = ["ref-davis17", "--root", str(root), "--split", "train", "--out", str(tmp_path / "out"), "--videos-per-shard", "2",
            "--min-frames", "3", "--skip-bad"]
    assert run_prepare(_parse(argv)) == 0
    written = json.loads((tmp_path / "out" / "train" / MANIFEST).read_text())
    assert next(iter(written)) == "format_version" and written["format_version"] == 1  # the shard format of the first release
    assert written["converter"] == {
        "name": "ref-davis17",
        "version": 1,
        "options": {"root": str(root.resolve()), "split": "train", "videos_per_shard": 2, "skip_bad": True, "min_frames": 3},
    }
    assert written["glus_lightning_version"] == importlib.metadata.version("glus-lightning")
    loaded = Manifest.load(tmp_path / "out" / "train")
    assert (loaded.format_version, loaded.converter, loaded.videos) == (1, written["converter"], 3)


def test_synthetic_manifest_records_the_generator_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["synthetic", "--out", str(tmp_path / "syn"), "--seed", "7", "--num-train", "3", "--num-val", "2", "--frames", "5",
            "--size", "40", "--naming", "shortest"]
    assert run_prepare(_parse(argv)) == 0
    capsys.readouterr()
    for split, per_shard in (("train", 1), ("val", 1)):  # ceil(videos / 8 shards)
        written = json.loads((tmp_path / "syn" / split / MANIFEST).read_text())
        assert written["format_version"] == 1 and written["split"] == split and written["dataset"] == "synthetic"
        assert written["converter"] == {
            "name": "synthetic",
            "version": 1,
            "options": {"seed": 7, "num_train": 3, "num_val": 2, "frames": 5, "size": 40, "objects": [2, 4], "lookalike": 0.0,
                        "twins": 0.25, "naming": "shortest", "twin_motion": "crossing", "videos_per_shard": per_shard},
        }
        assert written["glus_lightning_version"] == importlib.metadata.version("glus-lightning")
