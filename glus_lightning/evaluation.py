"""``glus evaluate``: J, F and J&F of saved prediction PNGs against official ground truth.

Predictions are ``<pred>/<video>/<exp_id>/<frame>.png`` (8-bit 0/255 or palette, nonzero = object), also
accepted under ``<pred>/Annotations/`` or inside a ``.zip`` of that layout (the benchmark servers' format).
Ground truth is either MeViS (``mask_dict.json``: anno_id -> COCO RLE or null per frame; an
expression's target is the union of its ``anno_id`` masks) or Ref-YouTube-VOS / Ref-DAVIS17
(``Annotations/<video>/<frame>.png`` palette PNGs of object ids; target = ``png == obj_id``, only
frames that have a PNG are scored, as annotations may be sparse). ``meta_expressions.json`` lists
the videos, frames and expressions to score.

An expression without any prediction PNG (its folder or its whole video absent) scores J = F = 0
in every layout, as the official MeViS script scores a missing video, so that a partial submission never scores
higher here than on the server; such videos and expressions are counted and named. A single frame
missing from an expression that has other PNGs is scored as an empty mask and listed: the official
script crashes there, so there is no official number to follow. Malformed ground truth, metadata or
prediction files (16-bit PNGs included, see :meth:`Predictions.read`) raise an error naming the file.

Scores use :class:`~glus_lightning.metrics.JAndF` on each expression's frames (per-frame DAVIS J and F,
averaged over the frames); per video J and F are the mean over its expressions, overall ones the mean over
all expressions, and J&F = (J + F) / 2. Which frames count is the scoring protocol (``--protocol``):

- ``mevis``: every frame of the expression (MeViS: the official MeViS script). The default for a ``mask_dict.json``.
- ``davis17``: every annotated frame, averaged the same way; GLUS's own Ref-DAVIS17 script (``utils/eval_davis.py``)
  scores so. The default for an ``Annotations`` directory (Ref-YouTube-VOS, Ref-DAVIS17). It gives the same numbers
  as ``mevis``: the name says which published numbers it compares with.
- ``davis17-toolkit``: the rule of the DAVIS-2017 evaluation toolkit (github.com/davisvideochallenge/davis2017-evaluation)
  for its semi-supervised task: the first and last annotated frame of each video are left out
  (``davis2017/evaluation.py``: ``all_gt_masks[:, 1:-1]``; their predictions are not read), J-Mean and F-Mean of each
  object are the means over the remaining frames (``utils.db_statistics``), and J&F-Mean is
  (mean J-Mean + mean F-Mean) / 2 over all objects of all videos (``evaluation_method.py``). An expression is one
  object here: a Ref-DAVIS17 run scored by the toolkit per annotator (one expression per object) and averaged over
  the annotators is the mean over all expressions when every annotator describes every object. A video with fewer
  than 3 annotated frames has nothing left to score and is an error (the toolkit would average an empty list to NaN).
- ``revos``: ReVOS (VISA's ``tools/eval_revos.py``): every frame of a ``mask_dict.json``, plus A (pixel accuracy) and R
  (robustness, which needs the video's foreground: ``--foreground`` or the union of its annotated objects) per
  expression, averaged per expression type; overall is the mean of the referring and reasoning means
  (:mod:`glus_lightning.revos_scores`, which also says where this departs from the official script).

The per-frame J and F are the toolkit's (``davis2017/metrics.py``, see :mod:`glus_lightning.metrics.davis`). What the
toolkit does and no protocol here repeats: it reads one palette PNG per frame holding every object of an annotator
(overlaps already resolved by the method), while ``glus evaluate`` reads each expression's own mask; it stops at a
missing prediction PNG, while here the rules above for missing predictions apply; and it scores only object ids up to
the largest one in the first ground-truth frame (all objects of Ref-DAVIS17 valid show there). Its *unsupervised*
task, which ReferFormer's ``scripts/dist_test_davis.sh`` runs (``eval_davis.py`` without ``--task`` defaults to it, on
``Annotations_unsupervised``), is another rule again: every frame, void pixels (255) left out of J and F, and predicted
objects matched to ground-truth objects by the Hungarian algorithm on J&F; it is not one of these protocols.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from datamodules.formats import (
    ConversionError,
    check_rle,
    expression_items,
    frame_names,
    id_list,
    load_json,
    meta_videos,
    read_object_ids,
)
from datamodules.records import RecordError, decode_rle
from glus_lightning import revos_scores
from glus_lightning.evaluation_errors import EvaluationError
from glus_lightning.metrics import JAndF

SCORES = ("J", "F", "J&F")
CSV_COLUMNS = ("level", "video", "exp_id", "frames", "missing_frames", *SCORES)
EXTRA_SCORES = ("A", "R")  # ReVOS only; their CSV columns, and ``type``, follow CSV_COLUMNS when a result has them


@dataclass
class Target:
    """Ground truth of one expression: the frames to score and their boolean masks ``[T, H, W]``."""

    video: str
    exp_id: str
    frames: list[str]
    masks: np.ndarray
    foreground: np.ndarray | None = None  # ReVOS: every annotated object of the video ``[T, H, W]``, for R

    @property
    def key(self) -> str:
        return f"{self.video}/{self.exp_id}"


@dataclass(frozen=True)
class Protocol:
    """Which frames of an expression are scored; J and F are then averaged over them, then over expressions."""

    name: str
    summary: str  # for the table header
    drop_ends: bool  # the first and last annotated frame of each video are left out (DAVIS-2017 toolkit)

    def scored(self, target: Target) -> Target:
        """``target`` cut to the frames this protocol scores."""
        if not self.drop_ends:
            return target
        if len(target.frames) < 3:
            raise EvaluationError(
                f"{target.key}: {len(target.frames)} annotated frame(s); protocol {self.name} leaves out the first and last "
                "frame of each video, so nothing would be scored (the DAVIS-2017 toolkit averages an empty list to NaN)"
            )
        foreground = None if target.foreground is None else target.foreground[1:-1]
        return Target(target.video, target.exp_id, target.frames[1:-1], target.masks[1:-1], foreground)


PROTOCOLS = {
    protocol.name: protocol
    for protocol in (
        Protocol("mevis", "every frame, J and F averaged per expression, then over expressions (official MeViS script)", False),
        Protocol("davis17", "every annotated frame, J and F averaged per expression, then over expressions (GLUS's Ref-DAVIS17 script)",
                 False),
        Protocol("davis17-toolkit", "DAVIS-2017 toolkit: first and last annotated frame of each video left out, J and F averaged "
                 "per expression (object), then over expressions", True),
        Protocol("revos", "ReVOS (VISA's eval_revos.py): every frame, J, F, A and R averaged per expression, then per type; "
                 "overall = mean of the referring and reasoning means", False),
    )
}


def default_protocol(gt: str | Path) -> str:
    """The protocol of a ground-truth layout: ``mevis`` for a ``mask_dict.json``, ``davis17`` for an ``Annotations`` directory."""
    return "mevis" if Path(gt).suffix == ".json" else "davis17"


@dataclass
class EvaluationResult:
    """Scores per expression (keys ``"<video>/<exp_id>"``), per video and overall, plus missing predictions."""

    expressions: dict[str, dict[str, float]]
    videos: dict[str, dict[str, float]]
    overall: dict[str, float]
    frames: dict[str, int] = field(default_factory=dict)  # expression key -> frames scored
    missing: dict[str, int] = field(default_factory=dict)  # expression key -> frames without a prediction
    absent_videos: list[str] = field(default_factory=list)  # videos without any prediction
    absent_expressions: list[str] = field(default_factory=list)  # expression keys without any prediction: J = F = 0
    protocol: str | None = None  # the scoring protocol (PROTOCOLS), None when not known (scores from a model's loop)
    types: dict[str, str] = field(default_factory=dict)  # ReVOS: expression key -> referring, reasoning or other
    groups: dict[str, dict[str, float]] = field(default_factory=dict)  # ReVOS: mean scores per aggregated type

    @classmethod
    def from_expressions(
        cls,
        expressions: dict[str, dict[str, float]],
        frames: dict[str, int] | None = None,
        missing: dict[str, int] | None = None,
        absent_expressions: list[str] | None = None,
        protocol: str | None = None,
    ) -> EvaluationResult:
        """Aggregate per-expression scores (e.g. ``JAndF.per_expression()``); the video is the key up to its last ``/``.

        A video is absent when all of its expressions are in ``absent_expressions``.
        """
        absent = list(absent_expressions or [])
        by_video: dict[str, list[str]] = {}
        for key in expressions:
            by_video.setdefault(key.rpartition("/")[0], []).append(key)
        videos = {video: mean_scores([expressions[k] for k in keys]) for video, keys in by_video.items()}
        absent_set = set(absent)
        absent_videos = [video for video, keys in by_video.items() if absent_set.issuperset(keys)]
        overall = mean_scores(list(expressions.values()))
        return cls(expressions, videos, overall, frames or {}, missing or {}, absent_videos, absent, protocol)

    def by_type(self, types: dict[str, str]) -> EvaluationResult:
        """ReVOS: means per aggregated type (``groups``) and overall = their mean; ``types``: expression key -> type."""
        names = score_names(self.overall)
        self.types = {key: types[key] for key in self.expressions}
        self.groups = {kind: mean_scores([s for k, s in self.expressions.items() if types[k] == kind], names)
                       for kind in revos_scores.AGGREGATED}
        self.overall = {n: float(np.mean([group[n] for group in self.groups.values()])) for n in names}
        return self


def mean_scores(rows: list[dict[str, float]], names: tuple[str, ...] | None = None) -> dict[str, float]:
    """Mean of each score over expressions (``names``, default those of the first row), J&F = (J + F) / 2; NaN if no rows."""
    names = names or (tuple(rows[0]) if rows else SCORES)
    means = {n: float(np.mean([r[n] for r in rows])) if rows else float("nan") for n in names}
    return {**means, "J&F": (means["J"] + means["F"]) / 2}


def score_names(scores: dict[str, float]) -> tuple[str, ...]:
    """J, F, J&F and, where present, A and R: the columns of the table and CSV."""
    return (*SCORES, *(n for n in EXTRA_SCORES if n in scores))


# ------------------------------------------------------------------------------------ predictions

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # then the IHDR chunk: length, type, width, height, bit depth (byte 24)


class Predictions:
    """Prediction PNGs in a directory (optionally under ``Annotations/``) or a ``.zip`` of either layout."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        if self.path.is_file() and self.path.suffix == ".zip":
            try:
                self._zip = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile as err:
                raise EvaluationError(f"{self.path}: not a readable zip file ({err})") from err
            names = self._zip.namelist()
            marked = next((n for n in names if "Annotations/" in n), None)
            self._prefix = marked[: marked.index("Annotations/") + len("Annotations/")] if marked else ""
            self._names = set(names)
        elif self.path.is_dir():
            self._root = self.path / "Annotations" if (self.path / "Annotations").is_dir() else self.path
        else:
            raise EvaluationError(f"--pred {self.path}: neither a prediction directory nor a .zip file")

    def _png(self, video: str, exp_id: str, frame: str) -> tuple[str, bytes] | None:
        """Where the PNG of one frame is and its bytes, or None when there is none."""
        relative = f"{video}/{exp_id}/{frame}.png"
        if self._zip is not None:
            name = self._prefix + relative
            return (f"{self.path}:{name}", self._zip.read(name)) if name in self._names else None
        file = self._root / relative
        return (str(file), file.read_bytes()) if file.is_file() else None

    def read(self, video: str, exp_id: str, frame: str, shape: tuple[int, int] | None = None) -> np.ndarray | None:
        """Boolean mask of one frame (checked to be ``shape`` when given), or None when there is no prediction for it.

        A 16-bit PNG is refused: the official readers (cv2 grayscale) divide it by 256, so its 0/255
        masks score empty on the server; reading it that way here would hide the fault, reading it
        as nonzero = object would score it higher than the server does.
        """
        found = self._png(video, exp_id, frame)
        if found is None:
            return None
        where, data = found
        if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) > 24 and data[24] == 16:
            raise EvaluationError(
                f"{where}: a 16-bit PNG; predictions must be 8-bit PNGs, grayscale 0/255 or palette (nonzero = object): "
                "the official scorers read 16-bit PNGs divided by 256, so 0/255 in 16 bits is an empty mask there"
            )
        try:
            with Image.open(io.BytesIO(data)) as img:
                mask = np.asarray(img if img.mode in ("1", "L", "P") else img.convert("L")) != 0
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise EvaluationError(f"{where}: not a readable PNG ({err})") from err
        if shape is not None and mask.shape != shape:
            got, want = f"{mask.shape[1]}x{mask.shape[0]}", f"{shape[1]}x{shape[0]}"
            raise EvaluationError(f"{where}: prediction is {got}, its ground truth is {want}")
        return mask

    def size(self, video: str, exp_ids: list[str], frames: list[str]) -> tuple[int, int] | None:
        """Height and width of the first prediction of a video, if any (for ground truth without any mask)."""
        for exp_id in exp_ids:
            for frame in frames:
                mask = self.read(video, exp_id, frame)
                if mask is not None:
                    return mask.shape
        return None


