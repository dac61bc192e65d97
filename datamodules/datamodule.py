"""``RefVOSDataModule``: WebDataset shards of videos -> GLUS samples -> ``RefVOSBatch``.

Training: each dataset of ``data.train`` is an endless stream of videos from its shards, drawn
with replacement, and the streams are mixed by weight (GLUS-S MeViS : Ref-YouTube-VOS = 1 : 1).
Each video is planned (``sampling.plan_train``, which also rejects unusable videos), held in a
shuffle buffer with only its planned frames' bytes, then decoded. Every rank and worker draws its
own stream from seeds derived from ``(data.seed, rank, worker, epoch)``: runs are reproducible,
workers do not repeat each other, and resampling takes the place of splitting shards, so any shard
count serves any number of ranks and workers. An epoch is ``data.samples_per_epoch`` videos over
all ranks, rounded up so that every worker gives whole batches and every rank whole gradient-accumulation
cycles (an optimiser step never straddles two epochs). The loader's position in the stream (pass number,
batches handed out) is kept in the checkpoint (``EpochLoader.state_dict``): a run resumed mid-epoch skips,
in each worker, the planned videos it had already given, before decoding them, and goes on with the very
batches the uninterrupted run would have drawn next.

Validation/test: the videos of ``data.val`` (whatever their number of shards, one shard included)
are split by video over ranks, then workers, balanced by size (``eval_split``: an index of the tar
headers, then each worker reads only its own videos' bytes), so every video appears exactly once
over all ranks and workers; a batch is one whole video (every frame a query) with all its
expressions. Its targets are the per-object RLE of the video (``targets.ObjectTargets``): the dense
``[T, H, W]`` target of an expression is decoded when it is scored, one at a time, so a sample's
memory does not grow with its expressions.

With ``data.synthetic`` set, ``prepare_data`` generates the built-in dataset under ``data.root``
when its shards are missing.

Corrupt data at training time (an unreadable shard, a malformed record, an undecodable frame, a
video too short for a sample) is skipped, logged with its url and key, and counted in
``skipped``; a dataset none of whose shards gives a usable video raises (frames are only decoded
after the shuffle buffer, so undecodable frames are counted but do not enter that check). At
evaluation corrupt data raises: a video silently missing from a benchmark would make the score wrong.

Before any shard is read, the manifest of each split matched (``manifest.json`` beside the shards) must
record a shard format this code reads (``datamodules.shards.check_shard_format``): a split prepared by a
version with another format raises ``ShardFormatError`` saying how to re-prepare it; a manifest written
before manifests recorded a format is format 1, read as before.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from datamodules.batch import RefVOSBatch
from datamodules.eval_split import index_shards, rank_share, read_videos, worker_share
from datamodules.prepare import prepare_synthetic
from datamodules.records import RecordError, VideoRecord
from datamodules.sampling import (
    SamplePlan,
    VideoSample,
    build_sample,
    check_expression_sampling,
    keep_planned_frames,
    plan_eval,
    plan_train,
)
from datamodules.shards import MANIFEST, Manifest, check_shard_format
from datamodules.synthetic import BEFORE_OPTIONS, SPLIT_STREAMS
from datamodules.targets import Targets
from glus_lightning.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

SKIP_KINDS = ("shards", "samples")


def resolve_shards(root: str, pattern: str) -> list[str]:
    """Sorted files matched by a brace pattern and/or glob, relative to ``root`` unless absolute.

    Their splits' manifests are checked first (``shards.check_shard_format``): shards of a format this code does not
    read raise ``ShardFormatError`` naming the manifest, instead of being misread.
    """
    full = pattern if os.path.isabs(pattern) else os.path.join(root, pattern)
    paths = sorted({path for expanded in braceexpand(full) for path in glob.glob(expanded)})
    if not paths:
        raise FileNotFoundError(f"shard pattern {pattern!r} (under data.root {root!r}) matches no file: looked for {full!r}")
    check_shard_format(paths)
    return paths


def shard_samples(url: str, handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__``, ``__url__``, member bytes) of one local shard; the file closes even if left early.

    ``handler`` sees read errors: True goes on with what can still be read, False or raising stops.
    A tar is whole 512-byte blocks; other sizes are flagged as truncated, since ``tarfile`` takes a
    cut inside a header for the end of the archive and would lose the rest silently.
    """
    with open(url, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        if size % tarfile.BLOCKSIZE and not handler(tarfile.ReadError(f"{url}: {size} bytes is not whole tar blocks: truncated")):
            return
        members = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        yield from wds.tariterators.group_by_keys(members, handler=handler)


class SkipCounter:
    """Skipped shards and samples per worker, in shared memory so the main process can sum them."""

    def __init__(self, num_workers: int) -> None:
        self.counts = torch.zeros(max(num_workers, 1), len(SKIP_KINDS), dtype=torch.long).share_memory_()

    def add(self, kind: str, where: str, err: BaseException) -> None:
        self.counts[_worker()[0], SKIP_KINDS.index(kind)] += 1
        log.warning("skipped a corrupt %s at %s: %s", kind[:-1], where, err)

    def totals(self) -> dict[str, int]:
        return dict(zip(SKIP_KINDS, self.counts.sum(0).tolist()))


@dataclass(frozen=True)
class Source:
    name: str
    urls: list[str]
    weight: float


class TrainStream(IterableDataset):
    """Endless, weighted mix of the training datasets, cut to this rank's share of an epoch."""

    def __init__(self, sources: list[Source], cfg: DataConfig, rank: int, world_size: int, skipped: SkipCounter,
                 accumulate_grad_batches: int = 1) -> None:
        super().__init__()
        self.sources = sources
        self.cfg = cfg
        self.rank = rank
        self.skipped = skipped
        self.epoch = 0
        self.start = 0  # batches of this pass already consumed (a resumed pass), set by the loader
        self.num_workers = max(cfg.num_workers, 1)
        batches = rank_batches(cfg.samples_per_epoch, cfg.batch_size, world_size, self.num_workers, accumulate_grad_batches)
        self.per_worker = batches // self.num_workers * cfg.batch_size

    def __len__(self) -> int:
        return self.per_worker * self.num_workers

    def __iter__(self) -> Iterator[VideoSample]:
        # Not a generator: the seeds are fixed when the pass starts, from the epoch set by the loader.
        stream, done = self._resumed_stream(_worker()[0])
        mix_rng, plan_rng, shuffle_rng, *shard_rngs = derived_rngs(self.cfg.seed, self.rank, stream, self.epoch, 3 + len(self.sources))
        streams = [self._planned(source, rng, plan_rng) for source, rng in zip(self.sources, shard_rngs)]
        weights = [source.weight for source in self.sources]
        mixed = (next(mix_rng.choices(streams, weights)[0]) for _ in count())
        buffer = self.cfg.shuffle_buffer
        shuffled = wds.shuffle(buffer, initial=buffer, rng=shuffle_rng)(mixed)
        # consumed samples are skipped as planned videos (shards read, plans drawn, frames not decoded)
        return islice(self._built(islice(shuffled, done, None)), self.per_worker - done)

    def _resumed_stream(self, worker: int) -> tuple[int, int]:
        """Which worker stream this worker continues, and how many of its samples were consumed, ``start`` batches in.

        The DataLoader takes batch i from worker i % W. A resumed pass starts asking at worker 0, while the next
        batch (``start``) came from stream ``start % W``: worker j continues stream ``(start + j) % W``, which had
        given every W-th of the first ``start`` batches.
        """
        workers = self.num_workers
        stream = (worker + self.start) % workers
        return stream, (self.start - stream + workers - 1) // workers * self.cfg.batch_size

    def _planned(self, source: Source, rng: random.Random, plan_rng: random.Random) -> Iterator[tuple[str, VideoRecord, SamplePlan]]:
        """One dataset's videos with their sample plans, from shards drawn with replacement."""
        cfg = self.cfg
        unusable: set[str] = set()
        while True:
            url = rng.choice(source.urls)
            usable = 0
            for raw in self._read_shard(url):
                where = f"{url}:{raw.get('__key__')}"
                try:
                    record = VideoRecord.from_sample(raw)
                    plan = plan_train(record, cfg.num_context, cfg.num_query, cfg.max_expressions, plan_rng,
                                      cfg.expression_sampling)
                except RecordError as err:
                    self.skipped.add("samples", where, err)
                    continue
                usable += 1
                yield where, keep_planned_frames(record, plan), plan
            if usable:
                unusable.discard(url)
                continue
            unusable.add(url)
            if len(unusable) == len(source.urls):
                raise RuntimeError(
                    f"training dataset {source.name!r}: none of its {len(source.urls)} shards gives a usable video "
                    f"(see the warnings above); shards: {', '.join(source.urls)}"
                )

    def _read_shard(self, url: str) -> Iterator[dict[str, Any]]:
        """Raw samples of one shard; a read error ends the shard and is counted once for it."""
        errors: list[Exception] = []
        try:
            yield from shard_samples(url, handler=lambda err: errors.append(err) or True)
        except OSError as err:
            errors.append(err)
        if errors:
            self.skipped.add("shards", url, errors[0])

    def _built(self, planned: Iterator[tuple[str, VideoRecord, SamplePlan]]) -> Iterator[VideoSample]:
        for where, record, plan in planned:
            try:
                yield build_sample(record, plan, self.cfg.image_size)
            except RecordError as err:
                self.skipped.add("samples", where, err)


class EvalStream(IterableDataset):
    """Every video of the evaluation shards once, split by video over ranks, then workers (``eval_split``).

    The shards are indexed here, in the rank's main process (tar headers and each video's ``meta.json``; an
    unreadable shard raises naming it); a worker reads and decodes only its own videos. Samples carry per-object
    RLE targets (``ObjectTargets``), decoded one expression at a time when scored.
    """

    def __init__(self, urls: list[str], cfg: DataConfig, rank: int, world_size: int) -> None:
        super().__init__()
        self.urls = urls
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.videos = rank_share(index_shards(urls), rank, world_size)
        # no __len__: a rank with no video (fewer videos than ranks) must still run the validation loop, whose epoch
        # end gathers the metric from every rank; Lightning skips the loop of a loader whose length is 0

    def __iter__(self) -> Iterator[VideoSample]:
        worker, num_workers = _worker()
        for raw in read_videos(worker_share(self.videos, worker, num_workers)):
            record = VideoRecord.from_sample(raw)
            yield build_sample(record, plan_eval(record, self.cfg.num_context), self.cfg.image_size, lazy_targets=True)


class EpochLoader:
    """The training loader: a DataLoader over the stream that numbers each pass, so every epoch of the stream draws
    new, reproducible samples, and that can resume a pass in its middle.

    Its ``state_dict`` (the pass number and how many batches it has handed out in it) is saved by Lightning in the
    checkpoint's loop state and given back through ``load_state_dict`` before the resumed run's first ``iter``: that
    pass is then continued where it stopped (``TrainStream._resumed_stream``), on every rank and worker, since every
    rank hands out the same number of batches. Lightning takes no batch ahead from a loader with a length, so the
    batches handed out are the batches trained on. The position is set before the workers start (they copy the
    dataset), hence non-persistent workers.

    Not itself a DataLoader: its length is exact (``TrainStream`` splits each rank's share over its workers), which
    Lightning cannot know of a DataLoader over an ``IterableDataset`` and would warn about.
    """

    def __init__(self, dataset: TrainStream, next_epoch: Callable[[], int], **kwargs: Any) -> None:
        self.stream = dataset
        self.loader = DataLoader(dataset, persistent_workers=False, **kwargs)
        self.next_epoch = next_epoch
        self.position = (0, 0)  # (pass, batches handed out in it)
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[RefVOSBatch]:
        """A generator: the pass starts at its first batch, not at ``iter`` (Lightning calls ``iter`` on a loader that
        is not a DataLoader to check it, which must not use up a pass)."""
        epoch, start = self._resume if self._resume is not None else (self.next_epoch(), 0)
        self._resume = None
        if start >= len(self):  # a checkpoint at the pass's last batch: Lightning goes on with the next pass
            epoch, start = epoch + 1, 0
        self.stream.epoch, self.stream.start = epoch, start
        self.position = (epoch, start)
        for batch in self.loader:
            self.position = (self.position[0], self.position[1] + 1)
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.position[0], "batches": self.position[1]}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))


