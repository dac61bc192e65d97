"""``glus prepare folder`` (your own videos) and ``docs/own_data.md`` end to end.

A tiny hand-made layout is generated here (moving squares, 40 x 56 px): JPEG frames with per-object masks, an mp4 with
ID masks on every other frame, PNG frames, and an mp4 inside its video folder. The end-to-end test runs the commands
of the ``<!-- test:own-data -->`` block of the doc, so the doc and the code cannot drift apart.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import shlex
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from datamodules.formats import ConversionError
from datamodules.own_folder import natural_key
from datamodules.prepare import configure_prepare_parser, prepare_folder, run_prepare
from datamodules.shards import MANIFEST, Manifest, _prepare_hint
from glus_lightning.cli import build_parser, main

H, W = 40, 56
COLOURS = {1: (230, 40, 40), 2: (40, 90, 230), 3: (40, 200, 60)}
DOC = Path(__file__).resolve().parents[1] / "docs" / "own_data.md"


@dataclass
class Clip:
    """One generated video: how it is stored and the masks it was drawn from."""

    name: str
    kind: str  # "jpg" or "png" frames, "mp4" (DIR/<name>.mp4) or "inner-mp4" (DIR/<name>/video.mp4)
    frames: list[str]  # frame names in temporal order
    layout: str  # "objects" (masks/<id>/<frame>.png) or "ids" (masks/<frame>.png)
    objects: tuple[int, ...]
    annotated: list[str]  # frames that get a mask file
    gone_after: int | None = None  # object 2 has no mask file (is absent) from this frame index on ("objects" layout)

    def mask(self, obj: int, t: int) -> np.ndarray:
        """Object ``obj`` in frame ``t``: a square moving right (objects 1, 3) or down (object 2)."""
        mask = np.zeros((H, W), np.uint8)
        if obj == 2 and self.gone_after is not None and t >= self.gone_after:
            return mask
        top, left = {1: (4, 2 + 4 * t), 2: (2 + 3 * t, 30), 3: (26, 40 - 3 * t)}[obj]
        mask[top : top + 10, left : left + 12] = 1
        return mask

    def image(self, t: int) -> np.ndarray:
        image = np.full((H, W, 3), 110, np.uint8)
        image[::4] = 90  # some texture
        for obj in self.objects:
            image[self.mask(obj, t) == 1] = COLOURS[obj]
        return image


TRAIN = [
    Clip("squares", "jpg", [f"img_{5 * t}" for t in range(8)], "objects", (1, 2), [f"img_{5 * t}" for t in range(8)], gone_after=6),
    Clip("clip", "mp4", [f"{t:05d}" for t in range(8)], "ids", (1, 2), [f"{t:05d}" for t in range(0, 8, 2)]),
]
TRAIN_EXPRESSIONS = {
    "squares": [{"sentence": "The red square.", "object_ids": [1]}, {"sentence": "the  blue square", "object_ids": [2]},
                {"sentence": "both squares", "object_ids": [1, 2]}],
    "clip": [{"sentence": "the red square moving right", "object_ids": [1]},
             {"sentence": "the square, blue, moving down", "object_ids": [2]}],
}
VAL = [
    Clip("walk", "png", [f"frame{t + 1}" for t in range(6)], "ids", (1, 3), [f"frame{t + 1}" for t in range(6)]),
    Clip("turn", "inner-mp4", [f"{t:05d}" for t in range(6)], "objects", (2, 3), [f"{t:05d}" for t in range(6)]),
]
VAL_EXPRESSIONS = {
    "walk": [{"sentence": "the red square", "object_ids": [1]}, {"sentence": "the green square", "object_ids": [3]}],
    "turn": [{"sentence": "the blue square", "object_ids": [2]}, {"sentence": "the green one, moving left", "object_ids": [3]}],
}


def write_clip(root: Path, clip: Clip) -> None:
    folder = root / clip.name
    folder.mkdir(parents=True, exist_ok=True)
    images = [clip.image(t) for t in range(len(clip.frames))]
    if clip.kind in ("jpg", "png"):
        (folder / "frames").mkdir()
        for name, image in zip(clip.frames, images, strict=True):
            Image.fromarray(image).save(folder / "frames" / f"{name}.{clip.kind}", quality=90)
    else:
        path = root / f"{clip.name}.mp4" if clip.kind == "mp4" else folder / "video.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=5)
            stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
            for image in images:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())
    for t, name in enumerate(clip.frames):
        if name not in clip.annotated:
            continue
        if clip.layout == "ids":
            ids = np.zeros((H, W), np.uint8)
            for obj in clip.objects:
                ids[clip.mask(obj, t) == 1] = obj
            png = Image.fromarray(ids)  # grayscale, and palette on odd frames
            if t % 2:
                png = Image.frombytes("P", (W, H), ids.tobytes())
                png.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255, 0, 255, 0] + [255] * 756)
            (folder / "masks").mkdir(exist_ok=True)
            png.save(folder / "masks" / f"{name}.png")
        else:
            for obj in clip.objects:
                mask = clip.mask(obj, t)
                if obj == 2 and clip.gone_after is not None and t >= clip.gone_after:
                    continue  # no file: absent from an annotated frame
                (folder / "masks" / str(obj)).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask * 255).save(folder / "masks" / str(obj) / f"{name}.png")


def write_expressions(root: Path, expressions: dict[str, list[dict]], fmt: str) -> None:
    if fmt == "json":
        (root / "expressions.json").write_text(json.dumps(expressions, indent=2))
        return
    with (root / "expressions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "object_ids", "sentence"])
        for video, rows in expressions.items():
            for i, row in enumerate(rows):
                ids = row["object_ids"]
                writer.writerow([video, (";" if i % 2 else " ").join(str(o) for o in ids), row["sentence"]])


def write_folder(root: Path, clips: list[Clip], expressions: dict[str, list[dict]], fmt: str = "json") -> Path:
    for clip in clips:
        write_clip(root, clip)
    write_expressions(root, expressions, fmt)
    return root


@pytest.fixture
def train_dir(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "my_videos" / "train", TRAIN, TRAIN_EXPRESSIONS)


def read_split(split_dir: Path) -> list[dict]:
    """The stored videos, read with tarfile, json and pycocotools only (not the project's record reader)."""
    videos = []
    for shard in Manifest.load(split_dir).shards:
        with tarfile.open(split_dir / shard) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for info in tar.getmembers():
                key, _, member = info.name.partition(".")
                members.setdefault(key, {})[member] = tar.extractfile(info).read()
        for key, sample in members.items():
            meta = json.loads(sample["meta.json"])
            rles = json.loads(sample["masks.json"])
            masks = {int(o): [None if r is None else coco_mask.decode({"size": r["size"], "counts": r["counts"].encode()})
                              for r in per_frame] for o, per_frame in rles.items()}
            frames = [sample[f"f{i:05d}.jpg"] for i in range(len(meta["frames"]))]
            videos.append({"key": key, **meta, "masks": masks, "frame_bytes": frames})
    return videos


def frame_file(root: Path, clip: Clip, name: str) -> Path:
    return root / clip.name / "frames" / f"{name}.{clip.kind}"


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize(("clips", "expressions", "fmt"), [(TRAIN, TRAIN_EXPRESSIONS, "json"), (VAL, VAL_EXPRESSIONS, "csv")])
def test_masks_are_bit_exact_frames_stored_as_given_and_ground_truth_matches(
        tmp_path: Path, clips: list[Clip], expressions: dict, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folder(tmp_path / "src", clips, expressions, fmt)
    manifest = prepare_folder(root, tmp_path / "out", "s", videos_per_shard=1)
    stored = read_split(tmp_path / "out" / "s")
    assert [v["video"] for v in stored] == [c.name for c in clips] and len(manifest.shards) == len(clips)
    meta = json.loads((tmp_path / "out/s/gt/meta_expressions.json").read_text())["videos"]
    mask_dict = json.loads((tmp_path / "out/s/gt/mask_dict.json").read_text())
    for clip, video in zip(clips, stored, strict=True):
        assert video["dataset"] == "folder" and video["key"] == f"folder/{clip.name}"
        assert video["frames"] == clip.annotated  # temporal order; only annotated frames
        kept = [clip.frames.index(n) for n in clip.annotated]
        for i, t in enumerate(kept):
            data = video["frame_bytes"][i]
            if clip.kind in ("jpg", "png"):
                assert data == frame_file(root, clip, clip.frames[t]).read_bytes()  # the source bytes, unchanged
            else:
                with Image.open(io.BytesIO(data)) as img:
                    assert img.format == "JPEG"
                    decoded = np.asarray(img.convert("RGB")).astype(int)
                assert np.abs(decoded - clip.image(t)).mean() < 12  # mp4 (lossy) then JPEG 95
        assert video["height"] == H and video["width"] == W
        visible = sorted(o for o in clip.objects if any(clip.mask(o, t).any() for t in kept))
        assert video["objects"] == visible == sorted(video["masks"])
        for obj in visible:
            for i, t in enumerate(kept):
                truth = clip.mask(obj, t)
                got = video["masks"][obj][i]
                if truth.any():
                    np.testing.assert_array_equal(got, truth)  # bit-exact
                else:
                    assert got is None  # absent: no RLE
        rows = expressions[clip.name]
        want = [{"exp_id": str(i), "text": " ".join(r["sentence"].split()).lower().rstrip("."), "obj_ids": r["object_ids"]}
                for i, r in enumerate(rows)]
        assert video["expressions"] == want
        # ground truth for glus evaluate: the same frames, sentences and masks
        entry = meta[clip.name]
        assert entry["frames"] == video["frames"]
        for exp in want:
            gt = entry["expressions"][exp["exp_id"]]
            assert gt["exp"] == exp["text"] and gt["obj_id"] == exp["obj_ids"]
            for obj, anno in zip(gt["obj_id"], gt["anno_id"], strict=True):
                assert [None if r is None else r["counts"] for r in mask_dict[anno]] == \
                    [None if m is None else coco_mask.encode(np.asfortranarray(m))["counts"].decode() for m in video["masks"][obj]]
    err = capsys.readouterr().err
    sparse = [c.name for c in clips if c.annotated != c.frames]
    assert ("have no mask file and were left out" in err) == bool(sparse)


def test_records_read_by_the_project_reader_give_the_same_masks(train_dir: Path, tmp_path: Path) -> None:
    from glus_lightning.inference.sources import shard_records

    prepare_folder(train_dir, tmp_path / "out", "train")
    urls = [str(tmp_path / "out/train" / s) for s in Manifest.load(tmp_path / "out/train").shards]
    records = list(shard_records(urls))
    squares = records[0]
    assert squares.frame_names == [f"img_{5 * t}" for t in range(8)]  # natural order: img_5 before img_10
    assert squares.decode_frame(0).shape == (H, W, 3)
    both = squares.expressions[2]
    for t in range(8):
        np.testing.assert_array_equal(squares.expression_mask(both, t), np.maximum(TRAIN[0].mask(1, t), TRAIN[0].mask(2, t)))


def test_csv_and_json_expressions_give_the_same_shards(tmp_path: Path) -> None:
    manifests = {}
    for fmt in ("json", "csv"):
        root = write_folder(tmp_path / fmt / "src", TRAIN, TRAIN_EXPRESSIONS, fmt)
        manifests[fmt] = prepare_folder(root, tmp_path / fmt / "out", "train")
    shards = {fmt: [(tmp_path / fmt / "out/train" / s).read_bytes() for s in m.shards] for fmt, m in manifests.items()}
    assert shards["json"] == shards["csv"]  # byte-identical shards
    assert manifests["json"].videos == 2 and manifests["json"].expressions == 5


def test_natural_frame_order() -> None:
    names = ["frame10", "frame2", "frame1", "Frame3", "frame02", "a", "a1", "10", "9"]
    assert sorted(names, key=natural_key) == ["9", "10", "a", "a1", "frame1", "frame02", "frame2", "Frame3", "frame10"]


def test_unlabelled_folder_keeps_every_frame_no_masks_no_ground_truth(tmp_path: Path) -> None:
    clips = [Clip("walk", "png", [f"{t}" for t in range(12)], "ids", (1,), []), Clip("clip", "mp4", [f"{t:05d}" for t in range(5)],
                                                                                     "ids", (1,), [])]
    root = write_folder(tmp_path / "src", clips, {"walk": [{"sentence": "the red square"}], "clip": [{"sentence": "a square",
                                                                                                          "object_ids": []}]})
    prepare_folder(root, tmp_path / "out", "test")
    stored = read_split(tmp_path / "out" / "test")
    assert [v["frames"] for v in stored] == [[str(t) for t in range(12)], [f"{t:05d}" for t in range(5)]]
    assert all(v["masks"] == {} and v["objects"] == [] and v["expressions"][0]["obj_ids"] == [] for v in stored)
    assert not (tmp_path / "out/test/gt").exists()


def test_duplicate_sentence_with_the_same_objects_is_left_out_with_a_warning(train_dir: Path, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = dict(TRAIN_EXPRESSIONS, squares=[*TRAIN_EXPRESSIONS["squares"], {"sentence": "the red square", "object_ids": [1]}])
    (train_dir / "expressions.json").write_text(json.dumps(data))
    prepare_folder(train_dir, tmp_path / "out", "train")
    squares = read_split(tmp_path / "out/train")[0]
    assert [e["exp_id"] for e in squares["expressions"]] == ["0", "1", "2"]
    assert "expression 3 ('the red square'): the same sentence and objects as" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input


def _expr(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        data = json.loads((root / "expressions.json").read_text())
        edit(data)
        (root / "expressions.json").write_text(json.dumps(data))
    return apply


def _mask(name: str = "img_10", obj: int = 1) -> str:
    return f"squares/masks/{obj}/{name}.png"


def _save(relative: str, image: Image.Image) -> Callable[[Path], None]:
    return lambda root: image.save(root / relative)


BAD = {  # case -> (edit of the train folder, bad video, words of the message)
    "unknown video": (_expr(lambda d: d.update(ghost=[{"sentence": "a ghost", "object_ids": [1]}])), "ghost",
                      ["expressions.json", "no folder", "ghost"]),
    "object without a mask": (_expr(lambda d: d["squares"].append({"sentence": "the third", "object_ids": [3]})), "squares",
                              ["expressions.json", "expression 3", "'the third'", "object 3 has no mask in any frame", "[1, 2]"]),
    "mask of another size": (_save(_mask(), Image.new("L", (28, 20))), "squares", [_mask(), "mask is 28x20, its frame is 56x40"]),
    "rgb mask": (_save(_mask(), Image.new("RGB", (W, H))), "squares", [_mask(), "mode RGB", "single-channel"]),
    "16-bit mask": (_save(_mask(), Image.fromarray(np.full((H, W), 300, np.uint16))), "squares", [_mask(), "16-bit"]),
    "mask not binary": (_save(_mask(), Image.fromarray(np.arange(H * W, dtype=np.uint8).reshape(H, W) % 3 * 100)), "squares",
                        [_mask(), "not a binary mask", "0, 100, 200"]),
    "jpeg mask": (_save(_mask().replace(".png", ".jpg"), Image.new("L", (W, H))), "squares", ["img_10.jpg", "must be PNG"]),
    "mask without a frame": (_save(_mask("img_99"), Image.new("L", (W, H))), "squares",
                             [_mask("img_99"), "no frame 'img_99'", "img_0 ... img_35"]),
    "mask named by index": (_save(_mask("3"), Image.new("L", (W, H))), "squares", [_mask("3"), "no frame '3'"]),
    "mp4 mask without a frame": (_save("clip/masks/00008.png", Image.new("L", (W, H))), "clip",
                                 ["clip/masks/00008.png", "8 frames", "00000 ... 00007"]),
    "frame of another size": (_save("squares/frames/img_15.jpg", Image.new("RGB", (W, H + 2))), "squares",
                              ["squares/frames/img_15.jpg", "56x42", "56x40"]),
    "unreadable frame": (lambda r: (r / "squares/frames/img_15.jpg").write_bytes(b"\xff\xd8 not a jpeg"), "squares",
                         ["squares/frames/img_15.jpg", "not a readable image"]),
    "16-bit png frame": (lambda r: [(r / "squares/frames/img_15.jpg").unlink(),
                                    Image.fromarray(np.zeros((H, W), np.uint16)).save(r / "squares/frames/img_15.png")], "squares",
                         ["squares/frames/img_15.png", "16-bit"]),
    "two files of one frame": (lambda r: Image.new("RGB", (W, H)).save(r / "squares/frames/img_15.png"), "squares",
                               ["img_15.jpg and img_15.png", "same frame"]),
    "empty sentence": (_expr(lambda d: d["squares"][1].update(sentence=" . ")), "squares",
                       ["expressions.json", "video 'squares' expression 1", "non-empty string"]),
    "sentence naming no object": (_expr(lambda d: d["squares"][1].update(object_ids=[])), "squares",
                                  ["expression 1", "names no object"]),
    "object id zero": (_expr(lambda d: d["squares"][1].update(object_ids=[0])), "squares", ["expression 1", "object id 0"]),
    "unknown key": (_expr(lambda d: d["squares"][1].update(objects=[2])), "squares", ["expression 1", "unknown keys ['objects']"]),
    "duplicate sentence, other objects": (_expr(lambda d: d["squares"].append({"sentence": "The red square", "object_ids": [2]})),
                                          "squares", ["expression 3", "'the red square'", "expression 0", "other objects"]),
    "no frames": (lambda r: [p.unlink() for p in (r / "squares/frames").iterdir()], "squares", ["squares/frames", "no frames"]),
    "frames in two places": (lambda r: (r / "squares.mp4").write_bytes((r / "clip.mp4").read_bytes()), "squares",
                             ["squares.mp4", "squares/frames", "keep one"]),
    "too few annotated frames": (lambda r: [p.unlink() for p in (r / "clip/masks").iterdir() if p.stem != "00000"], "clip",
                                 ["clip.mp4", "1 usable frames", "min_frames=2"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_video_names_the_file_and_is_skipped_and_counted_with_skip_bad(
        train_dir: Path, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    edit, video, words = BAD[case]
    edit(train_dir)
    with pytest.raises(ConversionError) as err:
        prepare_folder(train_dir, tmp_path / "strict", "train", min_frames=2)
    message = str(err.value)
    assert f"'{video}'" in message and all(w in message for w in words), message
    assert not (tmp_path / "strict").exists()  # nothing left behind
    capsys.readouterr()
    manifest = prepare_folder(train_dir, tmp_path / "lenient", "train", skip_bad=True, min_frames=2)
    assert f"skipping video '{video}'" in capsys.readouterr().err
    kept = [c.name for c in TRAIN if c.name != video]
    assert manifest.videos == len(kept) and [s["video"] for s in manifest.skipped] == [video]
    assert Manifest.load(tmp_path / "lenient" / "train").skipped == manifest.skipped
    assert [v["video"] for v in read_split(tmp_path / "lenient" / "train")] == kept
    gt = json.loads((tmp_path / "lenient/train/gt/meta_expressions.json").read_text())["videos"]
    assert list(gt) == kept


SPLIT_FAULTS = {  # always raise, --skip-bad or not
    "no expressions file": (lambda r: (r / "expressions.json").unlink(), ["no expressions.json or expressions.csv"]),
    "two expressions files": (lambda r: (r / "expressions.csv").write_text("video,object_ids,sentence\n"), ["both", "keep one"]),
    "malformed json": (lambda r: (r / "expressions.json").write_text('{"squares": [\n  {"sentence": }]}'),
                       ["expressions.json", "line 2 column"]),
    "csv header": (lambda r: [(r / "expressions.json").unlink(), (r / "expressions.csv").write_text("video,objects,sentence\n")],
                   ["expressions.csv", "header", "video,object_ids,sentence"]),
    "video names that make one shard key": (_expr(lambda d: d.update({"clip_": d["clip"], "clip.": d["clip"]})),
                                            ["'clip_' and 'clip.'", "rename one"]),
    "labelled and unlabelled mixed": (lambda r: shutil.rmtree(r / "clip/masks"),
                                      ["1 video without a masks/ folder (clip)", "all labelled"]),
}


@pytest.mark.parametrize("case", list(SPLIT_FAULTS))
def test_faults_of_the_split_always_stop(train_dir: Path, tmp_path: Path, case: str) -> None:
    edit, words = SPLIT_FAULTS[case]
    edit(train_dir)
    with pytest.raises(ConversionError) as err:
        prepare_folder(train_dir, tmp_path / "out", "train", skip_bad=True)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_csv_row_faults_name_the_line(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "src", TRAIN, TRAIN_EXPRESSIONS, "csv")
    lines = (root / "expressions.csv").read_text().splitlines()
    lines[2] = "squares,2,the blue square, moving"  # an unquoted comma
    lines[4] = "clip,1 x,the red square"
    (root / "expressions.csv").write_text("\n".join(lines) + "\n")
    manifest = prepare_folder(root, tmp_path / "out", "train", skip_bad=True)
    reasons = {s["video"]: s["reason"] for s in manifest.skipped}
    assert "expressions.csv line 3: video 'squares'" in reasons["squares"] and "double quotes" in reasons["squares"]
    assert "expressions.csv line 5: video 'clip'" in reasons["clip"] and "'1 x'" in reasons["clip"]


def test_unused_entries_are_noted(train_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (train_dir / "extra" / "frames").mkdir(parents=True)
    prepare_folder(train_dir, tmp_path / "out", "train")
    assert "1 entry of" in capsys.readouterr().err


# ---------------------------------------------------------------- CLI and manifest


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="glus prepare")
    configure_prepare_parser(parser)
    return parser.parse_args(argv)


def test_cli_manifest_and_the_re_prepare_hint(train_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert _parse(["folder", "--root", "r", "--out", "o"]).split == "train"  # the default split
    assert run_prepare(_parse(["folder", "--root", str(train_dir), "--out", str(out), "--min-frames", "4", "--skip-bad",
                               "--videos-per-shard", "1"])) == 0
    printed = capsys.readouterr().out
    assert "folder/train: 2 videos, 12 frames, 5 expressions, 4 objects in 2 shards" in printed
    assert f"--gt {out / 'train/gt/mask_dict.json'} --meta {out / 'train/gt/meta_expressions.json'}" in printed
    written = json.loads((out / "train" / MANIFEST).read_text())
    assert written["dataset"] == "folder" and written["converter"] == {
        "name": "folder", "version": 1,
        "options": {"root": str(train_dir.resolve()), "split": "train", "videos_per_shard": 1, "skip_bad": True, "min_frames": 4}}
    # the command a newer glus-lightning prints to re-prepare this split parses back to the same options
    hint = _prepare_hint(written, out / "train")
    command = shlex.split(re.search(r"run `([^`]+)`", hint).group(1))
    assert command[:3] == ["glus", "prepare", "folder"]
    args = build_parser().parse_args(command[1:])
    assert (args.root, args.out, args.split, args.min_frames, args.skip_bad, args.videos_per_shard) == (
        train_dir.resolve(), out, "train", 4, True, 1)
    assert run_prepare(_parse(["folder", "--root", str(train_dir), "--out", str(out)])) == 1  # refuses to mix
    assert "already holds 2 shards" in capsys.readouterr().err


# ---------------------------------------------------------------- docs/own_data.md, every command


def doc_commands() -> list[str]:
    text = DOC.read_text()
    block = re.search(r"<!-- test:own-data -->\n```bash\n(.*?)```", text, re.DOTALL)
    assert block, f"{DOC}: no <!-- test:own-data --> block"
    return [line for line in block.group(1).splitlines() if line.strip()]


TINY = ["data.num_workers=0", "data.batch_size=1", "data.max_expressions=1", "data.samples_per_epoch=2", "data.shuffle_buffer=2", "trainer.max_steps=2", "text_warmup.steps=0",
        "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=2"]


def test_every_command_of_the_doc_from_folders_to_a_j_and_f_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_folder(tmp_path / "my_videos" / "train", TRAIN, TRAIN_EXPRESSIONS, "json")
    write_folder(tmp_path / "my_videos" / "val", VAL, VAL_EXPRESSIONS, "csv")
    commands = doc_commands()
    assert [c.split()[1] for c in commands] == ["prepare", "prepare", "fit", "validate", "predict", "evaluate"]
    for command in commands:
        line = command.replace("my_videos/", f"{tmp_path}/my_videos/").replace("data/own", f"{tmp_path}/data/own")
        line = line.replace("runs/", f"{tmp_path}/runs/")
        words = shlex.split(line)
        assert words[0] == "glus"
        if words[1] in ("fit", "validate", "predict"):  # tiny sizes: config overrides go before the first --option
            at = next((i for i, w in enumerate(words) if w.startswith("--")), len(words))
            words[at:at] = [*TINY, f"run_dir={tmp_path}/runs"]
        if words[1] == "evaluate":
            words.append("--no-progress")
        assert main(words[1:]) == 0, line
    out = capsys.readouterr().out
    assert "folder/train: 2 videos, 12 frames" in out and "folder/val: 2 videos, 12 frames" in out
    assert (tmp_path / "runs/own/version_0/checkpoints/last.ckpt").is_file()
    predictions = tmp_path / "runs/own/predictions/Annotations"
    for clip, rows in zip(VAL, VAL_EXPRESSIONS.values(), strict=True):
        for exp_id in range(len(rows)):
            assert sorted(p.stem for p in (predictions / clip.name / str(exp_id)).iterdir()) == sorted(clip.annotated)
    assert "4 expressions in 2 videos" in out
    validated = next(r for r in csv.DictReader((tmp_path / "runs/own/val.csv").open()) if r["level"] == "overall")
    evaluated = next(r for r in csv.DictReader((tmp_path / "runs/own/predictions_eval.csv").open()) if r["level"] == "overall")
    assert float(evaluated["J&F"]) == pytest.approx(float(validated["J&F"]), abs=1e-5)  # the doc says: the same numbers
