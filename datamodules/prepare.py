"""``glus prepare``: official datasets, a folder of your own videos (``folder``, :mod:`datamodules.own_folder`) or the
synthetic dataset into WebDataset shards.

Every split goes to its own directory ``<out>/<split>/`` (shards ``<split>-000000.tar`` ... and
``manifest.json``), so splits never overwrite each other's manifest. A directory that already
holds shards is refused rather than mixed: the manifest lists every ``<split>-*.tar`` there.
The manifest also records the shard format version, the converter's name, version and options,
and the glus-lightning version (:mod:`datamodules.shards`).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from datamodules.converters import CONVERTER_VERSIONS, OPENERS
from datamodules.formats import ConversionError
from datamodules.own_folder import CONVERTER_VERSION as FOLDER_CONVERTER_VERSION
from datamodules.own_folder import DATASET as FOLDER
from datamodules.own_folder import GT_DIR, GroundTruth, open_folder
from datamodules.shards import MANIFEST, Manifest, write_shards
from datamodules.synthetic import (
    DATASET,
    GENERATOR_VERSION,
    LOOKALIKE,
    NAMING,
    NAMINGS,
    OBJECTS,
    TWIN_MOTION,
    TWIN_MOTIONS,
    TWINS,
    synthetic_records,
)

SYNTHETIC_SHARDS = 8  # shards per synthetic split, so that up to 8 ranks x workers each get some


def configure_prepare_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``prepare <dataset>`` subcommands and their options to ``parser``."""
    datasets = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for name in OPENERS:
        sub = datasets.add_parser(name, help=f"convert an official {name} split", description=f"Convert one {name} split to shards.")
        sub.add_argument("--root", type=Path, required=True, help="dataset root in the official layout")
        sub.add_argument("--split", required=True, help="split name, e.g. train, valid, valid_u")
        sub.add_argument("--out", type=Path, required=True, help="output root; shards go to OUT/SPLIT/")
        sub.add_argument("--videos-per-shard", type=_positive, default=50, help="videos per .tar shard (default: 50)")
        sub.add_argument("--skip-bad", action="store_true", help="skip malformed videos (listed in the manifest) instead of failing")
        sub.add_argument("--min-frames", type=_positive, default=1, help="a video with fewer frames is bad (default: 1)")
    sub = datasets.add_parser(FOLDER, help="convert a folder of your own videos (docs/own_data.md)",
                              description="Convert a folder of your own videos, expressions and masks to shards in OUT/SPLIT/ "
                              "(and, when labelled, ground truth for glus evaluate in OUT/SPLIT/gt/). Layout: docs/own_data.md.")
    sub.add_argument("--root", type=Path, required=True, help="DIR/expressions.json or .csv, DIR/<video>/frames/ or DIR/<video>.mp4, "
                     "DIR/<video>/masks/")
    sub.add_argument("--split", default="train", help="split name: shards go to OUT/SPLIT/ (default: train)")
    sub.add_argument("--out", type=Path, required=True, help="output root; shards go to OUT/SPLIT/")
    sub.add_argument("--videos-per-shard", type=_positive, default=50, help="videos per .tar shard (default: 50)")
    sub.add_argument("--skip-bad", action="store_true", help="skip malformed videos (listed in the manifest) instead of failing")
    sub.add_argument("--min-frames", type=_positive, default=1, help="a video with fewer (annotated) frames is bad (default: 1; "
                     "training needs data.num_query = 4)")
    sub = datasets.add_parser("synthetic", help="generate the built-in synthetic dataset", description="Write OUT/train and OUT/val.")
    sub.add_argument("--out", type=Path, required=True, help="output root; shards go to OUT/train/ and OUT/val/")
    sub.add_argument("--seed", type=int, default=0, help="same seed, byte-identical shards (default: 0)")
    sub.add_argument("--num-train", type=_positive, default=200, help="training videos (default: 200)")
    sub.add_argument("--num-val", type=_positive, default=40, help="validation videos (default: 40)")
    sub.add_argument("--frames", type=_positive, default=12, help="frames per video (default: 12)")
    sub.add_argument("--size", type=_positive, default=96, help="frame height and width in pixels (default: 96)")
    sub.add_argument("--objects", type=_positive, nargs=2, default=list(OBJECTS), metavar=("MIN", "MAX"),
                     help=f"objects per video (default: {OBJECTS[0]} {OBJECTS[1]})")
    sub.add_argument("--lookalike", type=float, default=LOOKALIKE,
                     help=f"chance that an object copies an earlier one's looks but one attribute (default: {LOOKALIKE})")
    sub.add_argument("--twins", type=float, default=TWINS, help=f"chance that a video holds a pair of twins (default: {TWINS})")
    sub.add_argument("--twin-motion", choices=TWIN_MOTIONS, default=TWIN_MOTION,
                     help=f"crossing: twins move differently throughout; settled: only before mid-video (default: {TWIN_MOTION})")
    sub.add_argument("--naming", choices=NAMINGS, default=NAMING,
                     help=f"shortest: the fewest words that pick an object; colour: the fewest that name its colour too (default: {NAMING})")


