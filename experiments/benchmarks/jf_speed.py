"""Frames per second of the J&F metric against the straightforward per-frame numpy reference.

    python experiments/benchmarks/jf_speed.py --frames 32 --height 720 --width 1280 --device cpu

Both score the same random-blob stack in the same run; the two take turns ``--repeats`` times and
each one's best run counts (the machine may be shared). The reference (davis_reference.py) follows the DAVIS
toolkit's definitions one frame at a time; the metric is ``JAndF.update`` on the whole stack.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import davis_reference as ref
import numpy as np
import torch

from glus_lightning.metrics import JAndF, boundary_f, mask_iou


def best_seconds(runs: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Shortest wall time of each run over ``repeats`` rounds (after a warm-up round); the runs take
    turns within a round so that a load from elsewhere on the machine hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            sync()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--device", default="cpu", help="torch device of the metric (the reference is numpy on CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: like the single-threaded reference)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    pred_np, target_np = ref.random_blobs(np.random.default_rng(args.seed), args.frames, args.height, args.width)
    pred, target = torch.from_numpy(pred_np).to(device), torch.from_numpy(target_np).to(device)

    metric = JAndF().to(device)
    runs = {"metric": lambda: metric.update(pred, target), "reference": lambda: ref.jf_frames(pred_np, target_np)}
    seconds = best_seconds(runs, args.repeats, sync)
    torch_s, ref_s = seconds["metric"], seconds["reference"]

    j_ref, f_ref = ref.jf_frames(pred_np, target_np)
    j_err = np.abs(mask_iou(pred, target).cpu().numpy() - j_ref).max()
    f_err = np.abs(boundary_f(pred, target).cpu().numpy() - f_ref).max()

    threads = torch.get_num_threads()
    print(f"J&F speed: {args.frames} frames of {args.height}x{args.width}, tolerance radius "
          f"{ref.tolerance(args.height, args.width)} px, torch threads {threads}, best of {args.repeats}")
    print(f"| {'implementation':<34} | {'device':<6} | {'seconds':>8} | {'frames/s':>9} | {'speed-up':>8} |")
    print(f"|{'-' * 36}|{'-' * 8}|{'-' * 10}|{'-' * 11}|{'-' * 10}|")
    for name, where, seconds in [("numpy per-frame reference", "cpu", ref_s), ("JAndF.update (torch, whole stack)", device.type, torch_s)]:
        print(f"| {name:<34} | {where:<6} | {seconds:>8.3f} | {args.frames / seconds:>9.1f} | {ref_s / seconds:>7.1f}x |")
    print(f"max |J - J_ref| = {j_err:.2e}, max |F - F_ref| = {f_err:.2e}, mean F = {f_ref.mean():.4f}")


if __name__ == "__main__":
    main()
