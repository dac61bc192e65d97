"""Peak GPU memory of 7B + SAM2-L inference on a long 720p video with many expressions, rehearsed on the CPU.

    python experiments/benchmarks/inference_rehearsal.py [--backbone llava_7b --frames 16 --expressions 10
                                                          --modes bf16 qlora --json runs/inference_rehearsal.json]

As ``rehearsal.py`` does for training: the model at its real widths with random weights (``experiment=glus_s``,
``backbone.path=null``, SAM2 Hiera-L at 1024 px), the language model and vision tower cut to 1 and then 2 blocks, each
depth in its own process. Each segments a ``--frames``-frame 1280x720 video for ``--expressions`` expressions as
``glus predict`` does (``stream_masks``: windows of ``inference.window`` frames, each window's masks upsampled to
720p and handed over, bf16 autocast; sequential, ``inference.keyframes=false``). Memory is tensor memory as a GPU's
allocator counts it (``tensor_memory.LiveTensorBytes``, matmuls through fp32 kernels as in ``rehearsal.py``), taken
per window: inference keeps nothing per frame beyond its window (the SAM2 memory bank is bounded: SAM2-L's 7
memories are full after 8 frames), so the peak of a 1000-frame video is the largest window peak once the bank is full
(``tests/test_inference.py`` checks that 1000 frames peak no higher than 100).

Full depth: weights counted per part and scaled exactly (``rehearsal.static_bytes``); the window peak above the
weights fitted linearly between the two depths. A QLoRA row takes the 4-bit weights of a weights-only 4-bit build
and the bf16 run's activations plus the largest LM weight dequantised at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rehearsal  # the training rehearsal's builders, presets and meters

GIB = 2**30


class _NoOptimizer:
    def __init__(self) -> None:
        self.state: dict = {}


def measure(preset: str, layers: int, frames: int, expressions: int, mode: str) -> dict[str, Any]:
    import numpy as np
    import torch

    from datamodules.records import Expression
    from glus_lightning.config import compose
    from glus_lightning.inference.predictor import stream_masks
    from glus_lightning.inference.sources import Video

    ov = rehearsal.overrides(preset, layers, mode, expressions=expressions) + ["inference.keyframes=false"]
    cfg = compose(ov)
    rehearsal.use_vocabulary(cfg.backbone.family, rehearsal.PRESETS[preset].vocab)
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = rehearsal.build_module(cfg, device).eval()
    result = {"preset": preset, "layers": layers, "mode": mode, "frames": frames, "expressions": expressions,
              "window": cfg.inference.window, "vocab": model.backbone.hf_model.get_input_embeddings().num_embeddings,
              "parts": rehearsal.part_bytes(model, layers, _NoOptimizer()), "windows": None}
    if mode == "qlora":  # weights only: bitsandbytes' CPU 4-bit path is too slow here; activations are the bf16 run's
        return result
    rng = np.random.default_rng(0)
    video = Video("rehearsal", [f"{i:05d}" for i in range(frames)],
                  list(rng.integers(0, 256, (frames, 720, 1280, 3), dtype=np.uint8)))
    texts = [Expression(str(i), rehearsal.EXPRESSIONS[i % len(rehearsal.EXPRESSIONS)], ()) for i in range(expressions)]
    meter = rehearsal.Meter(device)
    windows = []
    start = time.perf_counter()
    with meter.tracking(), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        span = meter.begin()
        for frame_ids, masks in stream_masks(model, video, texts):
            meter.end(span)
            windows.append({"frames": frame_ids, "peak": span.peak, "kept": span.end,
                            "seconds": span.seconds})
            del masks
            span = meter.begin()
        meter.end(span)
    result.update(windows=windows, seconds=time.perf_counter() - start)
    return result


def run_child(args: argparse.Namespace, layers: int, mode: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", args.backbone, str(layers), mode, "--frames", str(args.frames),
           "--expressions", str(args.expressions)]
    return rehearsal.run_measurement(cmd, f"[inference rehearsal] {args.backbone} {mode} layers={layers}")


def report(runs: list[dict[str, Any]], preset_name: str) -> str:
    preset = rehearsal.PRESETS[preset_name]
    bf16 = sorted((r for r in runs if r["mode"] == "bf16"), key=lambda r: r["layers"])
    a, b = bf16[0], bf16[1]
    def steady(r: dict[str, Any]) -> float:  # the first window also builds the prefix cache
        return max(w["peak"] for w in r["windows"][1:])

    def first(r: dict[str, Any]) -> float:
        return r["windows"][0]["peak"]

    per_layer = (steady(b) - steady(a)) / (b["layers"] - a["layers"])
    act = steady(a) + (preset.lm_depth - a["layers"]) * per_layer
    per_layer_first = (first(b) - first(a)) / (b["layers"] - a["layers"])
    act_first = first(a) + (preset.lm_depth - a["layers"]) * per_layer_first
    title = (f"{preset_name} x SAM2-L at 1024 px: {a['frames']} frames of 1280x720, {a['expressions']} expressions, "
             f"windows of {a['window']} frames (sequential, streamed)")
    lines = [title,
             "", "| run | window peaks above the weights, MiB (window 1 builds the prefix cache) | s |", "|---|---|---:|"]
    for r in bf16:
        peaks = ", ".join(f"{w['peak'] / 2**20:.0f}" for w in r["windows"])
        lines.append(f"| bf16 K={r['layers']} | {peaks} | {r['seconds']:.0f} |")
    lines += ["", "| full depth | weights GiB | window peak above weights GiB (steady / first window) | peak GiB |",
              "|---|---:|---:|---:|"]
    for mode in ("bf16", "qlora"):
        run = next((r for r in runs if r["mode"] == mode and r["layers"] == a["layers"]), None)
        if run is None:
            continue
        static = rehearsal.static_bytes(run, preset, preset.vocab)
        weights = sum(p["weights"] for p in static.values())
        extra = 2 * preset.text["hidden_size"] * preset.text["intermediate_size"] if mode == "qlora" else 0
        peak = weights + max(act, act_first) + extra
        lines.append(f"| {mode} | {weights / GIB:.1f} | {(act + extra) / GIB:.2f} / {(act_first + extra) / GIB:.2f} | {peak / GIB:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="llava_7b", choices=sorted(rehearsal.PRESETS))
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--expressions", type=int, default=10)
    parser.add_argument("--modes", nargs="+", default=["bf16", "qlora"], choices=["bf16", "qlora"])
    parser.add_argument("--json", type=Path, help="write the runs here")
    parser.add_argument("--runs", type=Path, help="report from a saved --json file instead of measuring")
    parser.add_argument("--one", nargs=3, metavar=("PRESET", "LAYERS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        preset, layers, mode = args.one
        print(json.dumps(measure(preset, int(layers), args.frames, args.expressions, mode)))
        return
    if args.runs:
        runs = json.loads(args.runs.read_text())
        print(report(runs, runs[0]["preset"]))
        return
    runs = [run_child(args, layers, "bf16") for layers in (1, 2)]
    runs += [run_child(args, 1, mode) for mode in args.modes if mode != "bf16"]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(runs, indent=1))
    print(report(runs, args.backbone))


if __name__ == "__main__":
    main()
