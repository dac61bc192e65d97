"""The built-in default dataset: generated videos of moving coloured shapes with referring expressions.

Why it exists: a real referring-video task small enough to train on a CPU, that still asks for what
GLUS is built for. Each video shows 2-4 shapes (colour, shape, size) that move up/down/left/right,
stay still, or stop half-way. Expressions are of four kinds: appearance ("the red circle"), position
("the square on the left"), motion ("the triangle moving up", "the shape that stops") and
multi-object ("the two red shapes", "both circles", "all the squares"). Some videos (half by default,
``twins``) hold a pair of identical twins whose paths cross, so that only their motion tells them apart ("the red
circle moving up"): no single frame and no position does, which makes whole-video reasoning matter. With
``twin_motion="settled"`` the twins differ only before the middle frame (one stops after crossing the other, which is
still or stops too): a window in the second half cannot tell them apart, only the frames before it can (GLUS's context
frames, or SAM2's memory of the earlier windows).

Meaning of the words, as ``referents`` checks them against the generated scene:

- colour, shape ("shape" = any), size: equal attributes.
- "moving <dir>": the object moves in that direction (also one that stops later); "that stops":
  moves during the first half, then stays; "that is still": never moves.
- "on the left" (right, at the top, at the bottom): among the objects matching the rest of the
  description, the one that is left of every other by at least ``POSITION_MARGIN`` of the frame in
  *every* frame; "in the middle": every other one is clearly left or right of it, at least one
  on each side, in every frame.
- "the" + singular: exactly one object; "the two" / "both": exactly two; "all the": three or more.

An object is named by the fewest words that pick it, or (``naming="colour"``) by the fewest among those that
name its colour, when any does.

Every expression is kept only if ``referents`` gives exactly its objects (unambiguous by
construction and by check). Masks are the visible pixels after drawing in z-order, so they are
exact. Everything derives from ``numpy.random.default_rng((seed, split, index))``: the same seed
gives byte-identical videos, train and val come from disjoint streams, and each video can be made
on its own.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.records import Expression, VideoRecord, encode_rle

DATASET = "synthetic"
GENERATOR_VERSION = 1  # recorded in the manifest; bump when the same seed and sizes give different videos
SPLIT_STREAMS = {"train": 0, "val": 1}  # disjoint random streams per split

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 90, 240), "yellow": (240, 220, 40), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle")
RADII = {"small": 0.07, "big": 0.12}  # fraction of the frame size
DIRECTIONS = {"up": (0.0, -1.0), "down": (0.0, 1.0), "left": (-1.0, 0.0), "right": (1.0, 0.0)}
TRAVEL = (0.3, 0.45)  # distance moved, fraction of the frame size
POSITION_MARGIN = 0.1  # fraction of the frame size that makes "on the left" clear
TWINS = 0.25  # chance that a video holds a pair of twins (data.synthetic.twins)
TWIN_MOTIONS = ("crossing", "settled")  # data.synthetic.twin_motion: twins moving apart throughout, or only before mid-video
TWIN_MOTION = "crossing"
NAMING = "colour"  # which valid description names an object (data.synthetic.naming, NAMINGS)
NAMINGS = ("shortest", "colour")
OBJECTS = (2, 4)  # objects per video, inclusive (data.synthetic.objects)
LOOKALIKE = 0.0  # chance that a further object copies an earlier one's looks but for one attribute (data.synthetic.lookalike)
# what a manifest or config written before these options existed was made with (2026-12-04: twins 0.5 and the
# shortest naming were the only behaviour until then)
BEFORE_OPTIONS = {"objects": [2, 4], "lookalike": 0.0, "twins": 0.5, "naming": "shortest", "twin_motion": "crossing"}
EXTENT = 1.2  # half-extent of any shape in radii (the triangle's circumradius), keeps shapes inside the frame
MIN_VISIBLE = 0.3  # an object must show this fraction of its area ...
MIN_VISIBLE_FRAMES = 0.75  # ... in at least this fraction of frames
JPEG_QUALITY = 95
NOISE = 4  # background and objects get uniform pixel noise in [-NOISE, NOISE]

POSITION_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom", "middle": "in the middle"}
MOTION_WORDS = {  # (singular, plural)
    **{d: (f"moving {d}", f"moving {d}") for d in DIRECTIONS},
    "stops": ("that stops", "that stop"),
    "still": ("that is still", "that are still"),
}
COUNT_WORDS = {"one": "the", "two": "the two", "both": "both", "all": "all the"}
VOCABULARY = frozenset(
    " ".join(
        [*COLOURS, *SHAPES, *RADII, "shape", *(w + "s" for w in (*SHAPES, "shape"))]
        + [p for pair in MOTION_WORDS.values() for p in pair]
        + list(POSITION_WORDS.values())
        + list(COUNT_WORDS.values())
    ).split()
)

APPEARANCE = ("colour", "shape", "size")
KINDS = ("appearance", "position", "motion", "multi-object")


def expression_kind(text: str) -> str:
    """Which of ``KINDS`` an expression of this generator is: what it needs besides the looks of one frame."""
    if not text.startswith("the ") or text.startswith("the two "):
        return "multi-object"
    if any(text.endswith(" " + phrase) for pair in MOTION_WORDS.values() for phrase in pair):
        return "motion"
    if any(text.endswith(" " + phrase) for phrase in POSITION_WORDS.values()):
        return "position"
    return "appearance"


@dataclass(frozen=True, eq=False)
class SceneObject:
    """One generated object: its attributes and its centre ``(x, y)`` in every frame."""

    obj_id: int
    colour: str
    shape: str
    size: str
    direction: str | None  # None: still
    stops: bool
    radius: float
    path: np.ndarray  # float [T, 2]

    @property
    def motion(self) -> str:
        """The motion word that describes it best: "stops", "still" or its direction."""
        return "stops" if self.stops else (self.direction or "still")


@dataclass(frozen=True)
class Description:
    """What an expression says; ``text`` renders it, ``referents`` evaluates it on a scene."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    motion: str | None = None  # a direction, "stops" or "still"
    position: str | None = None  # left, right, top, bottom, middle
    count: str = "one"  # one, two, both, all

    @property
    def text(self) -> str:
        plural = self.count != "one"
        words = [COUNT_WORDS[self.count], self.size, self.colour, (self.shape or "shape") + ("s" if plural else "")]
        if self.motion:
            words.append(MOTION_WORDS[self.motion][plural])
        if self.position:
            words.append(POSITION_WORDS[self.position])
        return " ".join(w for w in words if w)


