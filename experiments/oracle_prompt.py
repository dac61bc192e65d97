"""Can the demo's SAM2 segment the object its prompt names at all, with a perfect text encoder?

Trains the configured SAM2 (the demo's from-scratch test size by default) on single frames of synthetic videos, each
prompted, through the same single-sparse-token path GLUS uses (``MemorySegmenter.segment_without_memory``), by an
oracle token: the sum of learned embeddings of the object's colour, shape and size. No MLLM, no ambiguity: an IoU
well above what "segment every object" reaches (about 1 / objects per video) means the segmenter can ground a token;
an IoU stuck there means the demo's grounding fails in SAM2 before any text is involved.

The tokens start as ``nn.Embedding``'s N(0, 1) rows, so an object's token has a norm near SAM2's own output tokens
(about 8 at the test size; the sum of three: about 14); ``--token-scale 0.15`` starts them at the norm the demo's
``[SEG]`` projection gives its prompts (about 2), to see whether the decoder learns from prompts that small.

    python experiments/oracle_prompt.py [--steps 1500] [--batch 8] [--objects 3 5] [--lookalike 0.7] [--lr 1e-3]
                                        [--token-scale 1.0] [--save sam.pt] [key=value ...]
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
    parser.add_argument("--prompts", choices=["attributes", "words", "colour", "all"], default="attributes",
                        help="attributes: one named object's colour + shape + size tokens; words: the sum of learned "
                             "embeddings of the words of one of the video's expressions (a bag-of-words text encoder; "
                             "motion words cannot be told from one frame); colour: one colour's token, the target every "
                             "object of that colour; all: one token, the target every object (segmentation alone)")
    parser.add_argument("--token-scale", type=float, default=1.0, help="initial token size, times N(0, 1)")
    parser.add_argument("--save", help="write the trained SAM2 as an official {'model': state_dict} checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args()
    cfg = compose(args.overrides)
    torch.manual_seed(cfg.seed)
    segmenter = build_segmenter(cfg.segmenter).train()
    tokens = torch.nn.ModuleDict({k: torch.nn.Embedding(len(v), segmenter.prompt_dim) for k, v in ATTRIBUTES.items()})
    syn = cfg.data.synthetic
    videos = [generate_video(syn.seed, "train", i, syn.frames, syn.size, tuple(args.objects), args.lookalike) for i in range(args.videos)]
    if args.prompts == "words":  # after the attribute tables, so that their initialisation is the same either way
        vocabulary = sorted({w for v in videos for e in v.record.expressions for w in e.text.split()})
        word_ids = {w: i for i, w in enumerate(vocabulary)}
        tokens["words"] = torch.nn.Embedding(len(vocabulary), segmenter.prompt_dim)
    with torch.no_grad():
        for table in tokens.values():
            table.weight.mul_(args.token_scale)
    trained = [p for p in segmenter.parameters() if p.requires_grad] + list(tokens.parameters())
    optimizer = torch.optim.AdamW(trained, lr=args.lr)
    rng = random.Random(cfg.seed)
    size = segmenter.image_size
    start, recent = time.monotonic(), []
    for step in range(args.steps):
        frames, masks, prompts = [], [], []
        for _ in range(args.batch):
            video, t = rng.choice(videos), rng.randrange(syn.frames)
            with Image.open(io.BytesIO(video.record.frames[t])) as image:
                frames.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))
            if args.prompts == "words":
                expression = rng.choice(video.record.expressions)
                mask = video.record.expression_mask(expression, t)
                prompts.append(tokens["words"](torch.tensor([word_ids[w] for w in expression.text.split()])).sum(0))
            elif args.prompts in ("colour", "all"):
                colour = rng.choice(video.objects).colour if args.prompts == "colour" else ATTRIBUTES["colour"][0]
                named = [o.obj_id for o in video.objects if args.prompts == "all" or o.colour == colour]
                mask = np.any([video.record.object_mask(i, t) for i in named], axis=0)
                prompts.append(tokens["colour"](torch.tensor(ATTRIBUTES["colour"].index(colour))))
            else:
                obj = rng.choice(video.objects)
                mask = video.record.object_mask(obj.obj_id, t)
                prompts.append(sum(tokens[k](torch.tensor(ATTRIBUTES[k].index(getattr(obj, k)))) for k in ATTRIBUTES))
            masks.append(torch.from_numpy(mask.astype(np.float32)))
        pixels = F.interpolate(torch.stack(frames).float(), size=(size, size), mode="bilinear").round().clamp(0, 255)
        target = torch.stack(masks)
        prompts = torch.stack(prompts)
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