def collate(samples: list[VideoSample]) -> RefVOSBatch:
    """Stack videos into a ``RefVOSBatch``; expressions of all videos are flattened, each tagged with its video.

    ``default_collate`` stacks the frames straight into shared memory in a worker (one copy less on the way out).
    """
    return RefVOSBatch(
        frames=default_collate([s.frames for s in samples]),
        num_context=len(samples[0].plan.context),
        frame_indices=torch.tensor([s.plan.context + s.plan.query for s in samples], dtype=torch.long),
        expressions=[e.text for s in samples for e in s.plan.expressions],
        expression_ids=[e.exp_id for s in samples for e in s.plan.expressions],
        expression_video=torch.tensor([b for b, s in enumerate(samples) for _ in s.plan.expressions], dtype=torch.long),
        expression_objects=[e.obj_ids for s in samples for e in s.plan.expressions],
        targets=Targets.cat([s.targets for s in samples]),
        video_ids=[s.video for s in samples],
        datasets=[s.dataset for s in samples],
        video_objects=[s.object_ids for s in samples],
        frame_names=[s.query_frame_names for s in samples],
        video_sizes=[s.targets.size(0) for s in samples],  # every sample has an expression; targets are at full size
    )


def rank_batches(samples_per_epoch: int, batch_size: int, world_size: int, num_workers: int, accumulate_grad_batches: int) -> int:
    """Batches per rank in an epoch of ``samples_per_epoch`` videos over all ranks, rounded up to a whole number of
    batches per worker and of accumulation cycles: Lightning steps the optimiser on an epoch's last batch even in an
    unfinished cycle, which would make batches stop counting optimiser steps (validation runs every
    ``val_every_n_steps * accumulate_grad_batches`` batches)."""
    unit = math.lcm(max(num_workers, 1), accumulate_grad_batches)
    return unit * math.ceil(samples_per_epoch / (world_size * batch_size * unit))


