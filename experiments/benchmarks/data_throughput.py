"""Training-data throughput: the shard pipeline (``RefVOSDataModule``) against the reference way of reading MeViS.

    python experiments/benchmarks/data_throughput.py [--videos 100 --frames 32 --height 720 --width 1280
                                                      --seconds 30 --workers 2]

Data: ``--videos`` generated videos (moving shapes on a textured background, 2-4 objects, one
expression per object plus a two-object one) at ``--height`` x ``--width``, written in the official
MeViS layout (``datamodules.synthetic.write_mevis_layout``) and converted to shards by the real
converter (``prepare_official("mevis", ...)``), all in a temporary directory. Sampling is GLUS-S's
(``conf/data/glus_s.yaml`` through ``compose``: C context, Q query frames, up to N expressions,
frames squashed to the SAM2 size S, micro-batch of 2 videos), collated to the same ``RefVOSBatch``.

Pipelines, each a DataLoader with ``--workers`` workers:

- reference (the baseline): a map-style Dataset over ``JPEGImages/<video>/<frame>.jpg`` with ONE
  ``mask_dict.json``. Like the reference code, the JSON is loaded once in ``__init__`` (MeViS's
  ``MeViSDataset.__init__`` and GLUS's ``ReferVideoSegDataset.__init__`` through ``load_mevis_json`` both
  do), each item picks a video at random (as GLUS does), opens each of its C + Q frames with PIL (a frame
  drawn twice is read twice), and per frame does what GLUS's dataset does on the CPU: the CLIP image
  processor (224 px) for the MLLM and the SAM2 transform (float ToTensor, Resize((S, S)), ImageNet
  normalisation) for the segmenter; every chosen anno id's RLE of every query frame is decoded with
  pycocotools and unioned per expression.
- the same Dataset with only a PIL uint8 resize to S x S (what the shard pipeline outputs), and with
  ``sampling.squash`` (torch uint8 resize): these rows tell the storage's share of the gain from the
  share of doing the per-backbone processing on the device instead of in the loader.
- shards: ``RefVOSDataModule.train_dataloader()``: resampled shard streams, shuffle buffer (only the
  planned frames kept), each needed frame decoded once, torch uint8 resize; normalisation and the
  backbone's own resize happen later on the device.

Reported: startup (from building the loader to its first batch: the reference's JSON load, worker
start, the shards' shuffle-buffer fill) and steady samples (videos) per second over
``--seconds`` after one batch per worker. On a shared machine the numbers move by ~10%.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from pycocotools import mask as coco_mask
from torch.utils.data import DataLoader, Dataset
from transformers import CLIPImageProcessor

from datamodules.datamodule import RefVOSDataModule, collate
from datamodules.prepare import prepare_official
from datamodules.records import Expression, VideoRecord, encode_rle
from datamodules.sampling import SamplePlan, VideoSample, choose_expressions, squash, train_context_indices, train_query_indices
from datamodules.synthetic import write_mevis_layout
from datamodules.targets import DenseTargets
from glus_lightning.config import compose

SPLIT = "train"


def generated_video(index: int, frames: int, height: int, width: int) -> VideoRecord:
    """Shapes moving over a smooth, lightly noisy background: JPEGs of realistic size and decode cost."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    colours = rng.uniform(40, 215, size=(2, 3)).astype(np.float32)
    ramp = (xx / width + yy / height)[..., None] / 2
    texture = 12 * np.sin(xx / rng.uniform(20, 60))[..., None] * np.cos(yy / rng.uniform(20, 60))[..., None]
    background = colours[0] * (1 - ramp) + colours[1] * ramp + texture
    objects = []
    for _ in range(int(rng.integers(2, 5))):
        radius = rng.uniform(0.08, 0.2) * height
        start = rng.uniform([radius, radius], [width - radius, height - radius])
        end = rng.uniform([radius, radius], [width - radius, height - radius])
        objects.append((radius, start, end, rng.uniform(0, 255, size=3).astype(np.float32), bool(rng.integers(2))))
    jpegs, labels = [], []
    for t in range(frames):
        image = background + rng.normal(0, 3, size=(height, width, 1)).astype(np.float32)
        label = np.zeros((height, width), dtype=np.uint8)
        for obj_id, (radius, start, end, colour, is_box) in enumerate(objects, start=1):
            cx, cy = start + (end - start) * t / max(frames - 1, 1)
            inside = (np.maximum(abs(xx - cx), abs(yy - cy)) if is_box else np.hypot(xx - cx, yy - cy)) < radius
            image[inside] = colour
            label[inside] = obj_id
        buf = io.BytesIO()
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
        labels.append(label)
    ids = list(range(1, len(objects) + 1))
    expressions = [Expression(str(i), f"object {i}", (i,)) for i in ids] + [Expression(str(len(ids) + 1), "the first two", (1, 2))]
    return VideoRecord(
        dataset="mevis",
        video=f"video{index:04d}",
        frame_names=[f"{t:05d}" for t in range(frames)],
        height=height,
        width=width,
        expressions=expressions,
        frames=jpegs,
        masks={i: [encode_rle(label == i) for label in labels] for i in ids},
    )