# ----------------------------------------------------------------------------------- ground truth

GroundTruth = Callable[[Predictions], Iterator[Target]]


def _meta_videos(meta: Path) -> dict[str, Any]:
    if not Path(meta).is_file():
        raise EvaluationError(f"--meta {meta}: file not found")
    return meta_videos(Path(meta))


def mevis_ground_truth(mask_dict: Path, meta: Path, foreground: revos_scores.Foreground | None = None) -> tuple[int, GroundTruth]:
    """Number of expressions and a reader of MeViS targets (union of each expression's ``anno_id`` masks).

    With ``foreground``, each target also carries its video's foreground, made from all objects of the video (ReVOS).
    """
    videos = _meta_videos(meta)
    if not Path(mask_dict).is_file():
        raise EvaluationError(f"--gt {mask_dict}: file not found")
    rles = load_json(Path(mask_dict))
    if not isinstance(rles, dict):
        raise EvaluationError(f"{mask_dict}: expected an object {{anno_id: [RLE or null per frame]}}, got {type(rles).__name__}")

    def read(predictions: Predictions) -> Iterator[Target]:
        for video, entry in videos.items():
            where = f"{meta}: video {video!r}"
            frames = frame_names(entry, where)
            items = expression_items(entry, where)
            # ReVOS (with a foreground) has expressions without a target: no anno_id, scored against empty masks
            annos = {exp_id: id_list(exp, "anno_id", f"{where} expression {exp_id}", allow_empty=foreground is not None)
                     for exp_id, exp in items}
            for exp_id, ids in annos.items():
                for anno_id in ids:
                    _check_object(rles.get(anno_id), len(frames), f"{mask_dict}: anno_id {anno_id} of {video}/{exp_id}")
            sizes = [rle.get("size") for ids in annos.values() for a in ids for rle in rles[a] if isinstance(rle, dict)]
            # a video without any ground-truth mask takes its size from the predictions; 1x1 if none (all empty: J = F = 1)
            if sizes:
                shape = _rle_shape(sizes[0], f"{mask_dict} ({video})")
            else:
                shape = predictions.size(video, list(annos), frames) or (1, 1)
            decoded: dict[str, np.ndarray] = {}
            for anno_id in (a for ids in annos.values() for a in ids):
                if anno_id not in decoded:
                    decoded[anno_id] = _decode_object(rles[anno_id], shape, f"{mask_dict}: anno_id {anno_id} ({video})")
            video_foreground = foreground(video, len(frames), shape, decoded) if foreground else None
            for exp_id, ids in annos.items():
                target = np.zeros((len(frames), *shape), dtype=bool)
                for anno_id in ids:
                    target |= decoded[anno_id]
                yield Target(video, exp_id, frames, target, video_foreground)

    return sum(len(expression_items(e, f"{meta}: video {v!r}")) for v, e in videos.items()), read


