"""``glus predict``: masks, overlays and a JSON summary for videos, or an official-server submission."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from datamodules.datamodule import resolve_shards
from datamodules.records import Expression
from glus_lightning.config import ConfigError, compose_or_report, to_yaml
from glus_lightning.inference.predictor import load_module, stream_masks
from glus_lightning.inference.sources import Video, read_input
from glus_lightning.inference.submission import SUBMISSION_FORMATS, rank_and_world, write_submission, write_zip
from glus_lightning.inference.writers import OVERLAY_KINDS, OverlayWriter, read_mask, write_masks
from glus_lightning.module import GLUSModule

SUMMARY_FILE = "summary.json"
LOG_FILE = "predict.log"  # one line per video under --out: what was printed, for runs without a terminal


def configure_predict_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. ckpt_path=... inference.window=8")
    parser.add_argument("--input", help="a folder of frames, a video file, or a .tar shard; with --submission a shard "
                        "pattern under data.root (default: the data.val shards)")
    parser.add_argument("--expression", action="append", default=[], help="what to segment (repeatable); "
                        "default for a shard: its own expressions")
    parser.add_argument("--out", default="predictions", help="output folder")
    parser.add_argument("--submission", choices=SUBMISSION_FORMATS, help="write Annotations/<video>/<exp_id>/<frame>.png "
                        "for every expression of the shards (resumable; split by --rank/--world-size)")
    parser.add_argument("--rank", type=int, default=None, help="this process's share of a submission (default $RANK or 0)")
    parser.add_argument("--world-size", type=int, default=None, help="processes sharing a submission (default $WORLD_SIZE or 1)")
    parser.add_argument("--zip", action="store_true", help="with --submission: zip the finished Annotations tree")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _check_overlay(cfg: DictConfig) -> None:
    if cfg.inference.overlay not in OVERLAY_KINDS:
        raise ConfigError(f"inference.overlay={cfg.inference.overlay!r}; valid: {', '.join(OVERLAY_KINDS)}")


def run_predict(args: argparse.Namespace) -> int:
    cfg = compose_or_report("predict", args.overrides, _check_overlay)
    if cfg is None:
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    try:
        return _predict(cfg, args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:  # bad input: say which, no traceback
        print(f"glus predict: {err}", file=sys.stderr)
        return 2


def _predict(cfg: DictConfig, args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.submission:
        rank, world_size = rank_and_world(args.rank, args.world_size)
        patterns = [args.input] if args.input else [source.shards for source in cfg.data.val]
        urls = [url for pattern in patterns for url in resolve_shards(cfg.data.root, pattern)]
        stats = write_submission(lambda: load_module(cfg, _device(rank)), urls, out, rank, world_size)
        print(f"rank {rank}/{world_size}: wrote {stats.written} expressions, skipped {stats.skipped} already done, "
              f"{stats.other_ranks} left to other ranks -> {out / 'Annotations'}")
        if args.zip:
            print(f"submission: {write_zip(out, urls, args.submission)}")
        return 0
    if not args.input:
        print("glus predict: --input is required (or --submission)", file=sys.stderr)
        return 2
    module = load_module(cfg, _device(0))
    for video in read_input(args.input):
        summary = predict_to_folder(module, video, args.expression, out / video.name, source=str(args.input))
        line = (f"{video.name}: {summary['num_frames']} frames x {len(summary['expressions'])} expressions in "
                f"{summary['seconds']:.2f} s ({summary['frames_per_second']:.2f} frames/s), peak memory "
                f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB ({summary['peak_memory_kind']}) -> {out / video.name}")
        print(line)
        with (out / LOG_FILE).open("a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {line}\n")
    return 0


def predict_to_folder(module: GLUSModule, video: Video, texts: list[str], out: Path, source: str) -> dict[str, Any]:
    """``masks/<exp_id>/<frame>.png`` (0/255, original size), ``overlay.gif|mp4`` and ``summary.json`` under ``out``."""
    expressions = [Expression(str(i), text, ()) for i, text in enumerate(texts)] if texts else video.expressions
    if not expressions:
        raise ValueError(f"{source}: video {video.name!r} has no expressions of its own; pass --expression TEXT")
    cfg: DictConfig = module.cfg
    if module.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(module.device)
    frames_with_object = [0] * len(expressions)
    area = [0.0] * len(expressions)
    start = time.perf_counter()
    # each chunk's masks are written as soon as they are final: nothing per frame is kept (a long video's memory is a short one's)
    with tqdm(total=len(video.frames), desc=video.name, unit="frame", file=sys.stderr, disable=None) as bar:
        for e, frame_ids, masks in stream_masks(module, video, expressions, bar.update):
            write_masks(out / "masks" / expressions[e].exp_id, [video.frame_names[i] for i in frame_ids], masks)
            frames_with_object[e] += int(masks.any(axis=(1, 2)).sum())
            area[e] += float(masks.mean(axis=(1, 2)).sum())
    seconds = time.perf_counter() - start  # segmentation and its masks written
    peak, peak_kind = _peak_memory(module.device)
    overlay = None
    if cfg.inference.overlay != "none":  # from the written masks, frame by frame
        overlay = f"overlay.{cfg.inference.overlay}"
        writer = OverlayWriter(out / overlay, cfg.inference.overlay_fps, cfg.inference.overlay_alpha, [e.text for e in expressions])
        for t, name in enumerate(video.frame_names):
            writer.add([video.frames[t]], [read_mask(out / "masks" / e.exp_id / f"{name}.png")[None] for e in expressions])
        writer.close()
    height, width = video.size
    summary = {
        "source": source,
        "video": video.name,
        "num_frames": len(video.frames),
        "height": height,
        "width": width,
        "frame_names": video.frame_names,
        "expressions": [
            {
                "exp_id": expression.exp_id,
                "text": expression.text,
                "masks": f"masks/{expression.exp_id}",
                "frames_with_object": frames_with_object[e],
                "mean_area": area[e] / len(video.frames),  # fraction of the frame's pixels
            }
            for e, expression in enumerate(expressions)
        ],
        "overlay": overlay,
        "seconds": seconds,
        "frames_per_second": len(video.frames) / seconds,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "window": cfg.inference.window,
        "kv_cache": cfg.inference.kv_cache,
        "keyframes": cfg.inference.keyframes,
        "ckpt_path": cfg.ckpt_path,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak bytes of this video on a GPU (tensor memory, as the allocator counts it); on the CPU the process's peak
    resident memory so far (the operating system's count, this video or an earlier one, whichever was larger)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "GPU tensors"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def _device(rank: int) -> torch.device:
    """The GPU of this process (``LOCAL_RANK``, else ``rank``) when there is one, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
