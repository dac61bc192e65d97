"""``glus evaluate --protocol revos`` on a crafted ReVOS split, against scores worked out by hand.

One 16x16 video ``v1`` of two frames (DAVIS boundary tolerance ceil(0.008 * sqrt(16^2 + 16^2)) = 1 pixel) with three
expressions, one of each type, and a video ``v2`` without predictions. A k x k square away from the image border has
4k DAVIS boundary pixels (see tests/test_evaluation.py). The per-frame J, F, A and R below are worked out by hand; the
A and R of the official script are also recomputed in this file from raw uint8 values, to show where it departs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glus_lightning.cli import main
from glus_lightning.evaluation import CSV_COLUMNS, EvaluationError, evaluate

SIZE = 16
FRAMES = ["00000", "00001"]
EPS = 1e-6  # the official robustness adds it to the foreground's pixel count


def box(*where: tuple[slice, slice]) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    for rows, cols in where:
        mask[rows, cols] = True
    return mask


A = box((slice(2, 5), slice(2, 5)))  # object 0: 3x3 square, 9 pixels, 12 boundary pixels; in both frames
B = box((slice(10, 12), slice(2, 4)))  # object 1: 2x2 square, 4 pixels; frame 0 only
C = box((slice(6, 9), slice(6, 9)))  # object 2 (video v2)
FAR = box((slice(10, 12), slice(10, 12)))  # 2x2, more than 1 pixel away from A and B
EMPTY, FULL = box(), np.ones((SIZE, SIZE), dtype=bool)

OBJECTS = {"0": [A, A], "1": [B, None], "2": [C, C]}
# video -> exp_id -> (anno_ids, type_id); v1's foreground: A | B in frame 0 (13 pixels), A in frame 1 (9 pixels)
EXPRESSIONS = {"v1": {"0": (["0"], 0), "1": (["1"], 1), "2": (["0", "1"], 2)}, "v2": {"0": (["2"], 1)}}
PREDICTIONS = {"v1/0": [A, A | FAR], "v1/1": [EMPTY, FULL], "v1/2": [A | B, A]}  # no folder for v2

# per frame (J, F, A, R), by hand
HAND_FRAMES = {
    "v1/0": [
        (1.0, 1.0, 1.0, 1.0),  # exact
        # A plus a far square: J = 9 / 13; precision 12 / 20, recall 1: F = 1.2 / 1.6; 4 wrong pixels; FP 4 of a 9-pixel foreground
        (9 / 13, 0.75, 252 / 256, 1 - 4 / (9 + EPS)),
    ],
    "v1/1": [
        (0.0, 0.0, 252 / 256, 1.0),  # empty: object B (4 pixels) missed, no false positive
        # the whole frame where the target is empty: J = 0; neither mask has a DAVIS boundary (none along the right and
        # bottom border): F = 1; every pixel wrong: A = 0; 256 false positives against 9 foreground pixels: R = max(< 0, 0) = 0
        (0.0, 1.0, 0.0, 0.0),
    ],
    "v1/2": [(1.0, 1.0, 1.0, 1.0)] * 2,  # A | B, then A: exact
    "v2/0": [(0.0, 0.0, 0.0, 0.0)] * 2,  # no prediction folder: 0 in all four, as the official script scores it
}
TYPES = {"v1/0": "referring", "v1/1": "reasoning", "v1/2": "other", "v2/0": "reasoning"}


def hand_scores() -> dict[str, dict[str, float]]:
    """Per expression (frame means), per type, overall (mean of the referring and reasoning rows)."""
    scores = {}
    for key, frames in HAND_FRAMES.items():
        j, f, a, r = (sum(frame[i] for frame in frames) / len(frames) for i in range(4))
        scores[key] = {"J": j, "F": f, "J&F": (j + f) / 2, "A": a, "R": r}
    for kind in ("referring", "reasoning"):
        rows = [scores[k] for k, t in TYPES.items() if t == kind]
        scores[kind] = {n: sum(row[n] for row in rows) / len(rows) for n in ("J", "F", "J&F", "A", "R")}
    scores["overall"] = {n: (scores["referring"][n] + scores["reasoning"][n]) / 2 for n in ("J", "F", "J&F", "A", "R")}
    return scores


def rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as coco_mask

    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode()}


def write_split(root: Path, objects: dict, expressions: dict, frames: list[str] = FRAMES) -> tuple[Path, Path]:
    """ReVOS ``mask_dict.json`` and ``meta_expressions_valid_.json`` (MeViS format with ``type_id``)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "mask_dict.json").write_text(json.dumps({a: [None if m is None else rle(m) for m in ms] for a, ms in objects.items()}))
    meta = {"videos": {video: {"height": SIZE, "width": SIZE, "frames": frames, "expressions": {
        exp_id: {"exp": f"expression {exp_id}", "obj_id": [int(a) for a in annos], "anno_id": [int(a) for a in annos],
                 "type_id": type_id} for exp_id, (annos, type_id) in exps.items()}} for video, exps in expressions.items()}}
    (root / "meta_expressions_valid_.json").write_text(json.dumps(meta))
    return root / "mask_dict.json", root / "meta_expressions_valid_.json"


