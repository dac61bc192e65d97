"""Whole-video inference speed: frames/s with and without the prompt-prefix KV-cache reuse, and how time and
memory grow with video length.

    python experiments/benchmarks/inference_speed.py [--lengths 8 16 32 64 128 --expressions 2 --repeats 1
                                                      key=value ...]

Model: the configured experiment (default ``demo``: tiny LLaVA-style MLLM, test-size SAM2), random init, in
eval mode, on the GPU when there is one, else the CPU. Each video is ``--lengths`` random frames (content does
not change the amount of work) segmented for ``--expressions`` expressions by ``segment_video``, exactly as
``glus predict`` does: windows of ``inference.window`` query frames, SAM2 memory bank carried across windows.

Per row: the best of ``--repeats`` timed runs, with and without the reuse taking turns (one warm-up on the shortest video comes first; rows go from short
to long); peak memory is the CUDA allocator's peak on a GPU above what was allocated before the run, else the
growth of the process's resident memory during the run (sampled every 2 ms): on the CPU it shows only what a
longer video needs beyond what shorter ones already made the allocator hold, i.e. how memory grows with length. Without the reuse every window re-encodes the C context frames and the whole prompt prefix
for every expression; with it the prefix is encoded once per video.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from typing import Self

import numpy as np
import torch

from datamodules.records import Expression
from glus_lightning.config import compose
from glus_lightning.inference.predictor import load_module, segment_video
from glus_lightning.inference.sources import Video
from glus_lightning.module import GLUSModule


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak, or resident set size sampled by a thread."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base, self.running = self.rss(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self.rss() - self.base)


class WorkCounter:
    """Tokens through the MLLM's language model and frames through its vision tower (noise-free work counts)."""

    def __init__(self, module: GLUSModule) -> None:
        self.tokens = self.frames = 0
        backbone = module.backbone
        language = backbone.hf_model.get_submodule(backbone.language_model_module)
        language.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
        backbone.hf_model.get_submodule(backbone.vision_module).register_forward_pre_hook(self._count_frames)

    def _count_tokens(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        embeds = kwargs.get("inputs_embeds")
        self.tokens += embeds.shape[0] * embeds.shape[1]

    def _count_frames(self, _module: torch.nn.Module, args: tuple) -> None:
        self.frames += args[0].shape[0]

    def take(self) -> tuple[int, int]:
        counts, self.tokens, self.frames = (self.tokens, self.frames), 0, 0
        return counts


def run(modules: dict[bool, GLUSModule], video: Video, expressions: list[Expression], repeats: int) -> dict[bool, tuple[float, int]]:
    """Per module: best wall time of ``repeats`` runs and the largest peak memory; the modules take turns, so
    that load from other processes on a shared machine hits both alike."""
    best = {reuse: (float("inf"), 0) for reuse in modules}
    for _ in range(repeats):
        for reuse, module in modules.items():
            with PeakMemory(module.device) as memory:
                start = time.perf_counter()
                segment_video(module, video, expressions)
                seconds = time.perf_counter() - start
            best[reuse] = (min(best[reuse][0], seconds), max(best[reuse][1], memory.peak))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--expressions", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. experiment=demo inference.window=8")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modules = {reuse: load_module(compose([*args.overrides, f"inference.kv_cache={str(reuse).lower()}"]), device)
               for reuse in (False, True)}
    cfg = modules[True].cfg
    expressions = [Expression(str(i), f"the moving shape number {i}", ()) for i in range(args.expressions)]
    rng = np.random.default_rng(0)
    size = cfg.data.image_size
    print(f"device {device} ({torch.get_num_threads()} CPU threads) | backbone {cfg.backbone.family} "
          f"(image {cfg.backbone.image_size}) | SAM2 {cfg.segmenter.size} at {size} px | C={cfg.data.num_context} "
          f"context frames, window {cfg.inference.window} | {args.expressions} expressions | best of {args.repeats}")
    print("| frames | reuse off: s | frames/s | peak MB | LM tokens | vision frames | reuse on: s | frames/s | peak MB "
          "| LM tokens | vision frames | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    videos = [Video("random", [f"{i:05d}" for i in range(n)], list(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)))
              for n in sorted(args.lengths)]
    for module in modules.values():
        segment_video(module, videos[0], expressions)  # warm-up
    counters = {reuse: WorkCounter(module) for reuse, module in modules.items()}
    for video in videos:
        length = len(video.frames)
        row = run(modules, video, expressions, args.repeats)
        work = {reuse: [n // args.repeats for n in counter.take()] for reuse, counter in counters.items()}
        cells = [f"{row[r][0]:.2f} | {length / row[r][0]:.1f} | {row[r][1] / 2**20:.0f} | {work[r][0]} | {work[r][1]}"
                 for r in (False, True)]
        print(f"| {length} | {cells[0]} | {cells[1]} | {row[False][0] / row[True][0]:.2f}x |")


if __name__ == "__main__":
    main()