def derived_rngs(seed: int, rank: int, worker: int, epoch: int, n: int) -> list[random.Random]:
    """``n`` independent generators for one (rank, worker, epoch) of a run seeded with ``seed``."""
    children = np.random.SeedSequence([seed, rank, worker, epoch]).spawn(n)
    return [random.Random(int(child.generate_state(1, np.uint64)[0])) for child in children]


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class RefVOSDataModule(LightningDataModule):
    """Training, validation and test loaders of RefVOS shards as configured by ``data`` (see module doc)."""

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__()
        check_expression_sampling(cfg.expression_sampling)
        self.cfg = cfg
        self._skipped = SkipCounter(cfg.num_workers)
        self._epoch = 0

    def prepare_data(self) -> None:
        """Generate the built-in synthetic dataset under ``data.root`` when ``data.synthetic`` is set and shards are missing."""
        cfg = self.cfg
        if cfg.synthetic is None:
            return
        syn = cfg.synthetic
        if all(_matches_any(cfg.root, entry.shards) for entry in [*cfg.train, *cfg.val]):
            _check_synthetic(Path(cfg.root), {"objects": list(syn.objects), "lookalike": syn.lookalike, "twins": syn.twins,
                                              "naming": syn.naming, "twin_motion": syn.twin_motion})
            return
        log.info("generating the synthetic dataset under %s", cfg.root)
        prepare_synthetic(Path(cfg.root), seed=syn.seed, num_train=syn.num_train, num_val=syn.num_val, frames=syn.frames, size=syn.size,
                          objects=tuple(syn.objects), lookalike=syn.lookalike, twins=syn.twins, naming=syn.naming,
                          twin_motion=syn.twin_motion)

    @property
    def skipped(self) -> dict[str, int]:
        """Corrupt shards and samples skipped so far by this rank's training workers."""
        return self._skipped.totals()

    def train_dataloader(self) -> DataLoader:
        cfg = self.cfg
        if not cfg.train:
            raise ValueError("data.train lists no dataset to train on")
        sources = []
        for i, entry in enumerate(cfg.train):
            if not entry.weight > 0:
                raise ValueError(f"data.train[{i}] ({entry.name}): weight must be > 0, got {entry.weight}")
            sources.append(Source(entry.name, resolve_shards(cfg.root, entry.shards), float(entry.weight)))
        # the trainer's accumulation, so that an epoch is whole optimiser steps (1 without a trainer)
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        stream = TrainStream(sources, cfg, *_rank_and_world(), self._skipped, accumulate)
        return EpochLoader(stream, self._next_epoch, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._epoch = int(state_dict["epoch"])

    def _next_epoch(self) -> int:
        self._epoch += 1
        return self._epoch - 1

    def _eval_loader(self) -> DataLoader:
        cfg = self.cfg
        if not cfg.val:
            raise ValueError("data.val lists no dataset to evaluate on")
        urls = sorted({url for entry in cfg.val for url in resolve_shards(cfg.root, entry.shards)})
        stream = EvalStream(urls, cfg, *_rank_and_world())
        return DataLoader(stream, batch_size=1, num_workers=cfg.num_workers, collate_fn=collate)


def _check_synthetic(root: Path, wanted: dict) -> None:
    """Raise ConfigError when the synthetic shards under ``root`` show other scenes than ``data.synthetic`` asks for
    (``wanted``: objects, lookalike, twins, naming, twin_motion), rather than silently training on data the config does not describe. Counts, sizes
    and seed may differ: shards prepared by ``glus prepare synthetic`` with their own are used as they are."""
    for split in SPLIT_STREAMS:
        if not (root / split / MANIFEST).is_file():
            continue
        converter = Manifest.load(root / split).converter
        if converter is None or "options" not in converter:  # written before manifests recorded how: nothing to compare
            continue
        made = {**BEFORE_OPTIONS, **converter["options"]}
        differ = {key: made.get(key) for key, value in wanted.items() if made.get(key) != value}
        if differ:
            raise ConfigError(
                f"{root / split}: the synthetic dataset there was generated with {differ}, but data.synthetic asks for "
                f"{ {key: wanted[key] for key in differ} }; delete {root} to regenerate it, or set data.root to another folder"
            )


def _matches_any(root: str, pattern: str) -> bool:
    try:
        return bool(resolve_shards(root, pattern))
    except FileNotFoundError:
        return False


def _rank_and_world() -> tuple[int, int]:
    """Rank and world size, read in the main process (``RANK``/``WORLD_SIZE`` or torch.distributed)."""
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    return rank, world_size