def _check_object(per_frame: Any, num_frames: int, where: str) -> None:
    if not isinstance(per_frame, list) or len(per_frame) != num_frames:
        got = "no entry" if per_frame is None else f"{len(per_frame)} entries" if isinstance(per_frame, list) else per_frame
        raise EvaluationError(f"{where}: must be a list of {num_frames} RLEs or nulls (one per frame), got {got}")


def _rle_shape(size: Any, where: str) -> tuple[int, int]:
    if not isinstance(size, list) or len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise EvaluationError(f"{where}: malformed RLE, 'size' must be [height, width], got {str(size)[:40]}")
    return size[0], size[1]


def _decode_object(per_frame: list[Any], shape: tuple[int, ...], where: str) -> np.ndarray:
    masks = np.zeros((len(per_frame), *shape), dtype=bool)
    for t, rle in enumerate(per_frame):
        if rle is not None:
            check_rle(rle, shape[0], shape[1], f"{where} frame {t}")
            masks[t] = decode_rle(rle, f"{where} frame {t}") != 0
    return masks


def palette_ground_truth(annotations: Path, meta: Path) -> tuple[int, GroundTruth]:
    """Number of expressions and a reader of Ref-YouTube-VOS / Ref-DAVIS17 targets (``png == obj_id``)."""
    videos = _meta_videos(meta)
    root = Path(annotations)
    if (root / "Annotations").is_dir():
        root = root / "Annotations"
    if not root.is_dir():
        raise EvaluationError(f"--gt {annotations}: neither mask_dict.json nor an Annotations directory")

    def read(predictions: Predictions) -> Iterator[Target]:
        for video, entry in videos.items():
            where = f"{meta}: video {video!r}"
            video_dir = root / video
            frames = [n for n in frame_names(entry, where) if (video_dir / f"{n}.png").is_file()]
            if not frames:
                raise EvaluationError(f"{where}: no ground-truth PNG for any of its frames in {video_dir}")
            try:
                with Image.open(video_dir / f"{frames[0]}.png") as img:
                    height, width = img.height, img.width
            except (OSError, ValueError, SyntaxError) as err:
                raise EvaluationError(f"{video_dir / frames[0]}.png: not a readable PNG ({err})") from err
            ids = np.stack([read_object_ids(video_dir / f"{n}.png", height, width) for n in frames])
            for exp_id, exp in expression_items(entry, where):
                raw = exp.get("obj_id")  # "1" in Ref-YouTube-VOS; a list is taken as the union of its objects
                obj_ids = id_list({"obj_id": raw if isinstance(raw, list) else [raw]}, "obj_id", f"{where} expression {exp_id}")
                yield Target(video, exp_id, frames, np.isin(ids, [int(o) for o in obj_ids]))

    return sum(len(expression_items(e, f"{meta}: video {v!r}")) for v, e in videos.items()), read


