"""``glus evaluate`` on tiny ground truth in both official layouts, and ``glus test`` on tiny shards.

Expected scores are computed independently: targets come from the dataset converters' records
(``VideoRecord.expression_mask``), scores per frame with ``mask_iou`` / ``boundary_f``, then averaged.
"""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_official import write_tiny_mevis, write_tiny_ref_youtube_vos
from PIL import Image

from datamodules.converters import open_mevis, open_ref_youtube_vos
from datamodules.datamodule import shard_samples
from datamodules.formats import ConversionError
from datamodules.prepare import prepare_synthetic
from datamodules.records import VideoRecord
from glus_lightning import runner
from glus_lightning.cli import main
from glus_lightning.config import compose
from glus_lightning.evaluation import EvaluationError, default_csv_path, evaluate
from glus_lightning.metrics import boundary_f, mask_iou

MODES = ("same", "empty", "shifted", "missing", "one_frame_missing")


def write_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def write_predictions(records: list[VideoRecord], out: Path, all_frames: dict[str, list[str]] | None = None) -> dict:
    """Predictions cycling through MODES; returns ``{key: (pred [T,H,W], target [T,H,W], mode, missing frames)}``."""
    cases = {}
    for record in records:
        for e, expression in enumerate(record.expressions):
            mode = MODES[len(cases) % len(MODES)]
            target = np.stack([record.expression_mask(expression, t) for t in range(record.num_frames)]).astype(bool)
            pred = {"same": target, "empty": np.zeros_like(target), "shifted": np.roll(target, (2, 3), axis=(1, 2)),
                    "missing": np.zeros_like(target), "one_frame_missing": target.copy()}[mode]
            missing = {"missing": record.num_frames, "one_frame_missing": 1}.get(mode, 0)
            if mode == "one_frame_missing":
                pred[1] = False
            if mode != "missing":
                for t, name in enumerate(record.frame_names):
                    if not (mode == "one_frame_missing" and t == 1):
                        write_png(out / record.video / expression.exp_id / f"{name}.png", pred[t])
                # frames without ground truth get a full mask: it must not be scored
                for name in set((all_frames or {}).get(record.video, [])) - set(record.frame_names):
                    write_png(out / record.video / expression.exp_id / f"{name}.png", np.ones_like(target[0]))
            cases[f"{record.video}/{expression.exp_id}"] = (pred, target, mode, missing)
    return cases


def expected(cases: dict) -> dict[str, tuple[float, float]]:
    """Mean over frames of per-frame J and F, each frame scored on its own; 0 for an expression without predictions."""
    scores = {}
    for key, (pred, target, mode, _) in cases.items():
        if mode == "missing":
            scores[key] = (0.0, 0.0)
            continue
        pairs = [(torch.from_numpy(p), torch.from_numpy(t)) for p, t in zip(pred, target)]
        scores[key] = (float(np.mean([mask_iou(p, t).item() for p, t in pairs])),
                       float(np.mean([boundary_f(p, t).item() for p, t in pairs])))
    return scores


def check_result(result, cases: dict) -> None:
    want = expected(cases)
    assert set(result.expressions) == set(want)
    for key, (j, f) in want.items():
        got = result.expressions[key]
        assert got["J"] == pytest.approx(j, abs=1e-9) and got["F"] == pytest.approx(f, abs=1e-9), key
        assert got["J&F"] == pytest.approx((j + f) / 2, abs=1e-9)
        mode = cases[key][2]
        if mode == "same":
            assert got["J"] == 1.0 and got["F"] == 1.0
        if mode in ("empty", "missing"):
            assert got["J"] < 1.0  # every expression's object shows in some frame
        if mode == "shifted":
            assert 0.0 < got["J"] < 1.0 and got["F"] < 1.0
    assert result.overall["J"] == pytest.approx(np.mean([j for j, _ in want.values()]), abs=1e-9)
    assert result.overall["F"] == pytest.approx(np.mean([f for _, f in want.values()]), abs=1e-9)
    assert result.missing == {k: c[3] for k, c in cases.items() if c[3]}
    for video in {k.rpartition("/")[0] for k in want}:
        own = [v for k, v in want.items() if k.rpartition("/")[0] == video]
        assert result.videos[video]["J"] == pytest.approx(np.mean([j for j, _ in own]), abs=1e-9)


