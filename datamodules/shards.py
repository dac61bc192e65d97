"""Writing videos into WebDataset shards, with a manifest of what was written."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from datamodules.records import VideoRecord

MANIFEST = "manifest.json"


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

    def save(self, out_dir: Path) -> Path:
        path = out_dir / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, out_dir: Path) -> Manifest:
        return cls(**json.loads((Path(out_dir) / MANIFEST).read_text()))


def write_shards(
    records: Iterable[VideoRecord],
    out_dir: str | Path,
    dataset: str,
    split: str,
    videos_per_shard: int,
    total: int | None = None,
    skipped: list[dict[str, str]] | None = None,
) -> Manifest:
    """Write ``records`` to ``out_dir/<split>-000000.tar`` ... and save ``manifest.json`` beside them.

    ``skipped`` is a list the record source appends to (under ``--skip-bad``); it is read after the
    records are exhausted so the manifest counts what was left out.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(dataset=dataset, split=split)
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
    manifest.save(out)
    return manifest