def open_ground_truth(gt: str | Path, meta: str | Path) -> tuple[int, GroundTruth]:
    """MeViS when ``gt`` is a ``.json`` file (``mask_dict.json``), else an ``Annotations`` directory of palette PNGs."""
    gt, meta = Path(gt), Path(meta)
    return mevis_ground_truth(gt, meta) if gt.suffix == ".json" else palette_ground_truth(gt, meta)


# ------------------------------------------------------------------------------------- evaluation


def evaluate(pred: str | Path, gt: str | Path, meta: str | Path, progress: bool = True, protocol: str | None = None,
             foreground: str | Path | None = None) -> EvaluationResult:
    """Score the predictions at ``pred`` against ``gt`` for every expression of ``meta`` (see the module doc).

    ``protocol`` is a name of ``PROTOCOLS``; None picks it from the ground-truth layout (``default_protocol``).
    ``foreground`` is ReVOS's ``mask_dict_foreground.json`` (protocol ``revos`` only; None: computed).
    """
    name = protocol or default_protocol(gt)
    if name not in PROTOCOLS:
        raise EvaluationError(f"unknown protocol {name!r}; valid: {', '.join(PROTOCOLS)}")
    rule = PROTOCOLS[name]
    revos = name == "revos"
    if revos:
        if Path(gt).suffix != ".json":
            raise EvaluationError(f"--gt {gt}: protocol revos needs ReVOS's mask_dict.json")
        total, targets = mevis_ground_truth(Path(gt), Path(meta), revos_scores.foreground_reader(foreground, Path(gt)))
        types = revos_scores.expression_types(Path(meta))
    elif foreground is not None:
        raise EvaluationError(f"--foreground {foreground}: only protocol revos uses a foreground (got protocol {name})")
    else:
        total, targets = open_ground_truth(gt, meta)
    predictions = Predictions(pred)
    metric = JAndF().set_dtype(torch.float64)  # per-expression values go to the CSV at full precision
    frames: dict[str, int] = {}
    missing: dict[str, int] = {}
    absent: list[str] = []
    extra: dict[str, dict[str, float]] = {}  # A and R (ReVOS)
    for whole in tqdm(targets(predictions), total=total, desc="evaluate", unit="expr", disable=not progress):
        target = rule.scored(whole)  # predictions of frames left out are not read
        pred_masks = np.zeros_like(target.masks)
        no_png = 0
        for t, frame in enumerate(target.frames):
            mask = predictions.read(target.video, target.exp_id, frame, target.masks.shape[1:])
            if mask is None:
                no_png += 1
            else:
                pred_masks[t] = mask
        frames[target.key] = len(target.frames)
        if no_png:
            missing[target.key] = no_png
        if no_png == len(target.frames):
            absent.append(target.key)  # scored 0 below, as the official script scores a missing video
        else:
            metric.update(torch.from_numpy(pred_masks), torch.from_numpy(target.masks), key=target.key)
            if revos:
                extra[target.key] = revos_scores.pixel_scores(pred_masks, target.masks, target.foreground)
    scored = metric.per_expression()
    zero = dict.fromkeys((*SCORES, *(EXTRA_SCORES if revos else ())), 0.0)
    expressions = {key: {**(scored.get(key) or zero), **extra.get(key, {})} for key in frames}  # in the metadata's order
    result = EvaluationResult.from_expressions(expressions, frames, missing, absent, protocol=name)
    return result.by_type(types) if revos else result


