"""Memory of one evaluation sample in a loader worker: every expression's dense target (before) vs per-object RLE (now).

    python experiments/benchmarks/eval_memory.py [--frames 80 --height 720 --width 1280 --expressions 20
                                                  --objects 8 --image-size 1024 --workers 4 --prefetch 2]

Data: one MeViS-size video generated here (``--frames`` JPEG frames at ``--height`` x ``--width``, ``--objects``
irregular blobs that move, grow and shrink, some entering late or leaving early; ``--expressions`` expressions
referring to one, two or three objects, as MeViS's multi-object expressions do), written to a temporary shard by
the real writer (``write_shards``).

Each row runs in its own process, as a loader worker would, and builds the evaluation sample of that video
(every frame a query, every expression, frames squashed to ``--image-size``):

- dense (before): the former evaluation path, reconstructed here: the shard read sequentially, every frame
  decoded into a dict then stacked, and every expression's ``[T, H, W]`` union target materialised (through
  ``VideoRecord.expression_mask``, whose per-(object, frame) cache holds each decoded object mask).
- RLE (now): ``EvalStream`` (its index built beforehand, as in the rank's main process), which reads only the
  video's members, squashes each frame into its row of the output, and keeps the per-object RLE
  (``ObjectTargets``).

Reported per row: the bytes the sample holds (frames, targets: what goes through shared memory to the main
process, ``--prefetch`` samples ahead per worker), the peak resident memory above the start while building it,
what stays resident after it, and the peak above that while building one expression's target for scoring
(``expression_target(e)`` then ``.bool()``, as ``GLUSModule._evaluate_video`` does; the dense row's target is
already there, only the bool copy is new). Memory is the process's resident set: its high-water mark (VmHWM) is
reset through ``/proc/self/clear_refs`` before each span, after ``malloc_trim`` has handed freed heap memory back
(glibc's mmap threshold is fixed at 1 MiB, so large arrays are returned when freed anyway).
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MIB = 2**20


# ------------------------------------------------------------------------------------------------ data


def generated_video(frames: int, height: int, width: int, num_objects: int, num_expressions: int, seed: int = 0):
    """A MeViS-size video: textured background, irregular moving blobs, multi-object expressions."""
    from PIL import Image

    from datamodules.records import Expression, VideoRecord, encode_rle

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    colours = rng.uniform(40, 215, size=(2, 3)).astype(np.float32)
    ramp = (xx / width + yy / height)[..., None] / 2
    texture = 12 * np.sin(xx / rng.uniform(20, 60))[..., None] * np.cos(yy / rng.uniform(20, 60))[..., None]
    background = colours[0] * (1 - ramp) + colours[1] * ramp + texture
    objects = []
    for _ in range(num_objects):
        radius = rng.uniform(0.05, 0.18) * height
        start = rng.uniform([radius, radius], [width - radius, height - radius])
        end = rng.uniform([radius, radius], [width - radius, height - radius])
        first = 0 if rng.random() < 0.6 else int(rng.integers(0, frames // 2))  # some enter late, some leave early
        last = frames if rng.random() < 0.6 else int(rng.integers(first + max(frames // 4, 1), frames + 1))
        objects.append((radius, start, end, rng.uniform(1.0, 2.0), rng.uniform(0, 2 * np.pi, size=3),
                        rng.uniform(0, 255, size=3).astype(np.float32), first, last))
    jpegs, masks = [], {i: [] for i in range(1, num_objects + 1)}
    for t in range(frames):
        image = background + rng.normal(0, 3, size=(height, width, 1)).astype(np.float32)
        for obj_id, (radius, start, end, aspect, phase, colour, first, last) in enumerate(objects, start=1):
            if not first <= t < last:
                masks[obj_id].append(None)
                continue
            cx, cy = start + (end - start) * t / max(frames - 1, 1)
            r = radius * (1 + 0.2 * np.sin(2 * np.pi * t / frames + phase[0]))
            x0, x1 = int(max(cx - 2 * aspect * r, 0)), int(min(cx + 2 * aspect * r + 1, width))
            y0, y1 = int(max(cy - 2 * r, 0)), int(min(cy + 2 * r + 1, height))
            dx, dy = (xx[y0:y1, x0:x1] - cx) / aspect, yy[y0:y1, x0:x1] - cy
            theta = np.arctan2(dy, dx)
            wobble = 1 + 0.15 * np.sin(5 * theta + phase[1] + 0.1 * t) + 0.08 * np.sin(11 * theta + phase[2])
            inside = np.hypot(dx, dy) < r * wobble  # an irregular outline: several runs per column, like real masks
            mask = np.zeros((height, width), dtype=np.uint8)
            mask[y0:y1, x0:x1] = inside
            image[mask.astype(bool)] = colour
            masks[obj_id].append(encode_rle(mask))
        buf = io.BytesIO()
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    ids = list(range(1, num_objects + 1))
    expressions = []
    for e in range(num_expressions):
        size = 1 if e % 5 < 2 else 2 if e % 5 < 4 else 3  # 40% one object, 40% two, 20% three
        chosen = tuple(sorted(int(i) for i in rng.choice(ids, size=min(size, len(ids)), replace=False)))
        expressions.append(Expression(str(e), f"expression {e}", chosen))
    return VideoRecord(
        dataset="mevis", video="bench", frame_names=[f"{t:05d}" for t in range(frames)], height=height, width=width,
        expressions=expressions, frames=jpegs, masks=masks,
    )


# ------------------------------------------------------------------------------------------ measuring


class Meter:
    """Resident memory of this process and its high-water mark since the last ``reset``."""

    def __init__(self) -> None:
        import resource

        self.page = resource.getpagesize()
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: large arrays are mmapped, and returned when freed
        self.libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD

    def current(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def high_water(self) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/self/status")

    def reset(self) -> int:
        """Start a span: freed heap memory goes back to the system first (else a span could reuse it unseen)."""
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self.current()


def old_sample(url: str, num_context: int, image_size: int):
    """The former evaluation sample: sequential read, frames decoded into a dict then stacked, dense targets."""
    import torch
    import webdataset as wds

    from datamodules.datamodule import shard_samples
    from datamodules.records import VideoRecord
    from datamodules.sampling import VideoSample, plan_eval, squash
    from datamodules.targets import DenseTargets

    raw = next(shard_samples(url, handler=wds.reraise_exception))
    record = VideoRecord.from_sample(raw)
    plan = plan_eval(record, num_context)
    masks = [torch.from_numpy(np.stack([record.expression_mask(e, i) for i in plan.query])) for e in plan.expressions]
    indices = plan.context + plan.query
    decoded = {index: squash(record.decode_frame(index), image_size) for index in dict.fromkeys(indices)}
    frames = torch.stack([decoded[i] for i in indices])
    return VideoSample(record.dataset, record.video, tuple(record.object_ids), plan,
                       [record.frame_names[i] for i in plan.query], frames, DenseTargets(masks))


def new_sample_stream(url: str, num_context: int, image_size: int):
    """``EvalStream`` over the one shard (its index is built here, as in the rank's main process)."""
    from omegaconf import OmegaConf

    from datamodules.datamodule import EvalStream
    from glus_lightning.config import DataConfig

    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig),
                          {"num_context": num_context, "image_size": image_size, "synthetic": None, "train": [], "val": []})
    return EvalStream([url], cfg, rank=0, world_size=1)


