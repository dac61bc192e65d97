"""J&F on the validation split with and without keyframes, for a trained checkpoint.

Runs keyframe self-refinement (the model segments `refine.videos` training videos without memory, its per-frame
IoU trains the frame scorer), then scores the validation split three ways:

1. sequential: the default inference, memory from the first frame on;
2. keyframes: each expression starts at the frame the refined scorer picks, propagating forward and backward;
3. oracle keyframes: the frame whose memoryless mask has the best IoU with the ground truth (uses the labels:
   an upper bound on what a perfect scorer could give, not a method).

    python experiments/keyframes_jf.py ckpt_path=runs/demo/version_0/checkpoints/last.ckpt [key=value ...]
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from datamodules.datamodule import RefVOSDataModule
from glus_lightning.config import compose
from glus_lightning.inference.predictor import load_module
from glus_lightning.keyframes.propagation import track_from_keyframes
from glus_lightning.keyframes.refinement import collect_targets, fit_scorer, format_stats, keyframe_targets, training_videos
from glus_lightning.masks import masks_from_logits
from glus_lightning.metrics import JAndF


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    cfg = compose(args.overrides)
    module = load_module(cfg)
    targets = collect_targets(module, training_videos(cfg.data, cfg.refine.videos), progress=True)
    print(format_stats(fit_scorer(module.frame_scorer, targets, cfg.refine.steps, cfg.refine.lr)))

    metrics = {name: JAndF() for name in ("sequential", "keyframes", "oracle keyframes")}
    chosen: dict[str, list[int]] = {"keyframes": [], "oracle keyframes": []}
    for batch in tqdm(RefVOSDataModule(cfg.data).val_dataloader(), desc="val", unit="video"):
        module.cfg.inference.keyframes = False
        results = {"sequential": module.predict_video(batch)}
        module.cfg.inference.keyframes = True
        results["keyframes"] = module.predict_video(batch)
        evidence = module.frame_evidence(batch)
        oracle = keyframe_targets(evidence.mask_logits, batch.targets, cfg.mask_threshold).argmax(1)
        results["oracle keyframes"] = track_from_keyframes(module.segmenter, evidence.features, evidence.prompts, oracle.tolist()).mask_logits
        chosen["keyframes"] += module.frame_scorer(evidence.scorer_inputs).argmax(1).tolist()
        chosen["oracle keyframes"] += oracle.tolist()
        for e, exp_id in enumerate(batch.expression_ids):  # one target at a time, built from the batch's RLE
            target = batch.targets.expression_target(e).bool()
            for name, logits in results.items():
                pred = masks_from_logits(logits[e], tuple(target.shape[-2:]), cfg.mask_threshold)
                metrics[name].update(pred, target, key=f"{batch.video_ids[0]}/{exp_id}")

    print(f"\n{'inference':18s} {'J':>7s} {'F':>7s} {'J&F':>7s}  keyframe (mean index, share at frame 0)")
    for name, metric in metrics.items():
        scores = metric.compute()
        frames = torch.tensor(chosen.get(name, [0]), dtype=torch.float)
        where = f"{float(frames.mean()):.2f}, {float((frames == 0).float().mean()):.2f}"
        print(f"{name:18s} {float(scores['J']):7.4f} {float(scores['F']):7.4f} {float(scores['J&F']):7.4f}  {where}")


if __name__ == "__main__":
    main()
