"""Writing videos into WebDataset shards, with a manifest of what was written; checking a split's format before reading it.

Every prepared split holds ``manifest.json`` beside its shards. Besides the counts, it records:

- ``format_version``: the shard format (:data:`datamodules.records.SHARD_FORMAT_VERSION`) the shards were written in;
- ``converter``: ``{"name", "version", "options"}``, the converter (``mevis``, ``ref-youtube-vos``, ``ref-davis17``,
  ``revos``, ``lv-vis``, or the ``synthetic`` generator), its version (bumped when it writes different records from the
  same input) and the options it was run with (e.g. ``split``, ``skip_bad``, ``min_frames``, ``videos_per_shard``, and
  ``layout`` for LV-VIS; ``seed``, ``frames``, ``size`` for the synthetic data); ``null`` for shards written by
  :func:`write_shards` outside ``glus prepare``;
- ``no_target_expressions``: expressions kept with an empty target (ReVOS no-target expressions; 0 elsewhere);
- ``glus_lightning_version``: the package version that wrote them.

:func:`check_shard_format` runs whenever shards are opened by pattern (``datamodule.resolve_shards``: ``glus fit``,
``validate``, ``test``, ``predict --submission``, ``refine-scores``) and when ``glus predict`` reads a ``.tar`` shard.
For each folder holding such shards:

- a manifest whose ``format_version`` is not in :data:`~datamodules.records.READABLE_SHARD_FORMATS` (a split written
  by a newer, or a much older, glus-lightning) raises :class:`ShardFormatError` naming the manifest, the version found and
  the versions supported, and how to re-run ``glus prepare``;
- a manifest without ``format_version`` was written before manifests recorded it: the shard format has not changed since
  the first release, so it is format 1 and is read as before (``UNVERSIONED_FORMAT``);
- no manifest at all (shards written by other tools, or the manifest removed): the format cannot be checked; the shards
  are read as they are and a warning names the folder once per process (a malformed record still raises or is skipped
  as any corrupt record is).
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from datamodules.records import READABLE_SHARD_FORMATS, SHARD_FORMAT_VERSION, VideoRecord

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PACKAGE = "glus-lightning"
UNVERSIONED_FORMAT = 1  # the format of manifests written before they recorded one: unchanged since the first release


class ShardFormatError(ValueError):
    """A prepared split's manifest names a shard format this code does not read, or cannot be read; the message says what to do."""


