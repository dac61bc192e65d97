"""The synthetic dataset: determinism, expressions that say exactly what the pixels show, speed."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from datamodules.prepare import prepare_official, prepare_synthetic
from datamodules.records import VideoRecord
from datamodules.shards import Manifest
from datamodules.synthetic import (
    COLOURS,
    POSITION_MARGIN,
    VOCABULARY,
    SceneObject,
    SyntheticVideo,
    expression_kind,
    generate_video,
    write_mevis_layout,
)

FRAMES, SIZE = 12, 96  # the demo's sizes


@pytest.fixture(scope="module")
def videos() -> list[SyntheticVideo]:
    """The demo-sized dataset: 200 train + 40 val videos."""
    return [generate_video(0, "train", i, FRAMES, SIZE) for i in range(200)] + [generate_video(0, "val", i, FRAMES, SIZE) for i in range(40)]


# ---------------------------------------------------------------- an independent reading of the expressions

COUNT_PREFIXES = [("all the ", "all"), ("the two ", "two"), ("both ", "both"), ("the ", "one")]
POSITIONS = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom", "in the middle": "middle"}
MOTIONS = {
    **{f"moving {d}": d for d in ("up", "down", "left", "right")},
    **{p: "stops" for p in ("that stops", "that stop")},
    **{p: "still" for p in ("that is still", "that are still")},
}


def parse(text: str) -> dict[str, str | None]:
    """Read an expression with the grammar the module documents; fails on any other word."""
    prefix, count = next((p, c) for p, c in COUNT_PREFIXES if text.startswith(p))
    rest = text[len(prefix) :]
    parsed: dict[str, str | None] = {"count": count, "position": None, "motion": None, "colour": None, "size": None, "shape": None}
    for key, table in (("position", POSITIONS), ("motion", MOTIONS)):
        for phrase, value in table.items():
            if rest.endswith(" " + phrase):
                parsed[key], rest = value, rest[: -len(phrase) - 1]
    *adjectives, noun = rest.split()
    noun = noun[:-1] if count != "one" else noun
    assert noun in ("shape", "circle", "square", "triangle"), text
    parsed["shape"] = None if noun == "shape" else noun
    for word in adjectives:
        key = "colour" if word in COLOURS else "size"
        assert word in (COLOURS if key == "colour" else ("small", "big")) and parsed[key] is None, text
        parsed[key] = word
    return parsed


def satisfies(obj: SceneObject, parsed: dict[str, str | None]) -> bool:
    if any(parsed[k] is not None and parsed[k] != getattr(obj, k) for k in ("colour", "shape", "size")):
        return False
    motion = parsed["motion"]
    return (
        motion is None
        or (motion == "stops" and obj.stops)
        or (motion == "still" and obj.direction is None)
        or (motion == obj.direction)  # one that stops moves in its direction first
    )


def clearly_apart(a: SceneObject, b: SceneObject, axis: int) -> bool:
    """a before b on axis (left of / above), by the margin, in every frame."""
    return all(a.path[t, axis] + POSITION_MARGIN * SIZE <= b.path[t, axis] for t in range(len(a.path)))


def located(obj: SceneObject, position: str, group: list[SceneObject]) -> bool:
    others = [o for o in group if o is not obj]
    if position == "left":
        return all(clearly_apart(obj, o, 0) for o in others)
    if position == "right":
        return all(clearly_apart(o, obj, 0) for o in others)
    if position == "top":
        return all(clearly_apart(obj, o, 1) for o in others)
    if position == "bottom":
        return all(clearly_apart(o, obj, 1) for o in others)
    left = [o for o in others if clearly_apart(o, obj, 0)]
    right = [o for o in others if clearly_apart(obj, o, 0)]
    return bool(left) and bool(right) and len(left) + len(right) == len(others)


def refers_to(text: str, objects: list[SceneObject]) -> set[int] | None:
    parsed = parse(text)
    group = [o for o in objects if satisfies(o, parsed)]
    if parsed["position"]:
        group = [o for o in group if located(o, parsed["position"], group)]
    size_ok = {"one": len(group) == 1, "two": len(group) == 2, "both": len(group) == 2, "all": len(group) >= 3}
    return {o.obj_id for o in group} if size_ok[parsed["count"]] else None


def twins(obj: SceneObject, objects: list[SceneObject]) -> list[SceneObject]:
    return [o for o in objects if o is not obj and (o.colour, o.shape, o.size) == (obj.colour, obj.shape, obj.size)]


def test_every_expression_refers_to_exactly_its_objects(videos: list[SyntheticVideo]) -> None:
    total = 0
    for video in videos:
        texts = [e.text for e in video.record.expressions]
        assert len(texts) == len(set(texts)) >= 2
        for exp in video.record.expressions:
            assert set(exp.text.split()) <= VOCABULARY, exp.text
            assert refers_to(exp.text, video.objects) == set(exp.obj_ids), (video.record.video, exp.text)
            total += 1
    assert total > 900


def test_all_kinds_of_expression_are_present(videos: list[SyntheticVideo]) -> None:
    kinds = {"appearance": 0, "position": 0, "motion": 0, "multi": 0, "motion only": 0}
    for video in videos:
        for exp in video.record.expressions:
            parsed = parse(exp.text)
            if len(exp.obj_ids) > 1:
                kinds["multi"] += 1
            elif parsed["position"]:
                kinds["position"] += 1
            elif parsed["motion"]:
                kinds["motion"] += 1
                target = next(o for o in video.objects if o.obj_id == exp.obj_ids[0])
                for twin in twins(target, video.objects):  # looks the same: only motion tells them apart
                    assert not any(clearly_apart(a, b, axis) for a, b in ((target, twin), (twin, target)) for axis in (0, 1))
                    kinds["motion only"] += 1
            else:
                kinds["appearance"] += 1
    assert min(kinds.values()) >= 30, kinds
    assert kinds["motion only"] >= 60, kinds  # twins in about half of the videos


def test_crowded_lookalike_scenes_stay_unambiguous_and_kinds_read_as_the_grammar_says() -> None:
    """data.synthetic.objects / lookalike: more objects, most looking like another but for one attribute; every
    expression still refers to exactly its objects, and ``expression_kind`` agrees with the independent parse."""
    crowded = [generate_video(0, "train", i, FRAMES, SIZE, objects=(4, 5), lookalike=0.8) for i in range(60)]
    assert all(4 <= len(v.objects) <= 5 for v in crowded)
    sharing = 0  # objects that share all but one attribute with another (not twins)
    for video in crowded:
        for exp in video.record.expressions:
            assert refers_to(exp.text, video.objects) == set(exp.obj_ids), (video.record.video, exp.text)
            parsed = parse(exp.text)
            expected = ("multi-object" if parsed["count"] != "one" else "motion" if parsed["motion"]
                        else "position" if parsed["position"] else "appearance")
            assert expression_kind(exp.text) == expected, exp.text
        looks = [(o.colour, o.shape, o.size) for o in video.objects]
        sharing += sum(any(sum(x != y for x, y in zip(a, b)) == 1 for b in looks) for a in looks)
    objects = sum(len(v.objects) for v in crowded)
    assert sharing >= 0.6 * objects, (sharing, objects)
    plain = [generate_video(0, "train", i, FRAMES, SIZE) for i in range(60)]
    plain_sharing = sum(
        any(sum(x != y for x, y in zip((a.colour, a.shape, a.size), (b.colour, b.shape, b.size))) == 1 for b in v.objects)
        for v in plain for a in v.objects
    )
    assert plain_sharing < sharing / 2
    with pytest.raises(ValueError, match="lookalike=1.5"):
        generate_video(0, "train", 0, FRAMES, SIZE, lookalike=1.5)


def _has_twins(video: SyntheticVideo) -> bool:
    looks = [(o.colour, o.shape, o.size) for o in video.objects]
    return len(set(looks)) < len(looks)


def test_colour_naming_and_twin_rate_change_only_what_they_say() -> None:
    """data.synthetic.naming=colour names the colour wherever a singular description with it picks the object (checked
    by the independent parse), expressions stay unambiguous; data.synthetic.twins sets how many videos hold twins."""
    shortest = [generate_video(0, "train", i, FRAMES, SIZE, naming="shortest", twins=0.5) for i in range(60)]
    coloured = [generate_video(0, "train", i, FRAMES, SIZE, naming="colour", twins=0.5) for i in range(60)]
    named = {"shortest": 0, "colour": 0}
    for key, videos in (("shortest", shortest), ("colour", coloured)):
        for video in videos:
            for exp in video.record.expressions:
                assert refers_to(exp.text, video.objects) == set(exp.obj_ids), (video.record.video, exp.text)
                named[key] += parse(exp.text)["colour"] is not None
    expressions = sum(len(v.record.expressions) for v in coloured)
    assert named["colour"] >= 0.7 * expressions and named["shortest"] <= 0.5 * expressions, (named, expressions)
    # every object but a twin has a unique look, so its colour + shape + size picks it: a coloured appearance exists
    appearance = [e.text for v in coloured for e in v.record.expressions if expression_kind(e.text) == "appearance"]
    assert appearance and all(parse(text)["colour"] for text in appearance), appearance
    rare = [generate_video(0, "train", i, FRAMES, SIZE, twins=0.0) for i in range(40)]
    every = [generate_video(0, "train", i, FRAMES, SIZE, twins=1.0) for i in range(40)]
    assert not any(_has_twins(v) for v in rare) and all(_has_twins(v) for v in every)
    assert 0.3 < np.mean([_has_twins(v) for v in shortest]) < 0.7
    assert 0.1 < np.mean([_has_twins(generate_video(0, "train", i, FRAMES, SIZE)) for i in range(60)]) < 0.4  # 0.25
    with pytest.raises(ValueError, match="naming='loud'"):
        generate_video(0, "train", 0, FRAMES, SIZE, naming="loud")


def test_settled_twins_differ_only_in_the_first_half() -> None:
    """data.synthetic.twin_motion=settled: the twins' masks stop changing at mid-video (a late window shows two still,
    identical shapes), at least one of them moved before, and each twin is still named unambiguously by its motion."""
    settled = [generate_video(0, "train", i, FRAMES, SIZE, twins=1.0, twin_motion="settled") for i in range(30)]
    mid = FRAMES // 2
    for video in settled:
        record = video.record
        pair = [o for o in video.objects if twins(o, video.objects)]
        assert len(pair) == 2, record.video
        masks = {o.obj_id: np.stack([record.object_mask(o.obj_id, t) > 0 for t in range(FRAMES)]) for o in pair}
        others = np.zeros((FRAMES, SIZE, SIZE), dtype=bool)
        for t in range(FRAMES):
            for o in (o for o in video.objects if o not in pair):
                others[t] |= record.object_mask(o.obj_id, t) > 0
        for m in masks.values():  # still from mid-video on: a pixel changes only where a third object passes
            changed = m[mid:] ^ m[mid]
            assert not (changed & ~(others[mid:] | others[mid])).any(), record.video
        assert any((m[:mid] != m[mid]).any() for m in masks.values()), record.video  # one of them moved before
        singles = [e for e in record.expressions if len(e.obj_ids) == 1 and e.obj_ids[0] in masks]
        assert singles, record.video
        for exp in singles:
            assert refers_to(exp.text, video.objects) == set(exp.obj_ids) and parse(exp.text)["motion"], exp.text
    with pytest.raises(ValueError, match="twin_motion='late'"):
        generate_video(0, "train", 0, FRAMES, SIZE, twin_motion="late")


# ---------------------------------------------------------------- the scene is what the pixels show


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation by ``steps`` pixels (4-neighbourhood); erosion is ``~_grow(~mask)``."""
    for _ in range(steps):
        padded = np.pad(mask, 1)
        mask = padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return mask