def write_csv(result: EvaluationResult, path: str | Path) -> Path:
    """One row per expression, then per video, then ``overall``; scores as fractions in [0, 1], frames empty if unknown.

    A ReVOS result adds the columns A, R and ``type`` (of an expression, or of a ``type`` row: the mean of that type's
    expressions, before ``overall``, which is the mean of those rows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = score_names(result.overall)
    typed = bool(result.types)

    def counts(keys: list[str]) -> list[Any]:
        return [sum(result.frames.get(k, 0) for k in keys) if result.frames else "", sum(result.missing.get(k, 0) for k in keys)]

    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CSV_COLUMNS, *names[len(SCORES):], *(["type"] if typed else [])])
        for key, scores in result.expressions.items():
            video, _, exp_id = key.rpartition("/")
            kind = [result.types.get(key, "")] if typed else []
            writer.writerow(["expression", video, exp_id, result.frames.get(key, ""), result.missing.get(key, 0),
                             *_cells(scores, names), *kind])
        for video, scores in result.videos.items():
            keys = [k for k in result.expressions if k.rpartition("/")[0] == video]
            writer.writerow(["video", video, "", *counts(keys), *_cells(scores, names), *([""] if typed else [])])
        for kind, scores in result.groups.items():
            keys = [k for k in result.expressions if result.types.get(k) == kind]
            writer.writerow(["type", "", "", *counts(keys), *_cells(scores, names), kind])
        writer.writerow(["overall", "", "", *counts(list(result.expressions)), *_cells(result.overall, names),
                         *([""] if typed else [])])
    return path


def _cells(scores: dict[str, float], names: tuple[str, ...]) -> list[str]:
    return [f"{scores[name]:.6f}" for name in names]


def format_table(result: EvaluationResult) -> str:
    """Per-video and overall scores in percent, and the expressions that lacked predictions."""
    names = score_names(result.overall)
    zero = " = ".join(n for n in names if n != "J&F") + " = 0"
    width = max([len("overall"), *(len(v) for v in [*result.videos, *result.groups])])
    header = f"{'video':<{width}}  " + "  ".join(f"{n:>6}" for n in names)
    lines = [header]
    if result.protocol:
        summary = PROTOCOLS[result.protocol].summary if result.protocol in PROTOCOLS else ""
        lines.insert(0, f"protocol: {result.protocol}" + (f" ({summary})" if summary else ""))
    summaries = [*result.groups.items(), ("overall", result.overall)]
    for i, (name, scores) in enumerate([*result.videos.items(), *summaries]):
        if i == len(result.videos):
            lines.append("-" * len(header))
        lines.append(f"{name:<{width}}  " + "  ".join(f"{100 * scores[s]:6.2f}" for s in names))
    lines.append(f"{len(result.expressions)} expressions in {len(result.videos)} videos")
    if result.types:
        kinds = [result.types[k] for k in result.expressions]
        counted = ", ".join(f"{kinds.count(kind)} {kind}" for kind in dict.fromkeys([*result.groups, *kinds]))
        lines.append(f"expression types: {counted}; overall = mean of the {' and '.join(result.groups)} rows "
                     "(other: in the video rows only)")
    absent, absent_videos = set(result.absent_expressions), set(result.absent_videos)
    in_absent_videos = [k for k in result.absent_expressions if k.rpartition("/")[0] in absent_videos]
    others = [k for k in result.absent_expressions if k.rpartition("/")[0] not in absent_videos]
    if result.absent_videos:
        lines.append(
            f"no predictions for {len(result.absent_videos)} of {len(result.videos)} videos "
            f"({_count(len(in_absent_videos), 'expression')}), scored {zero}: {_some(result.absent_videos)}"
        )
    if others:
        lines.append(
            f"no predictions for {_count(len(others), 'more expression')} (of videos that have some), "
            f"scored {zero}: {_some(others)}"
        )
    partial = {key: n for key, n in result.missing.items() if key not in absent}
    if partial:
        lines.append(f"missing frames (scored as empty masks) for {_count(len(partial), 'expression')}:")
        lines.extend(f"  {key}: {n} of {result.frames.get(key, '?')} frames" for key, n in partial.items())
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _some(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` names, and how many more (all are in the CSV)."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f", ... ({more} more, see the CSV)" if more > 0 else "")


def default_csv_path(pred: str | Path) -> Path:
    """``<pred>_eval.csv`` beside the prediction directory or zip."""
    pred = Path(pred)
    return pred.with_name(f"{pred.stem if pred.suffix == '.zip' else pred.name}_eval.csv")


# ---------------------------------------------------------------------------------------- command


def configure_evaluate_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", type=Path, required=True, help="DIR/<video>/<exp_id>/<frame>.png, DIR/Annotations/..., .zip")
    parser.add_argument("--gt", type=Path, required=True, help="MeViS or ReVOS mask_dict.json, or a Ref-YouTube-VOS/DAVIS Annotations dir")
    parser.add_argument("--meta", type=Path, required=True, help="meta_expressions.json of the split")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default=None,
                        help="which frames count: mevis (every frame), davis17 (every annotated frame, as GLUS scores Ref-DAVIS17; "
                        "same numbers as mevis), davis17-toolkit (the DAVIS-2017 toolkit: first and last frame of each video left "
                        "out), revos (ReVOS: adds A and R, means per expression type, needs a mask_dict.json). Default: mevis for a "
                        "mask_dict.json, davis17 for an Annotations dir")
    parser.add_argument("--foreground", type=Path, default=None,
                        help="ReVOS mask_dict_foreground.json (--protocol revos; default: each video's foreground is the union "
                        "of the objects of all its expressions, as ReVOS's generate_foreground_mask.py makes it)")
    parser.add_argument("--csv", type=Path, default=None, help="per-expression, video and overall CSV (default: <pred>_eval.csv)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``glus evaluate``: table to stdout, CSV written; exit code 1 with a message on malformed input."""
    try:
        result = evaluate(args.pred, args.gt, args.meta, progress=not args.no_progress, protocol=args.protocol,
                          foreground=args.foreground)
    except (EvaluationError, ConversionError, RecordError) as err:
        print(f"glus evaluate: error: {err}", file=sys.stderr)
        return 1
    print(format_table(result))
    print(f"CSV: {write_csv(result, args.csv or default_csv_path(args.pred))}")
    return 0