def write_foreground(path: Path, videos: dict[str, list[np.ndarray]]) -> Path:
    path.write_text(json.dumps({v: {"masks_rle": [rle(m) for m in ms], "foreground_ratio": [float(m.mean()) for m in ms]}
                                for v, ms in videos.items()}))
    return path


def write_predictions(pred: Path, predictions: dict[str, list[np.ndarray]], value: int = 255) -> Path:
    """8-bit grayscale PNGs, 0 and ``value``, in ``<pred>/<video>/<exp_id>/<frame>.png``."""
    for key, masks in predictions.items():
        for name, mask in zip(FRAMES, masks):
            (pred / key).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * value).save(pred / key / f"{name}.png")
    return pred


@pytest.fixture
def revos(tmp_path: Path) -> tuple[Path, Path, Path]:
    mask_dict, meta = write_split(tmp_path / "ReVOS", OBJECTS, EXPRESSIONS)
    return write_predictions(tmp_path / "pred", PREDICTIONS), mask_dict, meta


def check(result, want: dict[str, dict[str, float]]) -> None:
    for key in HAND_FRAMES:
        for name, value in want[key].items():
            assert result.expressions[key][name] == pytest.approx(value, abs=1e-12), (key, name)
    for kind in ("referring", "reasoning"):
        assert result.groups[kind] == pytest.approx(want[kind], abs=1e-12), kind
    assert result.overall == pytest.approx(want["overall"], abs=1e-12)


def test_crafted_case_scores_as_computed_by_hand(revos: tuple[Path, Path, Path]) -> None:
    pred, mask_dict, meta = revos
    want = hand_scores()
    # the hand numbers written out: referring = v1/0, reasoning = mean of v1/1 and v2/0, overall the mean of both rows
    assert want["v1/0"]["J"] == pytest.approx(11 / 13) and want["v1/0"]["A"] == pytest.approx(127 / 128)
    assert want["reasoning"] == pytest.approx({"J": 0, "F": 0.25, "J&F": 0.125, "A": 63 / 256, "R": 0.25})
    assert want["overall"]["J"] == pytest.approx(11 / 26) and want["overall"]["A"] == pytest.approx(317 / 512)
    result = evaluate(pred, mask_dict, meta, progress=False, protocol="revos")
    assert result.protocol == "revos" and list(result.expressions) == list(HAND_FRAMES)  # the metadata's order
    check(result, want)
    assert result.types == TYPES and list(result.groups) == ["referring", "reasoning"]
    # overall is the mean of the two type means, not the mean over expressions (of the two types, or of all four)
    per_expression = np.mean([want[k]["J"] for k in HAND_FRAMES if TYPES[k] != "other"])
    assert abs(result.overall["J"] - per_expression) > 0.1 and abs(result.overall["J"] - np.mean([want[k]["J"] for k in HAND_FRAMES])) > 0.03
    # a video row is the mean over all of its expressions, type other included; v2 has no predictions: 0
    assert result.videos["v1"]["J"] == pytest.approx((11 / 13 + 0 + 1) / 3) and result.videos["v1"]["R"] == pytest.approx(
        (want["v1/0"]["R"] + 0.5 + 1) / 3)
    assert result.videos["v2"] == {"J": 0.0, "F": 0.0, "J&F": 0.0, "A": 0.0, "R": 0.0}
    assert result.absent_videos == ["v2"] and result.absent_expressions == ["v2/0"] and result.missing == {"v2/0": 2}
    # mevis on the same files: the mean over all four expressions, no A and R
    mevis = evaluate(pred, mask_dict, meta, progress=False, protocol="mevis")
    assert set(mevis.overall) == {"J", "F", "J&F"} and mevis.overall["J"] == pytest.approx((11 / 13 + 1) / 4)