def package_version() -> str:
    """The installed glus-lightning version, ``"unknown"`` when it runs from a source tree that is not installed."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class Manifest:
    dataset: str
    split: str
    shards: list[str] = field(default_factory=list)
    videos: int = 0
    frames: int = 0
    expressions: int = 0
    objects: int = 0
    bytes: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"video", "reason"} under --skip-bad
    no_target_expressions: int = 0  # expressions kept without an object (empty target): ReVOS's no-target ones
    format_version: int = SHARD_FORMAT_VERSION
    converter: dict[str, Any] | None = None  # {"name", "version", "options"}; None if not written by `glus prepare`
    glus_lightning_version: str | None = None  # None in manifests written before it was recorded

    def save(self, out_dir: Path) -> Path:
        path = out_dir / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        data = asdict(self)
        tmp.write_text(json.dumps({"format_version": data.pop("format_version"), **data}, indent=2))  # the version first
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, out_dir: Path) -> Manifest:
        """The manifest of ``out_dir``; one written before manifests recorded a format version reads as format 1.

        Keys this code does not know are left out (a newer writer may add some), so check the version
        (:func:`check_manifest_format`) before trusting the rest.
        """
        data = _read_json(Path(out_dir) / MANIFEST)
        data.setdefault("format_version", UNVERSIONED_FORMAT)
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardFormatError(f"{path}: cannot read this manifest of prepared shards ({err}); {_REPREPARE}") from err
    if not isinstance(data, dict):
        raise ShardFormatError(f"{path}: a manifest must be a JSON object, got {type(data).__name__}; {_REPREPARE}")
    return data


_REPREPARE = "re-run `glus prepare` with this glus-lightning (after moving the old split folder aside)"
_warned_unchecked: set[Path] = set()


def check_manifest_format(path: Path) -> int:
    """The shard format version of the manifest at ``path`` (format 1 when it records none); ``ShardFormatError`` when
    this code does not read that version, naming the file, the version found and the versions supported."""
    data = _read_json(path)
    version = data.get("format_version", UNVERSIONED_FORMAT)
    if isinstance(version, bool) or not isinstance(version, int) or version not in READABLE_SHARD_FORMATS:
        supported = ", ".join(str(v) for v in READABLE_SHARD_FORMATS)
        writer = data.get("glus_lightning_version")
        written = f" (written by glus-lightning {writer})" if isinstance(writer, str) else ""
        raise ShardFormatError(
            f"{path}: shard format version {version!r}{written}, but this glus-lightning ({package_version()}) reads "
            f"shard format version {supported} only. {_prepare_hint(data, path.parent)}"
        )
    return version


def _prepare_hint(data: dict[str, Any], split_dir: Path) -> str:
    """What to do: the ``glus prepare`` command that wrote the split when its manifest says, else the general advice."""
    converter = data.get("converter")
    name = converter.get("name") if isinstance(converter, dict) else None
    options = converter.get("options") if isinstance(converter, dict) else None
    if not isinstance(name, str) or not isinstance(options, dict):
        return f"To use this data, {_REPREPARE}, or use the glus-lightning version that wrote it."
    if name == "synthetic":
        flags = [(f"--{key.replace('_', '-')}", options[key]) for key in ("seed", "num_train", "num_val", "frames", "size") if key in options]
        flags += [("--objects", *options["objects"])] if "objects" in options else []
        flags += [(f"--{key.replace('_', '-')}", options[key]) for key in ("lookalike", "twins", "naming", "twin_motion") if key in options]
    else:
        flags = [("--root", options.get("root", "ROOT")), ("--split", options.get("split", split_dir.name))]
        flags += [(f"--{key.replace('_', '-')}", options[key]) for key in ("videos_per_shard", "min_frames") if key in options]
    words = ["glus", "prepare", name, *(str(w) for flag in flags for w in flag)]
    if options.get("skip_bad"):
        words.append("--skip-bad")
    words += ["--out", str(split_dir.parent)]
    old = f"{split_dir.parent / 'train'} and {split_dir.parent / 'val'}" if name == "synthetic" else str(split_dir)
    return (f"To use this data, re-prepare it with this glus-lightning: move {old} aside, then run `{shlex.join(words)}`; "
            "or use the glus-lightning version that wrote it.")


def check_shard_format(urls: Iterable[str | Path]) -> None:
    """Refuse shards whose split this code cannot read: the manifest beside them (``<folder>/manifest.json``) must
    record a readable shard format (see the module doc: no version recorded means format 1; no manifest, a warning)."""
    for folder in sorted({Path(url).parent for url in urls}):
        path = folder / MANIFEST
        if path.is_file():
            check_manifest_format(path)
        elif folder not in _warned_unchecked:
            _warned_unchecked.add(folder)
            log.warning("%s: no %s beside these shards, so their shard format version cannot be checked; "
                        "read as format %d (shards written by `glus prepare` always have one)", folder, MANIFEST, UNVERSIONED_FORMAT)


def write_shards(
    records: Iterable[VideoRecord],
    out_dir: str | Path,
    dataset: str,
    split: str,
    videos_per_shard: int,
    total: int | None = None,
    skipped: list[dict[str, str]] | None = None,
    converter: dict[str, Any] | None = None,
    no_target: list[str] | None = None,
) -> Manifest:
    """Write ``records`` to ``out_dir/<split>-000000.tar`` ... and save ``manifest.json`` beside them.

    ``skipped`` is a list the record source appends to (under ``--skip-bad``); it is read after the
    records are exhausted so the manifest counts what was left out. ``converter`` (``{"name", "version",
    "options"}``) says what made the records; the manifest also records the shard format and package versions.
    ``no_target`` lists the expressions kept without a target, filled by the source as ``skipped`` is.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(dataset=dataset, split=split, format_version=SHARD_FORMAT_VERSION, converter=converter,
                        glus_lightning_version=package_version())
    pattern = str(out / f"{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=videos_per_shard, verbose=0, mtime=0) as writer:  # reproducible bytes
        for record in tqdm(records, total=total, desc=f"prepare {dataset}/{split}", unit="video"):
            writer.write(record.to_sample())
            manifest.videos += 1
            manifest.frames += record.num_frames
            manifest.expressions += len(record.expressions)
            manifest.objects += len(record.masks)
    manifest.shards = sorted(p.name for p in out.glob(f"{split}-*.tar"))
    manifest.bytes = sum((out / name).stat().st_size for name in manifest.shards)
    manifest.skipped = list(skipped or [])
    manifest.no_target_expressions = len(no_target or [])
    manifest.save(out)
    return manifest