def run_prepare(args: argparse.Namespace) -> int:
    """Run the subcommand parsed by ``configure_prepare_parser``; print a summary; return the exit code."""
    try:
        if args.dataset == "synthetic":
            manifests = prepare_synthetic(args.out, args.seed, args.num_train, args.num_val, args.frames, args.size,
                                          tuple(args.objects), args.lookalike, args.twins, args.naming, args.twin_motion)
            outs = {split: Path(args.out) / split for split in manifests}
        elif args.dataset == FOLDER:
            manifests = {args.split: prepare_folder(args.root, args.out, args.split, args.videos_per_shard, args.skip_bad,
                                                    args.min_frames)}
            outs = {args.split: Path(args.out) / args.split}
        else:
            manifests = {
                args.split: prepare_official(
                    args.dataset, args.root, args.split, args.out, args.videos_per_shard, args.skip_bad, args.min_frames
                )
            }
            outs = {args.split: Path(args.out) / args.split}
    except (ConversionError, FileExistsError, ValueError) as err:
        print(f"glus prepare {args.dataset}: error: {err}", file=sys.stderr)
        return 1
    for split, manifest in manifests.items():
        print(_summary(manifest, outs[split]))
        gt = outs[split] / GT_DIR
        if args.dataset == FOLDER and (gt / "meta_expressions.json").is_file():
            print(f"ground truth for glus evaluate: --gt {gt / 'mask_dict.json'} --meta {gt / 'meta_expressions.json'}")
    return 0


def prepare_folder(root: str | Path, out: str | Path, split: str = "train", videos_per_shard: int = 50, skip_bad: bool = False,
                   min_frames: int = 1) -> Manifest:
    """Convert a folder of your own videos (``datamodules.own_folder``) into ``out/split/``; a labelled split also gets
    ``out/split/gt/{mask_dict.json, meta_expressions.json}`` for ``glus evaluate``. Notes go to stderr."""
    out_dir = _fresh(Path(out) / split, split)
    folder = open_folder(root, split, min_frames, skip_bad)
    options = {"root": str(Path(root).resolve()), "split": split, "videos_per_shard": videos_per_shard, "skip_bad": skip_bad,
               "min_frames": min_frames}
    converter = {"name": FOLDER, "version": FOLDER_CONVERTER_VERSION, "options": options}
    truth = GroundTruth()
    with _removed_on_failure(out_dir, split):
        manifest = write_shards(truth.collect(folder.source.records()), out_dir, FOLDER, split, videos_per_shard,
                                total=len(folder.source.videos), skipped=folder.source.skipped, converter=converter)
        if truth.videos:
            truth.write(out_dir / GT_DIR)
    for note in folder.notes():
        print(note, file=sys.stderr)
    return manifest


