"""Does the object-contrastive loss make the model pick the wrong object less often?

Trains the demo with ``loss.contrastive_weight`` 0 and 0.1 for each seed (``seed`` and ``data.seed``), both with
``data.expression_sampling=pairs`` so that only the loss differs. Then, on the validation split (the synthetic one
by default), over (expression, frame) pairs with a non-empty target:

- J&F, as ``glus validate`` computes it;
- wrong-object rate: the fraction where the predicted mask overlaps some other single object of the video (not in
  the expression's object set) with a higher IoU than it has with the target, that IoU being > 0. Weak masks of the
  right object count here too when they touch a neighbour;
- confusion rate: among the frames where the mask clearly picks one object (IoU >= 0.5 with the target or with
  another object), the fraction where it picked another object. This is the error the loss targets.

Per seed and the mean (with the spread over seeds) of each weight, and the mean paired difference.

    python experiments/contrastive_ablation.py [--seeds 0 1 2] [--videos N] [key=value ...]  # overrides as `glus fit`
    python experiments/contrastive_ablation.py trainer.max_steps=4 --seeds 0 --videos 2     # a quick end-to-end check
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


PICKED = 0.5  # IoU at which a mask counts as clearly picking an object


def error_counts(record: VideoRecord, obj_ids: tuple[int, ...], pred: np.ndarray) -> np.ndarray:
    """[frames with a target, wrong-object frames, frames that clearly pick an object, of those: another object]."""
    others = [o for o in record.object_ids if o not in obj_ids]
    counts = np.zeros(4, dtype=np.int64)
    for i in range(record.num_frames):
        target = np.zeros_like(pred[i])
        for o in obj_ids:
            target |= record.object_mask(o, i).astype(bool)
        if not target.any():
            continue
        on_target = iou(pred[i], target)
        best_other = max((iou(pred[i], record.object_mask(o, i).astype(bool)) for o in others), default=0.0)
        picked = max(on_target, best_other) >= PICKED
        counts += (1, best_other > 0 and best_other > on_target, picked, picked and best_other > on_target)
    return counts


def evaluate(module: GLUSModule, records: list[VideoRecord]) -> dict[str, float]:
    """J, F, J&F, the wrong-object and the confusion rate of one model over whole videos (the same masks for all)."""
    metric = JAndF()
    counts = np.zeros(4, dtype=np.int64)
    for record in records:
        masks = segment_video(module, record_video(record), record.expressions)
        for expression, pred in zip(record.expressions, masks, strict=True):
            target = np.stack([record.expression_mask(expression, i) for i in range(record.num_frames)]).astype(bool)
            metric.update(torch.from_numpy(pred), torch.from_numpy(target), key=f"{record.key}/{expression.exp_id}")
            counts += error_counts(record, expression.obj_ids, pred)
    scores = {k: float(v) for k, v in metric.compute().items() if k in ("J", "F", "J&F")}
    frames, wrong, picked, confused = counts.tolist()
    return {**scores, "wrong_object": wrong / max(frames, 1), "confusion": confused / max(picked, 1),
            "frames": float(frames), "picked": float(picked)}


COLUMNS = ("J", "F", "J&F", "wrong_object", "confusion")


def print_table(rows: list[tuple[float, int, dict[str, float]]]) -> None:
    """Per-seed rows, then each weight's mean +- std over seeds, then the mean paired difference (0.1 - 0)."""
    print(f"\n{'weight':>6s} {'seed':>5s} " + " ".join(f"{c:>15s}" for c in COLUMNS) + f" {'frames':>7s} {'picked':>7s}")
    for weight, seed, res in rows:
        print(f"{weight:6.2f} {seed:5d} " + " ".join(f"{res[c]:15.4f}" for c in COLUMNS) + f" {res['frames']:7.0f} {res['picked']:7.0f}")
    table = {w: np.array([[res[c] for c in COLUMNS] for weight, _, res in rows if weight == w]) for w in WEIGHTS}
    for weight, values in table.items():
        cells = (f"{m:.4f}+-{s:.4f}" for m, s in zip(values.mean(0), values.std(0), strict=True))
        print(f"{weight:6.2f} {'mean':>5s} " + " ".join(f"{cell:>15s}" for cell in cells))
    diff = table[WEIGHTS[1]] - table[WEIGHTS[0]]
    cells = (f"{m:+.4f}+-{s:.4f}" for m, s in zip(diff.mean(0), diff.std(0), strict=True))
    print(f"{'diff':>6s} {'mean':>5s} " + " ".join(f"{cell:>15s}" for cell in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one pair of runs per seed")
    parser.add_argument("--videos", type=int, default=None, help="evaluate only the first N validation videos")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for seed in args.seeds:
        for weight in WEIGHTS:
            overrides = [*DEFAULTS, *args.overrides, f"seed={seed}", f"data.seed={seed}", f"loss.contrastive_weight={weight}",
                         f"name=contrastive_ablation_w{weight}_s{seed}"]
            runner.fit(compose(overrides))
            checkpoint, _ = runner.resolve_checkpoint(compose([*overrides, "ckpt_path=last"]))
            cfg = compose([*overrides, f"ckpt_path={checkpoint}"])
            urls = sorted({url for entry in cfg.data.val for url in resolve_shards(cfg.data.root, entry.shards)})
            records = list(islice(shard_records(urls), args.videos))
            rows.append((weight, seed, evaluate(load_module(cfg, device), records)))
    print_table(rows)


if __name__ == "__main__":
    main()