def measure(kind: str, url: str, num_context: int, image_size: int) -> dict:
    """One row, in this (fresh) process."""
    meter = Meter()
    import pickle

    import torch

    torch.set_num_threads(1)
    import datamodules.datamodule  # noqa: F401  (every import before the spans: they are not the sample's memory)
    from datamodules.targets import DenseTargets

    stream = new_sample_stream(url, num_context, image_size) if kind == "rle" else None
    start = meter.reset()
    t0 = time.perf_counter()
    sample = next(iter(stream)) if stream is not None else old_sample(url, num_context, image_size)
    seconds = time.perf_counter() - t0
    build_peak = meter.high_water() - start
    frames_bytes = sample.frames.numel() * sample.frames.element_size()
    targets = sample.targets
    if isinstance(targets, DenseTargets):
        targets_bytes = sum(m.numel() * m.element_size() for m in targets.masks)
    else:
        targets_bytes = len(pickle.dumps(targets))
    sizes = [len(e.obj_ids) for e in sample.plan.expressions]
    e = int(np.argmax(sizes))  # the expression with the most objects: the most to decode
    held = meter.reset()  # what the worker holds until the sample is sent
    t1 = time.perf_counter()
    target = targets.expression_target(e).bool()
    score_seconds = time.perf_counter() - t1
    score_peak = meter.high_water() - held
    return {
        "kind": kind, "frames_bytes": frames_bytes, "targets_bytes": targets_bytes, "build_peak": build_peak,
        "held": held - start,
        "build_seconds": seconds, "score_peak": score_peak, "score_seconds": score_seconds,
        "target_bytes": target.numel() * target.element_size(), "expressions": len(sizes),
    }


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=80)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--objects", type=int, default=8)
    parser.add_argument("--expressions", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=1024, help="frames squashed to the SAM2 size (default 1024)")
    parser.add_argument("--num-context", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4, help="loader workers per rank (data.num_workers)")
    parser.add_argument("--prefetch", type=int, default=2, help="samples ahead per worker (DataLoader prefetch_factor)")
    parser.add_argument("--measure", choices=["dense", "rle"], help=argparse.SUPPRESS)
    parser.add_argument("--shard", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.shard, args.num_context, args.image_size)))
        return

    from datamodules.shards import write_shards

    with tempfile.TemporaryDirectory() as tmp:
        record = generated_video(args.frames, args.height, args.width, args.objects, args.expressions)
        manifest = write_shards([record], Path(tmp), "mevis", "valid_u", videos_per_shard=50)
        shard = str(Path(tmp) / manifest.shards[0])
        rle_kb = len(json.dumps({str(k): v for k, v in record.masks.items()})) / 1024
        rows = []
        for kind in ("dense", "rle"):
            out = subprocess.run([sys.executable, __file__, "--measure", kind, "--shard", shard, "--num-context",
                                  str(args.num_context), "--image-size", str(args.image_size)],
                                 check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"video: {args.frames} frames {args.height}x{args.width}, {args.objects} objects "
          f"(masks.json {rle_kb:.0f} KiB), {args.expressions} expressions; frames squashed to {args.image_size}; "
          f"one target [T, H, W] uint8 = {args.frames * args.height * args.width / MIB:.1f} MiB")
    header = ("targets", "frames MiB", "targets MiB", "sample MiB", f"x{args.workers}w x{args.prefetch} GiB",
              "build peak MiB", "held MiB", "build s", "score 1 expr peak MiB", "score s")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        sample = row["frames_bytes"] + row["targets_bytes"]
        cells = [
            "dense, every expression (before)" if row["kind"] == "dense" else "per-object RLE (now)",
            f"{row['frames_bytes'] / MIB:.0f}", f"{row['targets_bytes'] / MIB:.2f}", f"{sample / MIB:.0f}",
            f"{args.workers * args.prefetch * sample / 2**30:.2f}", f"{row['build_peak'] / MIB:.0f}", f"{row['held'] / MIB:.0f}",
            f"{row['build_seconds']:.1f}", f"{row['score_peak'] / MIB:.0f}", f"{row['score_seconds']:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
