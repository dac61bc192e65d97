"""Evaluation videos split over ranks and loader workers, whatever the shard layout.

``glus prepare`` writes 50 videos per shard, so splitting evaluation by shard leaves all of MeViS valid_u
(50 videos, one shard) to one rank and one worker. Instead the videos themselves are split:

1. Index (``index_shards``): each shard's tar headers are read with random access (member names, data offsets
   and sizes, no member data) and grouped into videos as WebDataset groups them, plus each video's small
   ``meta.json`` for its frame and expression counts. This gives the global list of videos, in sorted shard
   order then tar order. A shard that is not whole (not whole tar blocks, a member cut short, no end-of-archive
   block) raises naming it, on every rank: a video silently missing from a benchmark makes the score wrong.
2. Split (``split_balanced``): videos go to ranks by their expected model time (frames x expressions), longest
   first, each to the least loaded rank (ties: the lower rank); then a rank's videos go to its workers the same
   way by frames (decoding time). Every video goes to exactly one (rank, worker), and with at least as many
   videos as ranks x workers of similar size, each gets some. The split only depends on the index, so every
   process computes the same one.
3. Read (``read_videos``): a worker reads the byte ranges of its own videos only (a seek per member) and yields
   them in global order.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby
from typing import Any, BinaryIO

from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

SKIP_META = re.compile(r"__[^/]*__($|/)")  # WebDataset's tar_file_iterator skips these members
FRAME_MEMBER = re.compile(r"f\d+\.jpg")


class ShardReadError(RuntimeError):
    """An evaluation shard cannot be read (whole); the message names it."""


@dataclass(frozen=True)
class ShardVideo:
    """Where one video's members lie in its shard, and its size (for balancing)."""

    url: str
    key: str
    members: tuple[tuple[str, int, int], ...]  # (suffix, data offset, size) in tar order
    num_frames: int
    num_expressions: int

    @property
    def cost(self) -> int:
        """Expected model time: each expression is tracked through every frame."""
        return max(self.num_frames, 1) * max(self.num_expressions, 1)

    def read(self, stream: BinaryIO) -> dict[str, Any]:
        """The WebDataset sample (``__key__``, ``__url__``, member bytes) read from its open shard."""
        sample: dict[str, Any] = {"__key__": self.key, "__url__": self.url}
        for suffix, offset, size in self.members:
            stream.seek(offset)
            data = stream.read(size)
            if len(data) != size:
                raise ShardReadError(f"evaluation shard {self.url} cannot be read: {self.key}.{suffix} is cut short")
            sample[suffix] = data
        return sample


def index_shard(url: str) -> list[ShardVideo]:
    """The videos of one shard, in tar order (see the module doc); ``ShardReadError`` names a shard that is not whole."""
    try:
        with open(url, "rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            if size % tarfile.BLOCKSIZE:
                raise ShardReadError(f"evaluation shard {url} cannot be read: {size} bytes is not whole tar blocks: truncated")
            with tarfile.open(fileobj=stream, mode="r:") as tar:
                members = tar.getmembers()
                end = tar.offset
            stream.seek(end)
            if stream.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
                raise ShardReadError(f"evaluation shard {url} cannot be read: no end-of-archive block after its last member: truncated")
            groups = _group_members(url, members, size)
            return [_video(url, key, group, stream) for key, group in groups]
    except (tarfile.TarError, OSError) as err:
        raise ShardReadError(f"evaluation shard {url} cannot be read: {err}") from err


def index_shards(urls: list[str]) -> list[ShardVideo]:
    """Every video of ``urls`` (read in the given order), in one list."""
    return [video for url in urls for video in index_shard(url)]


def _group_members(url: str, members: list[tarfile.TarInfo], size: int) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """Consecutive members of one key make a video, with WebDataset's rules (``tar_file_iterator``, ``group_by_keys``)."""
    groups: list[tuple[str, list[tuple[str, int, int]]]] = []
    for info in members:
        name = info.name
        if not info.isreg() or ("/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix)):
            continue
        if SKIP_META.match(name):
            continue
        prefix, suffix = base_plus_ext(name)
        if prefix is None:
            continue
        suffix = suffix.lower()
        if info.offset_data + info.size > size:
            raise ShardReadError(f"evaluation shard {url} cannot be read: member {name} is cut short: truncated")
        if not groups or groups[-1][0] != prefix:
            groups.append((prefix, []))
        if any(s == suffix for s, _, _ in groups[-1][1]):
            raise ShardReadError(f"evaluation shard {url} cannot be read: {name}: duplicate file name in tar file")
        groups[-1][1].append((suffix, info.offset_data, info.size))
    return groups


def _video(url: str, key: str, members: list[tuple[str, int, int]], stream: BinaryIO) -> ShardVideo:
    """A video's index entry; its counts come from ``meta.json`` when readable (else frame members and 1: a
    malformed video is reported by name when its owner parses it)."""
    frames = sum(1 for suffix, _, _ in members if FRAME_MEMBER.fullmatch(suffix))
    expressions = 1
    meta = next(((offset, size) for suffix, offset, size in members if suffix == "meta.json"), None)
    if meta is not None:
        stream.seek(meta[0])
        try:
            parsed = json.loads(stream.read(meta[1]))
            frames, expressions = len(parsed["frames"]), len(parsed["expressions"])
        except (ValueError, KeyError, TypeError):
            pass
    return ShardVideo(url, key, tuple(members), frames, expressions)


def split_balanced(costs: list[int], parts: int) -> list[list[int]]:
    """Indices of ``costs`` in ``parts`` groups of near-equal total: largest first to the least loaded group
    (ties: the lower group); each group sorted. Deterministic."""
    if parts < 1:
        raise ValueError(f"need at least one part, got {parts}")
    groups: list[list[int]] = [[] for _ in range(parts)]
    loads = [(0, part) for part in range(parts)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, part = heapq.heappop(loads)
        groups[part].append(index)
        heapq.heappush(loads, (load + costs[index], part))
    return [sorted(group) for group in groups]


def rank_share(videos: list[ShardVideo], rank: int, world_size: int) -> list[ShardVideo]:
    """This rank's videos, balanced by model time (frames x expressions), in global order."""
    return [videos[i] for i in split_balanced([v.cost for v in videos], world_size)[rank]]


def worker_share(videos: list[ShardVideo], worker: int, num_workers: int) -> list[ShardVideo]:
    """This worker's part of a rank's videos, balanced by frames (decoding time), in order."""
    return [videos[i] for i in split_balanced([max(v.num_frames, 1) for v in videos], num_workers)[worker]]


def read_videos(videos: list[ShardVideo]) -> Iterator[dict[str, Any]]:
    """The samples of ``videos`` in order, reading only their members; a shard is opened once per run of its videos."""
    for url, run in groupby(videos, key=lambda video: video.url):
        try:
            with open(url, "rb") as stream:
                for video in run:
                    yield video.read(stream)
        except OSError as err:
            raise ShardReadError(f"evaluation shard {url} cannot be read: {err}") from err