def _shape_from_pixels(mask: np.ndarray) -> str:
    rows, cols = np.nonzero(mask)
    fill = mask.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1))
    return "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"


def test_masks_are_the_visible_pixels_of_each_object(videos: list[SyntheticVideo]) -> None:
    unoccluded = 0
    for video in videos[:40]:
        record, objects = video.record, video.objects
        assert record.object_ids == sorted(o.obj_id for o in objects)
        for t in range(record.num_frames):
            pixels = record.decode_frame(t).astype(np.int16)
            masks = {o.obj_id: record.object_mask(o.obj_id, t).astype(bool) for o in objects}
            assert sum(m.astype(int) for m in masks.values()).max() <= 1  # visible pixels never overlap
            background = ~_grow(np.any(list(masks.values()), axis=0), 2)
            assert np.abs(pixels[background] - video.background).mean() < 8
            for obj in objects:
                inner = ~_grow(~masks[obj.obj_id], 2)
                if inner.any():
                    assert np.abs(pixels[inner] - COLOURS[obj.colour]).mean() < 12, (record.video, obj.obj_id, t)
                near = _grow(masks[obj.obj_id], 2)
                if masks[obj.obj_id].any() and not any((near & masks[o.obj_id]).any() for o in objects if o is not obj):
                    unoccluded += 1
                    ys, xs = np.nonzero(masks[obj.obj_id])
                    assert abs(xs.mean() - obj.path[t, 0]) < 0.6 and abs(ys.mean() - obj.path[t, 1]) < 0.6
                    assert _shape_from_pixels(masks[obj.obj_id]) == obj.shape
                    assert (masks[obj.obj_id].sum() / SIZE**2 > 0.02) == (obj.size == "big")
    assert unoccluded > 500