def test_foreground_file_gives_the_computed_union_and_is_read(revos: tuple[Path, Path, Path], tmp_path: Path) -> None:
    pred, mask_dict, meta = revos
    computed = evaluate(pred, mask_dict, meta, progress=False, protocol="revos")
    union = write_foreground(tmp_path / "mask_dict_foreground.json", {"v1": [A | B, A], "v2": [C, C]})
    from_file = evaluate(pred, mask_dict, meta, progress=False, protocol="revos", foreground=union)
    assert from_file.expressions == computed.expressions and from_file.overall == computed.overall
    # a larger foreground (an object no expression refers to: 9 more pixels in frame 1) changes R as by hand
    more = write_foreground(tmp_path / "more.json", {"v1": [A | B, A | box((slice(13, 16), slice(13, 16)))], "v2": [C, C]})
    result = evaluate(pred, mask_dict, meta, progress=False, protocol="revos", foreground=more)
    want = hand_scores()
    assert result.expressions["v1/0"]["R"] == pytest.approx((1 + 1 - 4 / (18 + EPS)) / 2, abs=1e-12)
    assert result.expressions["v1/1"]["R"] == want["v1/1"]["R"] == 0.5  # the full frame stays clipped to 0
    assert {k: s["J"] for k, s in result.expressions.items()} == {k: s["J"] for k, s in computed.expressions.items()}


