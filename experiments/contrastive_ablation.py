"""Does the object-contrastive loss make the model pick the wrong object less often?

Trains the demo twice with the same seed and data, both with ``data.expression_sampling=pairs`` (so that only the
loss differs): ``loss.contrastive_weight`` 0 and 0.1. Then, on the validation split (the synthetic one by default):

- J&F, as ``glus validate`` computes it;
- the wrong-object rate: over (expression, frame) pairs with a non-empty target, the fraction where the predicted
  mask overlaps some other single object of the video (not in the expression's object set) with a higher IoU than
  it has with the target, that IoU being > 0. This is the error the loss targets: segmenting a confusable object.

    python experiments/contrastive_ablation.py [--videos N] [key=value ...]   # the same overrides as `glus fit`
    python experiments/contrastive_ablation.py trainer.max_steps=4 --videos 2  # a quick end-to-end check
"""

from __future__ import annotations

import argparse
from itertools import islice

import numpy as np
import torch

from datamodules.datamodule import resolve_shards
from datamodules.records import VideoRecord
from glus_lightning import runner
from glus_lightning.config import compose
from glus_lightning.inference.predictor import load_module, segment_video
from glus_lightning.inference.sources import record_video, shard_records
from glus_lightning.metrics import JAndF
from glus_lightning.module import GLUSModule

WEIGHTS = (0.0, 0.1)
DEFAULTS = ["trainer.max_steps=600", "data.expression_sampling=pairs"]  # before the user's overrides: theirs win


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def wrong_object_counts(record: VideoRecord, obj_ids: tuple[int, ...], pred: np.ndarray) -> tuple[int, int]:
    """(frames where another single object fits the prediction better than the target, frames with a target)."""
    others = [o for o in record.object_ids if o not in obj_ids]
    wrong = total = 0
    for i in range(record.num_frames):
        target = np.zeros_like(pred[i])
        for o in obj_ids:
            target |= record.object_mask(o, i).astype(bool)
        if not target.any():
            continue
        total += 1
        best_other = max((iou(pred[i], record.object_mask(o, i).astype(bool)) for o in others), default=0.0)
        wrong += int(best_other > 0 and best_other > iou(pred[i], target))
    return wrong, total


def evaluate(module: GLUSModule, records: list[VideoRecord]) -> dict[str, float]:
    """J, F, J&F and the wrong-object rate of one model over whole videos (the same masks for both)."""
    metric = JAndF()
    wrong = total = 0
    for record in records:
        masks = segment_video(module, record_video(record), record.expressions)
        for expression, pred in zip(record.expressions, masks, strict=True):
            target = np.stack([record.expression_mask(expression, i) for i in range(record.num_frames)]).astype(bool)
            metric.update(torch.from_numpy(pred), torch.from_numpy(target), key=f"{record.key}/{expression.exp_id}")
            w, t = wrong_object_counts(record, expression.obj_ids, pred)
            wrong, total = wrong + w, total + t
    scores = {k: float(v) for k, v in metric.compute().items() if k in ("J", "F", "J&F")}
    return {**scores, "wrong_object": wrong / max(total, 1), "frames": float(total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=None, help="evaluate only the first N validation videos")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for weight in WEIGHTS:
        overrides = [*DEFAULTS, *args.overrides, f"loss.contrastive_weight={weight}", f"name=contrastive_ablation_w{weight}"]
        runner.fit(compose(overrides))
        checkpoint, _ = runner.resolve_checkpoint(compose([*overrides, "ckpt_path=last"]))
        cfg = compose([*overrides, f"ckpt_path={checkpoint}"])
        urls = sorted({url for entry in cfg.data.val for url in resolve_shards(cfg.data.root, entry.shards)})
        records = list(islice(shard_records(urls), args.videos))
        rows.append((weight, evaluate(load_module(cfg, device), records)))
    print(f"\n{'contrastive_weight':>18s} {'J':>8s} {'F':>8s} {'J&F':>8s} {'wrong-object':>13s} {'frames':>7s}")
    for weight, res in rows:
        print(f"{weight:18.2f} {res['J']:8.4f} {res['F']:8.4f} {res['J&F']:8.4f} {res['wrong_object']:13.4f} {res['frames']:7.0f}")


if __name__ == "__main__":
    main()