@pytest.fixture
def mevis(tmp_path: Path) -> tuple[Path, dict]:
    root = write_tiny_mevis(tmp_path / "mevis", split="valid_u", num_videos=2, frames=5, size=40)
    records = list(open_mevis(root, "valid_u", 1, False).records())
    cases = write_predictions(records, tmp_path / "pred")
    assert {c[2] for c in cases.values()} == set(MODES)
    return root / "valid_u", cases


def test_mevis_scores_match_per_frame_computation(mevis: tuple[Path, dict], tmp_path: Path) -> None:
    split, cases = mevis
    result = evaluate(tmp_path / "pred", split / "mask_dict.json", split / "meta_expressions.json", progress=False)
    check_result(result, cases)


def test_ref_youtube_vos_dir_and_zip_layouts(tmp_path: Path) -> None:
    root = write_tiny_ref_youtube_vos(tmp_path / "ytvos", split="valid", num_videos=2, frames=6, annotate_every=2)
    records = list(open_ref_youtube_vos(root, "valid", 1, False).records())
    meta = root / "meta_expressions" / "valid" / "meta_expressions.json"
    all_frames = {v: e["frames"] for v, e in json.loads(meta.read_text())["videos"].items()}
    cases = write_predictions(records, tmp_path / "sub" / "Annotations", all_frames)
    result = evaluate(tmp_path / "sub", root / "valid" / "Annotations", meta, progress=False)
    check_result(result, cases)
    # the submission zip layout scores the same
    with zipfile.ZipFile(tmp_path / "sub.zip", "w") as zf:
        for png in sorted((tmp_path / "sub").rglob("*.png")):
            zf.write(png, png.relative_to(tmp_path / "sub").as_posix())
    zipped = evaluate(tmp_path / "sub.zip", root / "valid", meta, progress=False)
    assert zipped.expressions == result.expressions and zipped.missing == result.missing