def test_paths_follow_the_motion_words(videos: list[SyntheticVideo]) -> None:
    axes = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}
    for video in videos:
        for obj in video.objects:
            steps = np.diff(obj.path, axis=0)
            moving = steps if not obj.stops else steps[: (FRAMES - 1) // 2]
            if obj.direction is None:
                assert not steps.any()
                continue
            axis, sign = axes[obj.direction]
            assert (np.sign(moving[:, axis]) == sign).all() and not moving[:, 1 - axis].any()
            assert abs(obj.path[-1, axis] - obj.path[0, axis]) > 0.25 * SIZE
            if obj.stops:
                assert not steps[FRAMES // 2 :].any()  # still for the second half


# ---------------------------------------------------------------- determinism and shards


def _members(directory: Path) -> list[tuple[str, bytes]]:
    """Every shard member's name and bytes."""
    members = []
    for shard in Manifest.load(directory).shards:
        with tarfile.open(directory / shard) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    return members


def test_same_seed_gives_identical_shards_and_another_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        manifests = prepare_synthetic(tmp_path / name, seed=seed, num_train=8, num_val=3, frames=6, size=48)
        assert manifests["train"].videos == 8 and manifests["val"].videos == 3
        assert len(manifests["train"].shards) == 8 and manifests["train"].expressions >= 16
    for split in ("train", "val"):
        a, b, c = (_members(tmp_path / name / split) for name in "abc")
        assert a == b
        assert [n for n, _ in a] == [n for n, _ in c] and a != c
        assert Manifest.load(tmp_path / "a" / split) == Manifest.load(tmp_path / "b" / split)
        for shard in Manifest.load(tmp_path / "a" / split).shards:  # whole tar files, headers included
            assert (tmp_path / "a" / split / shard).read_bytes() == (tmp_path / "b" / split / shard).read_bytes()
    train_frames = {data for n, data in _members(tmp_path / "a" / "train") if n.endswith(".jpg")}
    val_frames = {data for n, data in _members(tmp_path / "a" / "val") if n.endswith(".jpg")}
    assert not train_frames & val_frames  # disjoint streams


def test_mevis_layout_round_trip_gives_back_the_generated_records(tmp_path: Path) -> None:
    originals = [generate_video(1, "val", i, 6, 48).record for i in range(4)]
    write_mevis_layout(originals, tmp_path / "mevis", "valid_u")
    manifest = prepare_official("mevis", tmp_path / "mevis", "valid_u", tmp_path / "out", videos_per_shard=3, skip_bad=False, min_frames=6)
    urls = [str(tmp_path / "out" / "valid_u" / s) for s in manifest.shards]
    converted = [VideoRecord.from_sample(s) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    assert len(converted) == 4
    for original, record in zip(originals, converted):
        assert (record.video, record.frame_names, record.frames) == (original.video, original.frame_names, original.frames)
        assert record.expressions == original.expressions
        referred = {o for e in original.expressions for o in e.obj_ids}
        assert record.masks == {o: original.masks[o] for o in referred}


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="split 'test'"):
        generate_video(0, "test", 0, FRAMES, SIZE)
    with pytest.raises(ValueError, match="frames=2"):
        generate_video(0, "train", 0, 2, SIZE)