@dataclass
class SyntheticVideo:
    """A generated video: the stored record and the scene it was drawn from (the ground truth)."""

    record: VideoRecord
    objects: list[SceneObject]
    background: tuple[int, int, int]


def _matches(desc: Description, obj: SceneObject) -> bool:
    if any(getattr(desc, a) not in (None, getattr(obj, a)) for a in APPEARANCE):
        return False
    if desc.motion is None:
        return True
    if desc.motion == "stops":
        return obj.stops
    if desc.motion == "still":
        return obj.direction is None
    return obj.direction == desc.motion


def _clearly_before(a: SceneObject, b: SceneObject, axis: int, margin: float) -> bool:
    """``a`` is left of (axis 0) or above (axis 1) ``b`` by ``margin`` in every frame."""
    return bool(np.all(a.path[:, axis] + margin <= b.path[:, axis]))


def _at_position(obj: SceneObject, position: str, group: Sequence[SceneObject], margin: float) -> bool:
    others = [o for o in group if o is not obj]
    if position == "middle":
        left = [o for o in others if _clearly_before(o, obj, 0, margin)]
        right = [o for o in others if _clearly_before(obj, o, 0, margin)]
        return bool(left) and bool(right) and len(left) + len(right) == len(others)
    axis = 0 if position in ("left", "right") else 1
    first = position in ("left", "top")
    return all(_clearly_before(obj, o, axis, margin) if first else _clearly_before(o, obj, axis, margin) for o in others)


def referents(desc: Description, objects: Sequence[SceneObject], size: int) -> frozenset[int] | None:
    """The ids of the objects ``desc`` refers to in this scene, or None if it picks no definite set."""
    group = [o for o in objects if _matches(desc, o)]
    if desc.position:
        group = [o for o in group if _at_position(o, desc.position, group, POSITION_MARGIN * size)]
    n = len(group)
    wanted = {"one": n == 1, "two": n == 2, "both": n == 2, "all": n >= 3}[desc.count]
    return frozenset(o.obj_id for o in group) if wanted else None