def test_bad_revos_input_names_the_file_and_video(revos: tuple[Path, Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    pred, mask_dict, meta = revos
    videos = json.loads(meta.read_text())
    for bad in (None, 3, "0", True):
        if bad is None:
            del videos["videos"]["v1"]["expressions"]["1"]["type_id"]
        else:
            videos["videos"]["v1"]["expressions"]["1"]["type_id"] = bad
        meta.write_text(json.dumps(videos))
        with pytest.raises(EvaluationError, match=r"meta_expressions_valid_.json: video 'v1' expression 1: protocol revos needs 'type_id'"):
            evaluate(pred, mask_dict, meta, progress=False, protocol="revos")
    evaluate(pred, mask_dict, meta, progress=False, protocol="mevis")  # mevis does not read type_id
    _, meta = write_split(tmp_path / "ReVOS", OBJECTS, EXPRESSIONS)

    def fails(foreground: Path, message: str) -> None:
        with pytest.raises(EvaluationError, match=message):
            evaluate(pred, mask_dict, meta, progress=False, protocol="revos", foreground=foreground)

    small = np.zeros((8, 8), dtype=bool)
    small[1:3, 1:3] = True
    fails(write_foreground(tmp_path / "small.json", {"v1": [small, small], "v2": [C, C]}),
          r"small.json: video 'v1' frame 0: foreground RLE of size \[8, 8\], the video's masks are \[16, 16\]")
    fails(write_foreground(tmp_path / "short.json", {"v1": [A | B], "v2": [C, C]}),
          r"short.json: video 'v1': 'masks_rle' must be a list of 2 RLEs \(one per frame\), got 1 entries")
    fails(write_foreground(tmp_path / "no_v2.json", {"v1": [A | B, A]}), r"no_v2.json: video 'v2': .* got no entry")
    fails(write_foreground(tmp_path / "part.json", {"v1": [A, A], "v2": [C, C]}),
          r"part.json: video 'v1': the foreground leaves out annotated pixels of the video in 1 frame\(s\) \(first: frame 0\)")
    fails(tmp_path / "absent.json", r"--foreground .*absent.json: file not found")
    with pytest.raises(EvaluationError, match="only protocol revos uses a foreground"):
        evaluate(pred, mask_dict, meta, progress=False, foreground=tmp_path / "small.json")
    with pytest.raises(EvaluationError, match="protocol revos needs ReVOS's mask_dict.json"):
        evaluate(pred, tmp_path / "Annotations", meta, progress=False, protocol="revos")
    args = ["evaluate", "--pred", str(pred), "--gt", str(mask_dict), "--meta", str(meta), "--no-progress"]
    assert main([*args, "--protocol", "revos", "--foreground", str(tmp_path / "small.json")]) == 1
    assert "glus evaluate: error: " in capsys.readouterr().err


def test_cli_prints_the_type_table_and_writes_a_and_r_to_the_csv(revos: tuple[Path, Path, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    pred, mask_dict, meta = revos
    out_csv = tmp_path / "revos.csv"
    args = ["evaluate", "--pred", str(pred), "--gt", str(mask_dict), "--meta", str(meta), "--no-progress"]
    assert main([*args, "--protocol", "revos", "--csv", str(out_csv)]) == 0
    lines = capsys.readouterr().out.splitlines()
    want = hand_scores()
    assert lines[0].startswith("protocol: revos (ReVOS")
    assert lines[1].split() == ["video", "J", "F", "J&F", "A", "R"]
    for name in ("referring", "reasoning", "overall"):
        row = next(line for line in lines if line.startswith(name))
        assert row.split() == [name, *(f"{100 * want[name][s]:.2f}" for s in ("J", "F", "J&F", "A", "R"))], row
    overall = next(line for line in lines if line.startswith("overall")).split()
    assert overall[1:] == ["42.31", "56.25", "49.28", "61.91", "51.39"]  # J 11/26, F 9/16, A 317/512, R 37/72
    assert lines[-3] == ("expression types: 1 referring, 2 reasoning, 1 other; overall = mean of the referring and reasoning rows "
                         "(other: in the video rows only)")
    assert lines[-2] == "no predictions for 1 of 2 videos (1 expression), scored J = F = A = R = 0: v2"
    rows = list(csv.DictReader(out_csv.open()))
    assert list(rows[0]) == [*CSV_COLUMNS, "A", "R", "type"]  # the usual columns first
    expressions = {f"{r['video']}/{r['exp_id']}": r for r in rows if r["level"] == "expression"}
    for key, kind in TYPES.items():
        assert expressions[key]["type"] == kind
        for name in ("J", "F", "A", "R"):
            assert float(expressions[key][name]) == pytest.approx(want[key][name], abs=1e-6), (key, name)
    types = {r["type"]: r for r in rows if r["level"] == "type"}
    assert list(types) == ["referring", "reasoning"] and types["reasoning"]["frames"] == "4"
    assert float(types["referring"]["R"]) == pytest.approx(want["referring"]["R"], abs=1e-6)
    last = rows[-1]
    assert last["level"] == "overall" and float(last["J&F"]) == pytest.approx(want["overall"]["J&F"], abs=1e-6)
    assert last["missing_frames"] == "2" and last["type"] == ""
    # other protocols keep their columns exactly
    assert main([*args, "--csv", str(tmp_path / "mevis.csv")]) == 0
    assert next(csv.reader((tmp_path / "mevis.csv").open())) == list(CSV_COLUMNS)
    assert "scored J = F = 0: v2" in capsys.readouterr().out


# ---------------------------------------------------------------- the official script's quirks, and what is done here


def official_a_r(gt_sum: np.ndarray, raw_pred: np.ndarray, foreground: np.ndarray) -> tuple[float, float]:
    """A and R as VISA's tools/metrics.py computes them: uint8 arrays, objects summed, the PNGs' raw gray values."""
    accuracy = [np.mean(g == p) for g, p in zip(gt_sum, raw_pred)]
    robustness = [max(1 - ((1 - g) * p).sum() / (f.sum() + EPS), 0.0) for g, p, f in zip(gt_sum, raw_pred, foreground)]
    return float(np.mean(accuracy)), float(np.mean(robustness))


def raw_values(pred: Path, key: str) -> np.ndarray:
    return np.stack([np.asarray(Image.open(pred / key / f"{name}.png")) for name in FRAMES])


def test_a_and_r_equal_the_official_ones_for_0_1_pngs_and_exceed_them_for_0_255(revos: tuple[Path, Path, Path],
                                                                                 tmp_path: Path) -> None:
    pred255, mask_dict, meta = revos
    pred01 = write_predictions(tmp_path / "pred01", PREDICTIONS, value=1)
    ours255 = evaluate(pred255, mask_dict, meta, progress=False, protocol="revos")
    ours01 = evaluate(pred01, mask_dict, meta, progress=False, protocol="revos")
    assert ours01.expressions == ours255.expressions  # both read as nonzero = object
    foreground = np.stack([A | B, A]).astype(np.uint8)
    for key in PREDICTIONS:
        annos = EXPRESSIONS["v1"][key.split("/")[1]][0]
        gt_sum = sum(np.stack([np.zeros_like(A) if m is None else m for m in OBJECTS[a]]).astype(np.uint8) for a in annos)
        assert official_a_r(gt_sum, raw_values(pred01, key), foreground) == pytest.approx(
            (ours01.expressions[key]["A"], ours01.expressions[key]["R"]), abs=1e-12), key
        a255, r255 = official_a_r(gt_sum, raw_values(pred255, key), foreground)
        # every correctly predicted object pixel counts wrong there (255 != 1); v1/1 has none, its A is 0 in frame 1 anyway
        assert a255 < ours255.expressions[key]["A"] if key != "v1/1" else a255 == ours255.expressions[key]["A"], key
        if key == "v1/0":
            assert r255 == 0.5 < ours255.expressions[key]["R"]  # the far square's 4 false positives count 255 times: R = 0 in frame 1


def test_overlapping_objects_are_one_binary_target(tmp_path: Path) -> None:
    top, bottom = box((slice(2, 6), slice(2, 6))), box((slice(4, 8), slice(4, 8)))  # 16 pixels each, 4 shared
    objects = {"0": [top, top], "1": [bottom, bottom]}
    mask_dict, meta = write_split(tmp_path / "ReVOS", objects, {"o": {"0": (["0", "1"], 0), "1": (["0"], 1)}})
    pred = write_predictions(tmp_path / "pred", {"o/0": [top | bottom] * 2, "o/1": [top] * 2}, value=1)
    result = evaluate(pred, mask_dict, meta, progress=False, protocol="revos")
    assert result.expressions["o/0"] == {"J": 1.0, "F": 1.0, "J&F": 1.0, "A": 1.0, "R": 1.0}
    assert result.overall == {"J": 1.0, "F": 1.0, "J&F": 1.0, "A": 1.0, "R": 1.0}
    # the official script adds the objects up: the 4 shared pixels are 2, never equal to a prediction (A loses 4 / 256),
    # and 1 - 2 wraps to 255 in uint8, so each correctly predicted shared pixel is 255 false positives (R = 0)
    gt_sum = np.stack([top, top]).astype(np.uint8) + np.stack([bottom, bottom]).astype(np.uint8)
    foreground = np.stack([top | bottom] * 2).astype(np.uint8)
    assert official_a_r(gt_sum, raw_values(pred, "o/0"), foreground) == (252 / 256, 0.0)


def test_an_expression_without_a_target_is_scored_against_empty_masks(tmp_path: Path) -> None:
    """ReVOS has expressions that refer to nothing (no anno_id): an empty prediction is right in every frame (J = F = A =
    R = 1), a predicted square is a false positive (J = 0, A and R count its 4 pixels); other protocols refuse them."""
    expressions = {"v1": {"0": (["0"], 0), "1": ([], 1), "2": ([], 1)}}
    mask_dict, meta = write_split(tmp_path / "ReVOS", {"0": [A, A]}, expressions)
    pred = write_predictions(tmp_path / "pred", {"v1/0": [A, A], "v1/1": [EMPTY, EMPTY], "v1/2": [FAR, EMPTY]})
    result = evaluate(pred, mask_dict, meta, progress=False, protocol="revos")
    assert result.expressions["v1/1"] == pytest.approx({"J": 1.0, "F": 1.0, "J&F": 1.0, "A": 1.0, "R": 1.0})
    far = result.expressions["v1/2"]
    assert far["J"] == pytest.approx(0.5) and far["A"] == pytest.approx((252 / 256 + 1) / 2)
    assert far["R"] == pytest.approx((1 - 4 / (9 + EPS) + 1) / 2)  # 4 false positives against A's 9 foreground pixels
    with pytest.raises(Exception, match="anno_id"):
        evaluate(pred, mask_dict, meta, progress=False, protocol="mevis")
