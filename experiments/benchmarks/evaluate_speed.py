"""Speed of ``glus evaluate`` (``glus_lightning.evaluation.evaluate``) on MeViS-format ground truth.

    python experiments/benchmarks/evaluate_speed.py [--videos 2 --frames 30 --expressions 3 --height 720 --width 1280]

Data, in a temporary directory: per video, ``--expressions`` boxes moving over ``--frames`` frames
stored as ``mask_dict.json`` RLEs with their ``meta_expressions.json``; predictions are the same boxes
shifted by (3, 5) px as 0/255 PNGs. Reported: frames scored per second of wall time and of process
CPU time (the latter is steadier on a shared machine), and J&F as a sanity value.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.records import encode_rle
from glus_lightning.evaluation import evaluate


def write_data(root: Path, videos: int, frames: int, expressions: int, height: int, width: int) -> None:
    meta, mask_dict = {}, {}
    for v in range(videos):
        names = [f"{t:05d}" for t in range(frames)]
        exps = {}
        for e in range(expressions):
            anno_id = str(len(mask_dict))
            rles = []
            for t, name in enumerate(names):
                mask = np.zeros((height, width), np.uint8)
                top, left = (height // 8 + 5 * t + 40 * e) % (height // 2), (width // 8 + 7 * t + 60 * e) % (width // 2)
                mask[top : top + height // 4, left : left + width // 4] = 1
                rles.append(encode_rle(mask))
                out = root / "pred" / f"video{v}" / str(e)
                out.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.roll(mask, (3, 5), (0, 1)) * 255).save(out / f"{name}.png")
            mask_dict[anno_id] = rles
            exps[str(e)] = {"exp": f"box {e}", "obj_id": [e], "anno_id": [anno_id]}
        meta[f"video{v}"] = {"frames": names, "expressions": exps}
    (root / "meta_expressions.json").write_text(json.dumps({"videos": meta}))
    (root / "mask_dict.json").write_text(json.dumps(mask_dict))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--expressions", type=int, default=3)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_data(root, args.videos, args.frames, args.expressions, args.height, args.width)
        wall, cpu = time.perf_counter(), time.process_time()
        result = evaluate(root / "pred", root / "mask_dict.json", root / "meta_expressions.json", progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = args.videos * args.frames * args.expressions
    print(f"{n} expression-frames at {args.height}x{args.width}: {wall:.2f} s wall ({n / wall:.1f}/s), "
          f"{cpu:.2f} s CPU ({n / cpu:.1f}/s); J&F {result.overall['J&F']:.4f}")


if __name__ == "__main__":
    main()