class ReferenceStyleDataset(Dataset):
    """MeViS as the reference code reads it: JPEG files plus one ``mask_dict.json`` loaded in ``__init__``."""

    def __init__(self, split_dir: Path, cfg: DictConfig, length: int, resize: str) -> None:
        self.split_dir = split_dir
        self.cfg = cfg
        self.length = length
        self.resize = RESIZES[resize]
        with open(split_dir / "meta_expressions.json") as f:
            self.videos = list(json.load(f)["videos"].items())
        with open(split_dir / "mask_dict.json") as f:
            self.mask_dict = json.load(f)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> VideoSample:
        cfg, rng = self.cfg, random.Random(idx)
        video, entry = rng.choice(self.videos)
        names = entry["frames"]
        expressions = [(Expression(k, e["exp"], tuple(e["obj_id"])), e["anno_id"]) for k, e in entry["expressions"].items()]
        context = train_context_indices(len(names), cfg.num_context, rng)
        query = train_query_indices(len(names), cfg.num_query, rng)
        chosen = choose_expressions(expressions, cfg.max_expressions, rng)
        decoded = [self._frame(video, names[i]) for i in context + query]
        height, width = decoded[0][1]
        masks = []
        for _, anno_ids in chosen:
            target = np.zeros((len(query), height, width), dtype=np.uint8)
            for k, i in enumerate(query):
                for anno_id in anno_ids:
                    rle = self.mask_dict[str(anno_id)][i]
                    if rle is not None:
                        np.maximum(target[k], coco_mask.decode(rle), out=target[k])
            masks.append(torch.from_numpy(target))
        return VideoSample(
            dataset="mevis",
            video=video,
            object_ids=tuple(sorted({o for e, _ in expressions for o in e.obj_ids})),
            plan=SamplePlan(context, query, [e for e, _ in chosen]),
            query_frame_names=[names[i] for i in query],
            frames=torch.stack([frame for frame, _ in decoded]),
            targets=DenseTargets(masks),
        )

    def _frame(self, video: str, name: str) -> tuple[torch.Tensor, tuple[int, int]]:
        """A frame squashed to S x S ``[3, S, S]``, and its original (height, width)."""
        with Image.open(self.split_dir / "JPEGImages" / video / f"{name}.jpg") as img:
            rgb = img.convert("RGB")
        return self.resize(rgb, self.cfg.image_size), (rgb.height, rgb.width)


def pil_resize(rgb: Image.Image, size: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(rgb.resize((size, size), Image.BILINEAR)).copy()).permute(2, 0, 1)