# ---------------------------------------------------------------- scene


def _progress(direction: str | None, stops: bool, frames: int) -> np.ndarray:
    """Fraction of the travel done at each frame."""
    t = np.arange(frames, dtype=np.float64)
    if direction is None:
        return np.zeros(frames)
    return np.clip(t / ((frames - 1) / 2), 0, 1) if stops else t / (frames - 1)


def _make_object(
    rng: np.random.Generator, looks: tuple[str, str, str], direction: str | None, stops: bool, frames: int, size: int
) -> SceneObject:
    """An object on a random path that keeps it inside the frame; its id is set once the scene is ordered."""
    colour, shape, size_word = looks
    radius = RADII[size_word] * size
    step = np.array(DIRECTIONS[direction]) * rng.uniform(*TRAVEL) * size if direction else np.zeros(2)
    lo = EXTENT * radius - np.minimum(step, 0)
    hi = size - 1 - EXTENT * radius - np.maximum(step, 0)
    start = rng.uniform(lo, hi)
    path = start + _progress(direction, stops, frames)[:, None] * step
    return SceneObject(0, colour, shape, size_word, direction, stops, radius, path)


def _random_looks(rng: np.random.Generator) -> tuple[str, str, str]:
    return (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), str(rng.choice(list(RADII))))


def _lookalike_looks(rng: np.random.Generator, objects: Sequence[SceneObject]) -> tuple[str, str, str]:
    """The looks of a random earlier object with one attribute (colour, shape or size) changed."""
    model = objects[int(rng.integers(len(objects)))]
    looks = [model.colour, model.shape, model.size]
    k = int(rng.integers(3))
    choices = [list(COLOURS), list(SHAPES), list(RADII)][k]
    looks[k] = str(rng.choice([c for c in choices if c != looks[k]]))
    return looks[0], looks[1], looks[2]


def _random_motion(rng: np.random.Generator) -> tuple[str | None, bool]:
    kind = str(rng.choice([*DIRECTIONS, "still", "stops"]))
    if kind == "still":
        return None, False
    if kind == "stops":
        return str(rng.choice(list(DIRECTIONS))), True
    return kind, False


def _twins(rng: np.random.Generator, frames: int, size: int, motion: str = TWIN_MOTION, tries: int = 100) -> list[SceneObject]:
    """Two identical-looking objects whose paths cross on one axis and stay level on the other; ``motion="settled"``:
    both are still from the middle frame on (stoppers or a stopper and a still one)."""
    looks = _random_looks(rng)
    axis = int(rng.integers(2))
    along = ("right", "left") if axis == 0 else ("down", "up")
    if motion == "settled":
        motions = [(along[0], True), (along[1], True), (None, False)]
    else:
        motions = [(along[0], False), (along[1], False), (along[0], True), (along[1], True), (None, False)]
    margin = POSITION_MARGIN * size
    for _ in range(tries):
        i, j = rng.choice(len(motions), size=2, replace=False)
        (da, sa), (db, sb) = motions[i], motions[j]
        if da == db:
            continue
        a = _make_object(rng, looks, da, sa, frames, size)
        b = _make_object(rng, looks, db, sb, frames, size)
        offset = rng.uniform(0.2, 0.7) * margin * rng.choice([-1, 1])
        b.path[:, 1 - axis] = np.clip(a.path[:, 1 - axis] + offset, EXTENT * a.radius, size - 1 - EXTENT * a.radius)
        diff = a.path[:, axis] - b.path[:, axis]
        if diff[0] * diff[-1] < 0 and min(abs(diff[0]), abs(diff[-1])) >= margin / 2:
            return [a, b]
    raise RuntimeError(f"could not place {motion} twins in {tries} tries (frames={frames}, size={size})")