def test_cli_table_and_csv(mevis: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    split, cases = mevis
    pred = tmp_path / "pred"
    args = ["evaluate", "--pred", str(pred), "--gt", str(split / "mask_dict.json"), "--meta", str(split / "meta_expressions.json")]
    assert main([*args, "--no-progress"]) == 0
    out = capsys.readouterr().out
    missing_keys = [k for k, c in cases.items() if c[2] == "missing"]
    assert "overall" in out and "scored J = F = 0" in out and all(k in out for k in missing_keys)
    path = default_csv_path(pred)
    assert path == tmp_path / "pred_eval.csv" and path.is_file()
    rows = list(csv.DictReader(path.open()))
    want = expected(cases)
    expression_rows = {f"{r['video']}/{r['exp_id']}": r for r in rows if r["level"] == "expression"}
    assert set(expression_rows) == set(want)
    for key, (j, f) in want.items():
        row = expression_rows[key]
        assert float(row["J"]) == pytest.approx(j, abs=1e-6) and float(row["F"]) == pytest.approx(f, abs=1e-6)
        assert int(row["missing_frames"]) == cases[key][3] and int(row["frames"]) == len(cases[key][1])
    videos = {k.rpartition("/")[0] for k in want}
    assert {r["video"] for r in rows if r["level"] == "video"} == videos
    overall = [r for r in rows if r["level"] == "overall"]
    assert len(overall) == 1 and float(overall[0]["J&F"]) == pytest.approx(np.mean([(j + f) / 2 for j, f in want.values()]), abs=1e-6)
    assert int(overall[0]["missing_frames"]) == sum(c[3] for c in cases.values())


def test_bad_ground_truth_meta_or_prediction_names_the_file(mevis: tuple[Path, dict], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    split, cases = mevis
    pred, gt, meta = tmp_path / "pred", split / "mask_dict.json", split / "meta_expressions.json"
    with pytest.raises(EvaluationError, match="nope.json: file not found"):
        evaluate(pred, gt, tmp_path / "nope.json", progress=False)
    with pytest.raises(EvaluationError, match="absent: neither mask_dict.json nor an Annotations directory"):
        evaluate(pred, tmp_path / "absent", meta, progress=False)
    with pytest.raises(EvaluationError, match="no_such_pred: neither a prediction directory nor a .zip"):
        evaluate(tmp_path / "no_such_pred", gt, meta, progress=False)
    bad_meta = tmp_path / "bad_meta.json"
    bad_meta.write_text('{"videos": [1, 2]}')
    with pytest.raises(ConversionError, match="bad_meta.json: expected an object"):
        evaluate(pred, gt, bad_meta, progress=False)
    broken = tmp_path / "broken" / "mask_dict.json"
    broken.parent.mkdir()
    broken.write_text('{"0": [')
    with pytest.raises(ConversionError, match="broken/mask_dict.json: malformed JSON"):
        evaluate(pred, broken, meta, progress=False)
    masks = json.loads(gt.read_text())
    dropped = min(masks)
    del masks[dropped]
    broken.write_text(json.dumps(masks))
    with pytest.raises(EvaluationError, match=f"mask_dict.json: anno_id {dropped} of .*: must be a list of 5 RLEs or nulls.*no entry"):
        evaluate(pred, broken, meta, progress=False)
    # a prediction of the wrong size is an error naming its file, not a silent resize
    key = next(k for k, c in cases.items() if c[2] == "same")
    frame = min((pred / key).glob("*.png"))
    write_png(frame, np.zeros((7, 9), dtype=bool))
    with pytest.raises(EvaluationError, match=f"{frame}: prediction is 9x7, its ground truth is 40x40"):
        evaluate(pred, gt, meta, progress=False)
    # the command prints the message and fails instead of a traceback
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--meta", str(tmp_path / "nope.json"), "--no-progress"]) == 1
    assert "glus evaluate: error: --meta" in capsys.readouterr().err


def test_glus_test_on_tiny_shards_gives_j_f_and_csv(tmp_path: Path) -> None:
    # scenes of generator version 1 (twins 0.5, shortest names), where every expression's target differs in size
    prepare_synthetic(tmp_path / "data", seed=3, num_train=1, num_val=1, frames=4, size=32, twins=0.5, naming="shortest")
    # every logit is above the threshold: each prediction is the whole frame, so the scores are known in advance
    cfg = compose([f"data.root={tmp_path / 'data'}", "data.num_workers=0", "data.num_context=2", "data.num_query=2",
                   "data.synthetic.twins=0.5", "data.synthetic.naming=shortest", f"run_dir={tmp_path / 'runs'}",
                   "mask_threshold=-1e30"])
    results = runner.test(cfg, csv=tmp_path / "test.csv")
    assert set(results) == {"test/J", "test/F", "test/J&F"}
    val_records = [VideoRecord.from_sample(s) for url in sorted((tmp_path / "data" / "val").glob("*.tar"))
                   for s in shard_samples(str(url), handler=lambda err: False)]
    # by hand, per expression: J of a whole-frame prediction is the object's share of the frame (mean over frames);
    # its boundary is the last row and column, more than the 1-pixel tolerance (32x32) from any object: F = 0
    hand = {}
    for record in val_records:
        for expression in record.expressions:
            target = np.stack([record.expression_mask(expression, t) for t in range(record.num_frames)]).astype(bool)
            assert not target[:, -2:, :].any() and not target[:, :, -2:].any()
            hand[f"{record.dataset}/{record.video}/{expression.exp_id}"] = float(np.mean(target.mean(axis=(1, 2))))
    assert 0.0 < min(hand.values()) and len(set(np.round(list(hand.values()), 6))) == len(hand)  # not trivial, not swappable
    assert results["test/J"] == pytest.approx(np.mean(list(hand.values())), abs=1e-6)
    assert results["test/F"] == 0.0
    assert results["test/J&F"] == pytest.approx(results["test/J"] / 2)
    rows = list(csv.DictReader((tmp_path / "test.csv").open()))
    expressions = {f"{r['video']}/{r['exp_id']}": r for r in rows if r["level"] == "expression"}
    assert set(expressions) == set(hand)
    for key, j in hand.items():
        assert float(expressions[key]["J"]) == pytest.approx(j, abs=1e-6) and float(expressions[key]["F"]) == 0.0, key
    overall = next(r for r in rows if r["level"] == "overall")
    assert float(overall["J"]) == pytest.approx(results["test/J"], abs=1e-6)
    assert float(overall["F"]) == pytest.approx(results["test/F"], abs=1e-6)


# ---------------------------------------------------------------- official rules: missing predictions, 16-bit PNGs


def _square(size: int = 8) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[2:5, 2:5] = True
    return mask


def _write_mevis_split(split: Path, videos: dict[str, dict[str, str]], objects: dict[str, list[np.ndarray | None]]) -> None:
    """``meta_expressions.json`` (video -> exp_id -> anno_id, frames 00000, 00001) and ``mask_dict.json``."""
    from pycocotools import mask as coco_mask

    split.mkdir(parents=True)
    meta = {"videos": {v: {"frames": ["00000", "00001"],
                           "expressions": {e: {"exp": f"object {a}", "obj_id": [int(a)], "anno_id": [int(a)]}
                                           for e, a in exps.items()}}
                       for v, exps in videos.items()}}
    rles = {}
    for anno_id, frames in objects.items():
        rles[anno_id] = []
        for m in frames:
            rle = None if m is None else coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
            rles[anno_id].append(None if rle is None else {"size": rle["size"], "counts": rle["counts"].decode()})
    (split / "meta_expressions.json").write_text(json.dumps(meta))
    (split / "mask_dict.json").write_text(json.dumps(rles))


def test_missing_video_and_expression_score_zero_like_the_official_mevis_script(tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture) -> None:
    # every object shows in frame 00000 only (a 3x3 square in 8x8), 00001 is empty
    square, empty = _square(), np.zeros((8, 8), dtype=bool)
    _write_mevis_split(tmp_path / "gt", {"A": {"0": "0", "1": "0", "2": "0"}, "B": {"0": "1", "1": "1"}},
                       {"0": [square, None], "1": [square, None]})
    pred = tmp_path / "pred"
    write_png(pred / "A" / "0" / "00000.png", square)  # exact: J = F = 1
    write_png(pred / "A" / "0" / "00001.png", empty)
    (pred / "A" / "1").mkdir()  # A/1: an empty folder, no PNG at all: J = F = 0
    write_png(pred / "A" / "2" / "00001.png", empty)  # A/2: 00000 missing (empty mask: J = F = 0), 00001 right (1): 0.5
    # B: no folder at all: both expressions J = F = 0 (scored as empty masks they would get 0.5 each)
    gt, meta = tmp_path / "gt" / "mask_dict.json", tmp_path / "gt" / "meta_expressions.json"
    result = evaluate(pred, gt, meta, progress=False)
    by_hand = {"A/0": 1.0, "A/1": 0.0, "A/2": 0.5, "B/0": 0.0, "B/1": 0.0}
    assert list(result.expressions) == list(by_hand)  # in the order of meta_expressions.json
    for key, value in by_hand.items():
        assert result.expressions[key] == {"J": value, "F": value, "J&F": value}, key
    assert result.videos["A"]["J&F"] == pytest.approx(1.5 / 3) and result.videos["B"]["J&F"] == 0.0
    assert result.overall == {"J": pytest.approx(1.5 / 5), "F": pytest.approx(1.5 / 5), "J&F": pytest.approx(1.5 / 5)}
    assert result.absent_videos == ["B"] and result.absent_expressions == ["A/1", "B/0", "B/1"]
    assert result.missing == {"A/1": 2, "A/2": 1, "B/0": 2, "B/1": 2}
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--meta", str(meta), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "no predictions for 1 of 2 videos (2 expressions), scored J = F = 0: B" in out
    assert "no predictions for 1 more expression (of videos that have some), scored J = F = 0: A/1" in out
    assert "A/2: 1 of 2 frames" in out and any(line.startswith("overall") and "30.00" in line for line in out.splitlines())
    rows = {(r["level"], r["video"], r["exp_id"]): r for r in csv.DictReader(default_csv_path(pred).open())}
    assert float(rows[("overall", "", "")]["J&F"]) == pytest.approx(0.3) and rows[("overall", "", "")]["missing_frames"] == "7"


def test_sixteen_bit_png_prediction_is_refused_naming_the_file(mevis: tuple[Path, dict], tmp_path: Path) -> None:
    split, cases = mevis
    key = next(k for k, c in cases.items() if c[2] == "same")
    frame = min((tmp_path / "pred" / key).glob("*.png"))
    mask = np.asarray(Image.open(frame)) != 0
    # 0/255 in 16 bits: the official reader (cv2 grayscale, 16 -> 8 bits divides by 256) sees an empty mask
    Image.fromarray(mask.astype(np.uint16) * 255).save(frame)
    with Image.open(frame) as img:
        assert img.mode.startswith("I;16") and img.getextrema()[1] == 255
    with pytest.raises(EvaluationError, match=f"{frame}: a 16-bit PNG.*8-bit.*0/255.*palette"):
        evaluate(tmp_path / "pred", split / "mask_dict.json", split / "meta_expressions.json", progress=False)


# ---------------------------------------------------------------- scoring protocols (--protocol)

# One video, 5 frames of 16x16 (boundary tolerance ceil(0.008 * sqrt(16^2 + 16^2)) = 1 pixel). A k x k square away from
# the image border has 4k DAVIS boundary pixels (seg2bmap marks the inside pixels of its right column and bottom row,
# 2k - 1, and the outside pixels left of it and above it, corner included, 2k + 1).
_A = (slice(2, 5), slice(2, 5))  # object 1: a 3x3 square, 12 boundary pixels
_B = (slice(10, 12), slice(2, 4))  # object 2: a 2x2 square, 8 boundary pixels; absent from frame 3
_FAR = (slice(10, 12), slice(10, 12))  # a 2x2 square far (> 1 pixel) from both


def _box(*where: tuple[slice, slice]) -> np.ndarray:
    mask = np.zeros((16, 16), dtype=bool)
    for rows, cols in where:
        mask[rows, cols] = True
    return mask


# per frame: (prediction, J, F) by hand
_EXPRESSION_0 = [  # object 1
    (_box(), 0.0, 0.0),  # empty: J = 0; no predicted boundary: precision 1, recall 0, F = 0
    (_box(_A), 1.0, 1.0),  # exact
    (_box(_A, _FAR), 9 / 13, 0.75),  # plus a far square: J = 9 / (9 + 4); precision 12 / (12 + 8), recall 1: F = 1.2 / 1.6
    (_box((slice(2, 5), slice(3, 6))), 6 / 12, 1.0),  # one column right: J = 6 / 12; every boundary pixel moves 1 <= 1: F = 1
    (_box(_FAR), 0.0, 0.0),  # only far away: no overlap, no boundary match
]
_EXPRESSION_1 = [  # object 2
    (_box(_B), 1.0, 1.0),
    (_box(), 0.0, 0.0),
    (_box(_B), 1.0, 1.0),
    (_box(), 1.0, 1.0),  # both empty (object 2 is absent from frame 3): J = F = 1, the DAVIS convention
    (_box(), 0.0, 0.0),
]


def _protocol_case(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """The case above in both ground-truth layouts: (predictions, Annotations dir, mask_dict.json, meta)."""
    from pycocotools import mask as coco_mask

    frames = [f"{t:05d}" for t in range(5)]
    meta = tmp_path / "meta_expressions.json"
    meta.write_text(json.dumps({"videos": {"v": {"frames": frames, "expressions": {
        "0": {"exp": "the big square", "obj_id": "1", "anno_id": ["0"]},
        "1": {"exp": "the small square", "obj_id": "2", "anno_id": ["1"]}}}}}))
    objects = {1: [_box(_A)] * 5, 2: [_box(_B) if t != 3 else _box() for t in range(5)]}
    for t, name in enumerate(frames):
        ids = np.zeros((16, 16), dtype=np.uint8)
        for obj_id, masks in objects.items():
            ids[masks[t]] = obj_id
        png = Image.fromarray(ids, mode="P")
        png.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
        (tmp_path / "Annotations" / "v").mkdir(parents=True, exist_ok=True)
        png.save(tmp_path / "Annotations" / "v" / f"{name}.png")
    rles = {}
    for obj_id, masks in objects.items():
        encoded = [coco_mask.encode(np.asfortranarray(m.astype(np.uint8))) if m.any() else None for m in masks]
        rles[str(obj_id - 1)] = [None if r is None else {"size": r["size"], "counts": r["counts"].decode()} for r in encoded]
    (tmp_path / "mask_dict.json").write_text(json.dumps(rles))
    for exp_id, cases in (("0", _EXPRESSION_0), ("1", _EXPRESSION_1)):
        for name, (pred, _, _) in zip(frames, cases):
            write_png(tmp_path / "pred" / "v" / exp_id / f"{name}.png", pred)
    return tmp_path / "pred", tmp_path / "Annotations", tmp_path / "mask_dict.json", meta


def _by_hand(frames: slice) -> dict[str, dict[str, float]]:
    """J and F per expression: the mean of the hand values over ``frames``; then the means over both expressions."""
    scores = {}
    for key, cases in (("v/0", _EXPRESSION_0), ("v/1", _EXPRESSION_1)):
        j, f = (sum(c[i] for c in cases[frames]) / len(cases[frames]) for i in (1, 2))
        scores[key] = {"J": j, "F": f, "J&F": (j + f) / 2}
    j, f = (sum(s[m] for s in scores.values()) / 2 for m in ("J", "F"))
    return {**scores, "overall": {"J": j, "F": f, "J&F": (j + f) / 2}}


@pytest.mark.parametrize("layout", ["annotations", "mask_dict"])
def test_each_protocol_scores_the_crafted_case_as_computed_by_hand(tmp_path: Path, layout: str) -> None:
    pred, annotations, mask_dict, meta = _protocol_case(tmp_path)
    gt = annotations if layout == "annotations" else mask_dict
    every_frame, toolkit = _by_hand(slice(None)), _by_hand(slice(1, -1))
    # the numbers, written out: every frame J = (0 + 1 + 9/13 + 1/2 + 0)/5 and 3/5, F = 2.75/5 and 3/5;
    # toolkit (frames 1-3) J = (1 + 9/13 + 1/2)/3 and 2/3, F = 2.75/3 and 2/3
    assert every_frame["overall"]["J"] == pytest.approx(((1 + 9 / 13 + 0.5) / 5 + 3 / 5) / 2)
    assert toolkit["overall"]["F"] == pytest.approx((2.75 / 3 + 2 / 3) / 2)
    for protocol, want in (("mevis", every_frame), ("davis17", every_frame), ("davis17-toolkit", toolkit)):
        result = evaluate(pred, gt, meta, progress=False, protocol=protocol)
        assert result.protocol == protocol
        for key in ("v/0", "v/1"):
            for score in ("J", "F", "J&F"):
                assert result.expressions[key][score] == pytest.approx(want[key][score], abs=1e-12), (protocol, key, score)
        for score in ("J", "F", "J&F"):
            assert result.overall[score] == pytest.approx(want["overall"][score], abs=1e-12), (protocol, score)
            assert result.videos["v"][score] == pytest.approx(want["overall"][score], abs=1e-12)
        assert result.frames == ({"v/0": 3, "v/1": 3} if protocol == "davis17-toolkit" else {"v/0": 5, "v/1": 5})
    # the default follows the layout and gives today's numbers: mevis for mask_dict.json, davis17 for Annotations
    default = evaluate(pred, gt, meta, progress=False)
    assert default.protocol == ("davis17" if layout == "annotations" else "mevis")
    assert default.overall == pytest.approx(every_frame["overall"], abs=1e-12)


def test_toolkit_protocol_reads_no_first_or_last_frame_and_needs_three_frames(tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    pred, annotations, _, meta = _protocol_case(tmp_path)
    (pred / "v" / "0" / "00000.png").unlink()  # an empty prediction either way: same scores, but a missing frame
    (pred / "v" / "1" / "00004.png").unlink()
    assert evaluate(pred, annotations, meta, progress=False, protocol="davis17").missing == {"v/0": 1, "v/1": 1}
    toolkit = evaluate(pred, annotations, meta, progress=False, protocol="davis17-toolkit")
    assert toolkit.missing == {} and toolkit.overall == pytest.approx(_by_hand(slice(1, -1))["overall"], abs=1e-12)
    # the table says which protocol scored it
    args = ["evaluate", "--pred", str(pred), "--gt", str(annotations), "--meta", str(meta), "--no-progress"]
    assert main([*args, "--protocol", "davis17-toolkit", "--csv", str(tmp_path / "t.csv")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("protocol: davis17-toolkit (DAVIS-2017 toolkit: first and last annotated frame")
    assert main([*args, "--csv", str(tmp_path / "d.csv")]) == 0
    assert capsys.readouterr().out.startswith("protocol: davis17 (every annotated frame")
    # two frames: nothing is left once the first and last are out
    short = tmp_path / "short.json"
    videos = json.loads(meta.read_text())
    videos["videos"]["v"]["frames"] = ["00000", "00001"]
    short.write_text(json.dumps(videos))
    with pytest.raises(EvaluationError, match=r"v/0: 2 annotated frame\(s\); protocol davis17-toolkit leaves out"):
        evaluate(pred, annotations, short, progress=False, protocol="davis17-toolkit")
    assert main([*args[:-3], "--meta", str(short), "--protocol", "davis17-toolkit", "--no-progress",
                 "--csv", str(tmp_path / "s.csv")]) == 1
    assert "glus evaluate: error: v/0: 2 annotated frame(s)" in capsys.readouterr().err