def prepare_official(
    dataset: str, root: str | Path, split: str, out: str | Path, videos_per_shard: int, skip_bad: bool, min_frames: int
) -> Manifest:
    """Convert one split of an official dataset into ``out/split/``."""
    if dataset not in OPENERS:
        raise ValueError(f"dataset {dataset!r} has no converter; valid: {', '.join(OPENERS)}")
    out_dir = _fresh(Path(out) / split, split)
    source = OPENERS[dataset](root, split, min_frames, skip_bad)
    options = {"root": str(Path(root).resolve()), "split": split, "videos_per_shard": videos_per_shard, "skip_bad": skip_bad,
               "min_frames": min_frames}
    if source.layout is not None:  # the dataset has several layouts (LV-VIS): which one was read
        options["layout"] = source.layout
    converter = {"name": dataset, "version": CONVERTER_VERSIONS[dataset], "options": options}
    with _removed_on_failure(out_dir, split):
        return write_shards(source.records(), out_dir, dataset, split, videos_per_shard, total=len(source.videos), skipped=source.skipped,
                            converter=converter, no_target=source.no_target)


def prepare_synthetic(out: Path, seed: int, num_train: int, num_val: int, frames: int, size: int,
                      objects: tuple[int, int] = OBJECTS, lookalike: float = LOOKALIKE, twins: float = TWINS,
                      naming: str = NAMING, twin_motion: str = TWIN_MOTION) -> dict[str, Manifest]:
    """Generate the synthetic dataset into ``out/train/`` and ``out/val/``; returns their manifests."""
    counts = {"train": num_train, "val": num_val}
    dirs = {split: _fresh(Path(out) / split, split) for split in counts}
    manifests = {}
    options = {"seed": seed, "num_train": num_train, "num_val": num_val, "frames": frames, "size": size,
               "objects": list(objects), "lookalike": lookalike, "twins": twins, "naming": naming, "twin_motion": twin_motion}
    for split, count in counts.items():
        with _removed_on_failure(dirs[split], split):
            records = synthetic_records(seed, split, count, frames, size, tuple(objects), lookalike, twins, naming, twin_motion)
            per_shard = math.ceil(count / SYNTHETIC_SHARDS)
            converter = {"name": DATASET, "version": GENERATOR_VERSION, "options": {**options, "videos_per_shard": per_shard}}
            manifests[split] = write_shards(records, dirs[split], DATASET, split, per_shard, total=count, converter=converter)
    return manifests


def _summary(manifest: Manifest, out_dir: Path) -> str:
    """One line: what was written, where, and how many videos were skipped."""
    line = (
        f"{manifest.dataset}/{manifest.split}: {manifest.videos} videos, {manifest.frames} frames, "
        f"{manifest.expressions} expressions, {manifest.objects} objects in {len(manifest.shards)} shards "
        f"({manifest.bytes / 1e6:.1f} MB) -> {out_dir}"
    )
    if manifest.no_target_expressions:
        line += f"; {manifest.no_target_expressions} expressions have no target (kept: empty masks)"
    if manifest.skipped:
        line += f"; skipped {len(manifest.skipped)} bad videos (listed in {out_dir / MANIFEST})"
    return line


def _fresh(out_dir: Path, split: str) -> Path:
    """``out_dir``, refused if it already holds shards of ``split`` (a new run would mix with them)."""
    old = sorted(out_dir.glob(f"{split}-*.tar"))
    if old:
        raise FileExistsError(f"{out_dir} already holds {len(old)} shards ({old[0].name}, ...); remove them or choose another --out")
    return out_dir


@contextmanager
def _removed_on_failure(out_dir: Path, split: str) -> Iterator[None]:
    """Delete the shards of a failed run (``_fresh`` made sure that none were there before), and the folders
    it created if they are empty then: a left-over empty ``OUT/<split>/`` looks like a prepared split.
    Folders that existed before, or hold anything else, are kept."""
    new = [d for d in [out_dir, *out_dir.parents] if not d.exists()]  # innermost first
    try:
        yield
    except BaseException:
        for path in out_dir.glob(f"{split}-*.tar"):
            path.unlink()
        for folder in new:
            try:
                folder.rmdir()  # only ever removes an empty folder
            except OSError:
                break
        raise


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value