def _shape_mask(obj: SceneObject, t: int, size: int) -> tuple[slice, slice, np.ndarray]:
    """Pixels covered by ``obj`` in frame ``t``: the bounding-box slices and the boolean mask inside it."""
    cx, cy = obj.path[t]
    r = obj.radius
    reach = EXTENT * r
    y0, y1 = max(int(np.floor(cy - reach)), 0), min(int(np.ceil(cy + reach)) + 1, size)
    x0, x1 = max(int(np.floor(cx - reach)), 0), min(int(np.ceil(cx + reach)) + 1, size)
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    if obj.shape == "circle":
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    elif obj.shape == "square":
        half = 0.886 * r  # same area as the circle
        inside = (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    else:  # upward triangle with circumradius EXTENT * r
        corners = [(cx, cy - reach), (cx - reach * 0.866, cy + reach / 2), (cx + reach * 0.866, cy + reach / 2)]
        sides = [(qx - px) * (ys - py) - (qy - py) * (xs - px) for (px, py), (qx, qy) in zip(corners, corners[1:] + corners[:1])]
        inside = np.all([s <= 0 for s in sides], axis=0) | np.all([s >= 0 for s in sides], axis=0)
    return slice(y0, y1), slice(x0, x1), inside


def _rasterise(objects: Sequence[SceneObject], frames: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Label maps ``[T, S, S]`` (object id of the top-most object, 0 = background) and full areas ``[N, T]``."""
    labels = np.zeros((frames, size, size), dtype=np.uint8)
    areas = np.zeros((len(objects), frames), dtype=np.int64)
    for t in range(frames):
        for k, obj in enumerate(objects):  # list order is z-order: later objects cover earlier ones
            rows, cols, inside = _shape_mask(obj, t, size)
            labels[t, rows, cols][inside] = obj.obj_id
            areas[k, t] = inside.sum()
    return labels, areas


def _visible_enough(objects: Sequence[SceneObject], labels: np.ndarray, areas: np.ndarray) -> bool:
    for k, obj in enumerate(objects):
        visible = (labels == obj.obj_id).sum(axis=(1, 2))
        if np.mean(visible >= MIN_VISIBLE * np.maximum(areas[k], 1)) < MIN_VISIBLE_FRAMES:
            return False
    return True


# ---------------------------------------------------------------- expressions


def _describe_as(obj: SceneObject, attributes: Iterable[str], **extra: str) -> Description:
    return Description(**{a: getattr(obj, a) for a in attributes}, **extra)


def _motion_words(obj: SceneObject) -> list[str]:
    """Motion words true of ``obj``: one that stops also moves in its direction first."""
    return [obj.motion, obj.direction] if obj.stops else [obj.motion]  # type: ignore[list-item]


def _subsets(names: Sequence[str]) -> list[tuple[str, ...]]:
    return [c for n in range(len(names) + 1) for c in itertools.combinations(names, n)]


def _named(rng: np.random.Generator, candidates: list[Description], naming: str) -> Description:
    """A random one among the candidates that use the fewest words; with ``naming="colour"``, among those that name
    the object's colour when any does ("the red circle" over "the circle": most referring sentences name the colour)."""
    if naming == "colour":
        candidates = [c for c in candidates if c.colour] or candidates
    lengths = [len(c.text.split()) for c in candidates]
    best = [c for c, n in zip(candidates, lengths) if n == min(lengths)]
    return best[int(rng.integers(len(best)))]


def _singular_options(obj: SceneObject, objects: Sequence[SceneObject], size: int) -> dict[str, list[Description]]:
    """Valid singular descriptions of ``obj`` by kind; a twin is named by its full look plus its motion."""
    target = frozenset([obj.obj_id])

    def valid(desc: Description) -> bool:
        return referents(desc, objects, size) == target

    def crowded(attributes: tuple[str, ...]) -> bool:  # the attributes alone match several objects
        return sum(_matches(_describe_as(obj, attributes), o) for o in objects) >= 2

    twin = any(o is not obj and all(getattr(o, a) == getattr(obj, a) for a in APPEARANCE) for o in objects)
    if twin:
        full = [d for a in (("colour", "shape"), APPEARANCE) for m in _motion_words(obj) if valid(d := _describe_as(obj, a, motion=m))]
        if full:
            return {"motion": full[:1]}
    return {
        "appearance": [d for a in _subsets(APPEARANCE)[1:] if valid(d := _describe_as(obj, a))],
        "motion": [d for a in _subsets(APPEARANCE) for m in _motion_words(obj) if valid(d := _describe_as(obj, a, motion=m))],
        "position": [
            d for a in _subsets(APPEARANCE) if crowded(a) for p in POSITION_WORDS if valid(d := _describe_as(obj, a, position=p))
        ],
    }


def _multi_options(objects: Sequence[SceneObject], size: int) -> dict[frozenset[int], list[Description]]:
    """Valid multi-object descriptions ("the two ...", "both ...", "all the ...") by the group they refer to."""
    groups: dict[frozenset[int], list[Description]] = {}
    for obj in objects:
        for attributes in _subsets((*APPEARANCE, "motion")):
            for count in ("two", "both", "all"):
                desc = _describe_as(obj, attributes, count=count)
                group = referents(desc, objects, size)
                if group is not None and desc not in groups.get(group, []):
                    groups.setdefault(group, []).append(desc)
    return groups


def _expressions(
    rng: np.random.Generator, objects: Sequence[SceneObject], size: int, naming: str
) -> list[tuple[Description, frozenset[int]]]:
    """One singular expression per object that has one (kind drawn at random), one multi-object, one positional."""
    chosen: list[tuple[Description, frozenset[int]]] = []
    positional: list[tuple[Description, frozenset[int]]] = []
    for obj in objects:
        options = _singular_options(obj, objects, size)
        available = [kind for kind, found in options.items() if found]
        if not available:
            continue
        kind = available[int(rng.integers(len(available)))]
        chosen.append((_named(rng, options[kind], naming), frozenset([obj.obj_id])))
        if kind != "position" and options.get("position"):
            positional.append((_named(rng, options["position"], naming), frozenset([obj.obj_id])))
    groups = _multi_options(objects, size)
    if groups:
        partial = [g for g in groups if len(g) < len(objects)] or list(groups)
        group = partial[int(rng.integers(len(partial)))]
        chosen.append((_named(rng, groups[group], naming), group))
    if positional:
        chosen.append(positional[int(rng.integers(len(positional)))])
    unique: dict[str, tuple[Description, frozenset[int]]] = {}
    for desc, target in chosen:
        if referents(desc, objects, size) != target:
            raise RuntimeError(f"generated an ambiguous expression {desc.text!r}")  # a bug here, never bad luck
        unique.setdefault(desc.text, (desc, target))
    return list(unique.values())


# ---------------------------------------------------------------- videos


def _scene(
    rng: np.random.Generator, frames: int, size: int, objects_range: tuple[int, int], lookalike: float, twins: float,
    naming: str, twin_motion: str = TWIN_MOTION, tries: int = 200,
) -> tuple[list[SceneObject], np.ndarray, list[tuple[Description, frozenset[int]]]]:
    """Objects, their label maps and expressions of a scene that shows every object and says at least two things."""
    for _ in range(tries):
        count = int(rng.integers(objects_range[0], objects_range[1] + 1))
        objects = _twins(rng, frames, size, twin_motion) if rng.random() < twins else []
        while len(objects) < count:  # identical looks only for twins, so any two lookalikes differ only in motion
            copied = lookalike > 0 and objects and rng.random() < lookalike  # no draw at 0: the same videos as before
            looks = _lookalike_looks(rng, objects) if copied else _random_looks(rng)
            if all(looks != (o.colour, o.shape, o.size) for o in objects):
                objects.append(_make_object(rng, looks, *_random_motion(rng), frames, size))
        objects = [replace(objects[k], obj_id=i + 1) for i, k in enumerate(rng.permutation(len(objects)))]  # ids follow z-order
        labels, areas = _rasterise(objects, frames, size)
        if not _visible_enough(objects, labels, areas):
            continue
        expressions = _expressions(rng, objects, size, naming)
        if len(expressions) >= 2:
            return objects, labels, expressions
    raise RuntimeError(f"no acceptable scene in {tries} tries (frames={frames}, size={size})")


def generate_video(seed: int, split: str, index: int, frames: int, size: int, objects: tuple[int, int] = OBJECTS,
                   lookalike: float = LOOKALIKE, twins: float = TWINS, naming: str = NAMING,
                   twin_motion: str = TWIN_MOTION) -> SyntheticVideo:
    """Video ``index`` of ``split`` ("train" or "val"), fully determined by the arguments; ``objects`` (min, max) per
    video, ``lookalike``: the chance that each object after the first copies an earlier one's looks but one attribute,
    ``twins``: the chance of a pair of twins, ``naming``: which valid description names an object (``NAMINGS``),
    ``twin_motion``: how the twins move (``TWIN_MOTIONS``, module doc)."""
    if split not in SPLIT_STREAMS:
        raise ValueError(f"split {split!r} is not a synthetic split; valid: {', '.join(SPLIT_STREAMS)}")
    if frames < 4:
        raise ValueError(f"frames={frames}: synthetic videos need at least 4 frames to show motion")
    if size < 32:
        raise ValueError(f"size={size}: synthetic frames need at least 32 pixels")
    if not 1 <= objects[0] <= objects[1] or not 0 <= lookalike <= 1:
        raise ValueError(f"objects={tuple(objects)} must be (min, max) with 1 <= min <= max, lookalike={lookalike} in [0, 1]")
    if not 0 <= twins <= 1 or naming not in NAMINGS:
        raise ValueError(f"twins={twins} must be in [0, 1] and naming={naming!r} one of {', '.join(NAMINGS)}")
    if twin_motion not in TWIN_MOTIONS:
        raise ValueError(f"twin_motion={twin_motion!r} must be one of {', '.join(TWIN_MOTIONS)}")
    rng = np.random.default_rng((seed, SPLIT_STREAMS[split], index))
    scene, labels, expressions = _scene(rng, frames, size, (int(objects[0]), int(objects[1])), lookalike, twins, naming,
                                        twin_motion)
    red, green, blue = (int(c) for c in rng.integers(20, 80, size=3))
    background = (red, green, blue)
    palette = np.array([background] + [COLOURS[o.colour] for o in scene], dtype=np.int16)
    jpegs = []
    for t in range(frames):
        pixels = palette[labels[t]] + rng.integers(-NOISE, NOISE + 1, size=(size, size, 3), dtype=np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=JPEG_QUALITY)
        jpegs.append(buffer.getvalue())
    record = VideoRecord(
        dataset=DATASET,
        video=f"{split}_{index:05d}",
        frame_names=[f"{t:05d}" for t in range(frames)],
        height=size,
        width=size,
        expressions=[Expression(str(i), d.text, tuple(sorted(ids))) for i, (d, ids) in enumerate(expressions)],
        frames=jpegs,
        masks={o.obj_id: [encode_rle(labels[t] == o.obj_id) for t in range(frames)] for o in scene},
    )
    return SyntheticVideo(record, scene, background)


def synthetic_records(seed: int, split: str, count: int, frames: int, size: int, objects: tuple[int, int] = OBJECTS,
                      lookalike: float = LOOKALIKE, twins: float = TWINS, naming: str = NAMING,
                      twin_motion: str = TWIN_MOTION) -> Iterator[VideoRecord]:
    """The ``count`` videos of one split, in order."""
    for index in range(count):
        yield generate_video(seed, split, index, frames, size, objects, lookalike, twins, naming, twin_motion).record


def write_mevis_layout(records: Iterable[VideoRecord], root: str | Path, split: str) -> Path:
    """Write videos in the official MeViS layout under ``root/split`` and return that directory.

    Every object that an expression refers to gets one anno id (numbered from 0 across videos);
    ``mask_dict.json`` holds its per-frame RLE exactly as stored in the record.
    """
    split_dir = Path(root) / split
    videos: dict[str, dict] = {}
    mask_dict: dict[str, list] = {}
    for record in records:
        frame_dir = split_dir / "JPEGImages" / record.video
        frame_dir.mkdir(parents=True, exist_ok=True)
        for name, data in zip(record.frame_names, record.frames):
            (frame_dir / f"{name}.jpg").write_bytes(data)
        anno_ids: dict[int, int] = {}
        for exp in record.expressions:
            for obj_id in exp.obj_ids:
                if obj_id not in anno_ids:
                    anno_ids[obj_id] = len(mask_dict)
                    mask_dict[str(anno_ids[obj_id])] = record.masks[obj_id]
        videos[record.video] = {
            "frames": record.frame_names,
            "expressions": {
                e.exp_id: {"exp": e.text, "obj_id": list(e.obj_ids), "anno_id": [anno_ids[o] for o in e.obj_ids]}
                for e in record.expressions
            },
        }
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / "meta_expressions.json").write_text(json.dumps({"videos": videos}))
    (split_dir / "mask_dict.json").write_text(json.dumps(mask_dict))
    return split_dir