def glus_reference_transform(rgb: Image.Image, size: int) -> torch.Tensor:
    """What GLUS's dataset does per frame: the CLIP processor for the MLLM, and for SAM2 ToTensor,
    Resize((S, S)) and ImageNet Normalize; float32 out (the CLIP tensor is made and, here, dropped)."""
    CLIP_PROCESSOR(images=rgb, return_tensors="pt")
    frame = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 255
    frame = F.interpolate(frame[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return (frame - IMAGENET_MEAN) / IMAGENET_STD


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
CLIP_PROCESSOR = CLIPImageProcessor()  # LLaVA-1.5 / LISA's processor settings (224 px, CLIP mean/std)


def torch_uint8_resize(rgb: Image.Image, size: int) -> torch.Tensor:
    return squash(np.asarray(rgb), size)


RESIZES = {"pil": pil_resize, "glus": glus_reference_transform, "torch": torch_uint8_resize}


def measure(make: Callable[[], DataLoader], seconds: float, warmup_batches: int) -> tuple[float, float]:
    """(startup: seconds from building the loader to its first batch, steady samples per second after ``warmup_batches``)."""
    start = time.perf_counter()
    batches = iter(make())
    next(batches)
    startup = time.perf_counter() - start
    for _ in range(warmup_batches - 1):
        next(batches)
    samples, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        samples += len(next(batches).video_ids)
    return startup, samples / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=100)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--seconds", type=float, default=30.0, help="measuring time per pipeline")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    data = compose(["experiment=glus_s"]).data
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        records = (generated_video(i, args.frames, args.height, args.width) for i in range(args.videos))
        split_dir = write_mevis_layout(records, root / "mevis", SPLIT)
        manifest = prepare_official("mevis", root / "mevis", SPLIT, root / "shards", 10, skip_bad=False, min_frames=data.num_query)
        print(f"data: {manifest.videos} videos x {args.frames} frames of {args.height}x{args.width}, "
              f"{manifest.bytes / 1e6:.0f} MB in {len(manifest.shards)} shards, "
              f"mask_dict.json {os.path.getsize(split_dir / 'mask_dict.json') / 1e6:.1f} MB (made in {time.perf_counter() - t0:.0f} s)")

        cfg = OmegaConf.merge(data, {
            "root": str(root / "shards"), "train": [{"name": "mevis", "shards": f"{SPLIT}/{SPLIT}-*.tar", "weight": 1.0}],
            "num_workers": args.workers, "samples_per_epoch": 10**9,
        })
        print(f"sampling (GLUS-S config): C={cfg.num_context} Q={cfg.num_query} N={cfg.max_expressions} S={cfg.image_size} "
              f"batch={cfg.batch_size} shuffle_buffer={cfg.shuffle_buffer} workers={args.workers} cpus={os.cpu_count()}")
        loaders = {
            "reference: JPEG dirs + mask_dict.json, GLUS transforms": partial(_reference_loader, split_dir, cfg, "glus"),
            "  same, PIL uint8 resize only": partial(_reference_loader, split_dir, cfg, "pil"),
            "  same, this pipeline's torch uint8 resize": partial(_reference_loader, split_dir, cfg, "torch"),
            "shards: RefVOSDataModule": lambda: RefVOSDataModule(cfg).train_dataloader(),
        }
        rows = [(name, *measure(make, args.seconds, warmup_batches=max(args.workers, 1))) for name, make in loaders.items()]
    print(f"\n{'pipeline':<52} {'startup s':>9} {'samples/s':>10} {'ratio':>6}")
    for name, startup, rate in rows:
        print(f"{name:<52} {startup:>9.2f} {rate:>10.2f} {rate / rows[0][2]:>6.2f}")


def _reference_loader(split_dir: Path, cfg: DictConfig, resize: str) -> DataLoader:
    dataset = ReferenceStyleDataset(split_dir, cfg, length=10**9, resize=resize)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers, collate_fn=collate)


if __name__ == "__main__":
    main()
