"""Checked readers of the official annotation formats (MeViS, Ref-YouTube-VOS, Ref-DAVIS17).

Both the shard converters (``glus prepare``) and ``glus evaluate`` read the same files:
``meta_expressions.json``, MeViS ``mask_dict.json`` (COCO RLEs) and palette PNGs of object ids.
They share these readers so that a malformed file is rejected the same way, with the same message
naming the file, video and expression, whichever command meets it first. Every fault raises
:class:`ConversionError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class ConversionError(ValueError):
    """The source dataset is malformed; the message names the file, video or expression and why."""


def load_json(path: Path) -> Any:
    """The parsed JSON of ``path``; a missing, malformed or non-UTF-8 file raises naming the file (and line and column)."""
    try:
        with path.open() as f:
            return json.load(f)
    except FileNotFoundError as err:
        raise ConversionError(f"{path}: file not found") from err
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    except UnicodeDecodeError as err:
        raise ConversionError(f"{path}: not UTF-8 text ({err})") from err


def meta_videos(meta_path: Path) -> dict[str, Any]:
    """The ``videos`` object of a ``meta_expressions.json`` (video -> its ``frames`` and ``expressions``)."""
    meta = load_json(meta_path)
    videos = meta.get("videos") if isinstance(meta, dict) else None
    if not isinstance(videos, dict):
        raise ConversionError(f"{meta_path}: expected an object {{'videos': {{video: {{'frames', 'expressions'}}}}}}")
    return videos


def frame_names(entry: Any, where: str) -> list[str]:
    """The ``frames`` of one video's metadata entry: a list of frame names (file names without extension)."""
    names = entry.get("frames") if isinstance(entry, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConversionError(f"{where}: 'frames' must be a list of frame names, got {str(names)[:80]}")
    return names


def expression_items(entry: dict[str, Any], where: str) -> list[tuple[str, dict[str, Any]]]:
    """``(exp_id, expression)`` pairs of one video's entry, the ids as strings; a video needs at least one."""
    expressions = entry.get("expressions")
    if not isinstance(expressions, dict) or not expressions:
        raise ConversionError(f"{where}: 'expressions' must be a non-empty object {{exp_id: {{'exp', ...}}}}")
    for exp_id, exp in expressions.items():
        if not isinstance(exp, dict):
            raise ConversionError(f"{where} expression {exp_id}: expected an object, got {str(exp)[:80]}")
    return [(str(k), v) for k, v in expressions.items()]


def id_list(exp: dict[str, Any], key: str, where: str, allow_empty: bool = False) -> list[str]:
    """A non-empty list of integer ids, as strings (MeViS writes them as numbers or as strings); with ``allow_empty`` a
    missing or empty list is no ids (ReVOS's expressions without a target)."""
    values = exp.get(key)
    if allow_empty and values in (None, []):
        return []
    if not isinstance(values, list) or not values or not all(isinstance(v, (int, str)) and str(v).isdigit() for v in values):
        raise ConversionError(f"{where}: {key!r} must be a non-empty list of integer ids, got {values!r}")
    return [str(v) for v in values]


def check_rle(rle: Any, height: int, width: int, where: str) -> None:
    """A COCO RLE must have ``size == [height, width]`` and runs that cover exactly ``height * width`` pixels.

    pycocotools does not check this itself: bad counts decode to garbage memory, hence the check here.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ConversionError(f"{where}: malformed RLE, expected {{'size': [h, w], 'counts': ...}}, got {str(rle)[:80]}")
    if list(rle["size"]) != [height, width]:
        raise ConversionError(f"{where}: malformed RLE, size {rle['size']} is not the frame size {[height, width]}")
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in counts):
            raise ConversionError(f"{where}: malformed RLE, a list of counts must hold integers")
        runs = np.array(counts, dtype=np.int64)
    else:
        runs = rle_string_runs(counts, where)
    if (runs < 0).any() or runs.sum() != height * width:
        raise ConversionError(f"{where}: malformed RLE, its runs do not cover {height}x{width} pixels")


def rle_string_runs(counts: Any, where: str) -> np.ndarray:
    """Run lengths of a compressed COCO RLE string, so that :func:`check_rle` can check them without decoding.

    Each number is a little-endian group of chars ``'0' + 6 bits`` (5 data bits, 0x20 = more follows,
    0x10 in the last char = negative); from the third run on, a number is the difference to the run
    two places before. Vectorised: MeViS has about a million of these strings.
    """
    if not isinstance(counts, str) or not counts.isascii():
        raise ConversionError(f"{where}: malformed RLE, counts must be an ASCII string or a list, got {str(counts)[:40]!r}")
    chars = np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return chars
    if chars.min() < 0 or chars.max() >= 64:
        raise ConversionError(f"{where}: malformed RLE, counts hold characters outside '0'..'o'")
    ends = np.flatnonzero((chars & 0x20) == 0)  # the last char of each number
    if ends.size == 0 or ends[-1] != chars.size - 1:
        raise ConversionError(f"{where}: malformed RLE, counts string ends inside a number")
    starts = np.concatenate(([0], ends[:-1] + 1))
    digit = np.arange(chars.size) - np.repeat(starts, ends - starts + 1)
    if digit.max() > 11:
        raise ConversionError(f"{where}: malformed RLE, a number in counts is too long")
    values = np.add.reduceat((chars & 0x1F) << (5 * digit), starts)
    values -= np.where(chars[ends] & 0x10, 1 << (5 * (digit[ends] + 1)), 0)
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def read_object_ids(path: Path, height: int, width: int) -> np.ndarray:
    """Object ids per pixel from a palette (or grayscale) PNG, checked to be ``height x width``."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            ids = np.asarray(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ConversionError(f"{path}: not a readable PNG ({err})") from err
    if mode not in ("P", "L"):
        raise ConversionError(f"{path}: expected a palette (P) or grayscale (L) PNG of object ids, got mode {mode}")
    if ids.shape != (height, width):
        raise ConversionError(f"{path}: annotation is {ids.shape[1]}x{ids.shape[0]}, its frame is {width}x{height}")
    return ids
