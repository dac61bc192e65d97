"""Can the demo's SAM2 segment the object its prompt names at all, with a perfect text encoder?

Trains the configured SAM2 (the demo's from-scratch test size by default) on single frames of synthetic videos, each
prompted, through the same single-sparse-token path GLUS uses (``MemorySegmenter.segment_without_memory``), by an
oracle token: the sum of learned embeddings of the object's colour, shape and size. No MLLM, no ambiguity: an IoU
well above what "segment every object" reaches (about 1 / objects per video) means the segmenter can ground a token;
an IoU stuck there means the demo's grounding fails in SAM2 before any text is involved.

    python experiments/oracle_prompt.py [--steps 1500] [--batch 8] [--objects 3 5] [--lookalike 0.7] [--save sam.pt] [key=value ...]
"""

from __future__ import annotations

import argparse
import io
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules.synthetic import COLOURS, RADII, SHAPES, generate_video
from glus_lightning.config import compose
from glus_lightning.losses import mask_dice
from glus_lightning.segmentation import build_segmenter

ATTRIBUTES = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(RADII)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--videos", type=int, default=240)
    parser.add_argument("--objects", type=int, nargs=2, default=[3, 5])
    parser.add_argument("--lookalike", type=float, default=0.7)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--save", help="write the trained SAM2 as an official {'model': state_dict} checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args()
    cfg = compose(args.overrides)
    torch.manual_seed(cfg.seed)
    segmenter = build_segmenter(cfg.segmenter).train()
    tokens = torch.nn.ModuleDict({k: torch.nn.Embedding(len(v), segmenter.prompt_dim) for k, v in ATTRIBUTES.items()})
    trained = [p for p in segmenter.parameters() if p.requires_grad] + list(tokens.parameters())
    optimizer = torch.optim.AdamW(trained, lr=args.lr)
    syn = cfg.data.synthetic
    videos = [generate_video(syn.seed, "train", i, syn.frames, syn.size, tuple(args.objects), args.lookalike) for i in range(args.videos)]
    rng = random.Random(cfg.seed)
    size = segmenter.image_size
    start, recent = time.monotonic(), []
    for step in range(args.steps):
        frames, masks, ids = [], [], []
        for _ in range(args.batch):
            video, t = rng.choice(videos), rng.randrange(syn.frames)
            obj = rng.choice(video.objects)
            with Image.open(io.BytesIO(video.record.frames[t])) as image:
                frames.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))
            masks.append(torch.from_numpy(video.record.object_mask(obj.obj_id, t).astype(np.float32)))
            ids.append([ATTRIBUTES[k].index(getattr(obj, k)) for k in ATTRIBUTES])
        pixels = F.interpolate(torch.stack(frames).float(), size=(size, size), mode="bilinear").round().clamp(0, 255)
        target = torch.stack(masks)
        index = torch.tensor(ids)
        prompts = sum(tokens[k](index[:, i]) for i, k in enumerate(ATTRIBUTES))
        out = segmenter.segment_without_memory(segmenter.encode_frames(pixels.to(torch.uint8)), prompts)
        logits = F.interpolate(out.mask_logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        loss = F.binary_cross_entropy_with_logits(logits, target) + mask_dice(logits, target).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        hit = logits > 0
        recent.append(float(((hit & (target > 0)).sum((1, 2)) / (hit | (target > 0)).sum((1, 2)).clamp(min=1)).mean()))
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}  loss {loss.item():.3f}  IoU (last 100 steps) {np.mean(recent[-100:]):.3f}  "
                  f"{time.monotonic() - start:.0f} s", flush=True)
    objects = np.mean([len(v.objects) for v in videos])
    print(f"IoU of the named object {np.mean(recent[-100:]):.3f}; 'every object' scores about {1 / objects:.3f}")
    if args.save:
        torch.save({"model": segmenter.sam.state_dict()}, args.save)
        print(f"saved {args.save}")


if __name__ == "__main__":
    main()
