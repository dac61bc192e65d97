"""Whole-video inference: frames/s, peak memory and the work done (vision-tower frames, LM tokens) of three paths.

    python experiments/benchmarks/inference_speed.py [--lengths 16 64 256 --expressions 1 5 10 --repeats 1
                                                      --no-memory key=value ...]

Paths, each on the same model (the configured experiment, default ``demo``: tiny LLaVA-style MLLM and test-size SAM2,
random init, eval mode; on the GPU when there is one):

- ``copies``: the path before frames were shared: every expression's conversation carried its own copy of the video's
  frames, so the vision tower encoded each frame once per expression (and resized it again), and the LM loss was
  computed at inference too (``MLLMBackbone.encode`` called as it was: frames indexed per expression, no ``rows``);
- ``shared``: ``glus predict`` now: each frame through the vision tower once, all expressions of a window one LM batch
  over the video's shared prefix cache, no LM loss; windows streamed (``GLUSModule.stream_video``);
- ``reference``: the GLUS reference's decoding (``inference.decoding=sliding``): one ``[SEG]`` per frame at the end of
  a ``data.num_query``-turn conversation over that frame and the ones before it.

All three use the prompt-prefix KV cache (``inference.kv_cache``, the default). Per row: wall time (best of
``--repeats``), frames/s, peak memory (tensor bytes as a GPU's allocator counts them, ``tensor_memory.LiveTensorBytes``
on the CPU, in an untimed pass of its own; ``--no-memory`` skips it), and the frames through the vision tower and the
tokens through the language model, counted by forward hooks (noise-free). ``copies`` and ``shared`` must give the same
masks (checked each row); ``reference`` decodes differently, so its masks differ by design.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import numpy as np
import torch
from omegaconf import OmegaConf

from datamodules.records import Expression
from glus_lightning.config import compose
from glus_lightning.inference.predictor import load_module, segment_video
from glus_lightning.inference.sources import Video
from glus_lightning.module import GLUSModule
from glus_lightning.tensor_memory import LiveTensorBytes

PATHS = ("copies", "shared", "reference")


class WorkCounter:
    """Tokens through the MLLM's language model and images through its vision tower."""

    def __init__(self, module: GLUSModule) -> None:
        self.tokens = self.frames = 0
        backbone = module.backbone
        language = backbone.hf_model.get_submodule(backbone.language_model_module)
        language.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
        backbone.hf_model.get_submodule(backbone.vision_module).register_forward_pre_hook(self._count_frames, with_kwargs=True)

    def _count_tokens(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        embeds = kwargs.get("inputs_embeds")
        self.tokens += embeds.shape[0] * embeds.shape[1]

    def _count_frames(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if "grid_thw" in kwargs:  # Qwen2.5-VL's tower takes the patches of all images and their grids
            self.frames += kwargs["grid_thw"].shape[0]
        else:
            self.frames += (args[0] if args else kwargs["pixel_values"]).shape[0]

    def take(self) -> tuple[int, int]:
        counts, self.tokens, self.frames = (self.frames, self.tokens), 0, 0
        return counts


def copy_frames_per_expression(module: GLUSModule) -> None:
    """Make ``module`` encode as before sharing: each conversation gets its own copy of its frames, LM loss included."""
    encode = module.backbone.encode

    def encode_copies(context, query, expressions, ce_only_seg, prefix=None, sizes=None, rows=None, with_loss=True):
        if rows is not None:
            context = context[rows] if len(context) == len(query) else context.expand(len(rows), *context.shape[1:])
            sizes = None if sizes is None else [sizes[i] for i in rows.tolist()]
            query = query[rows]
        return encode(context, query, expressions, ce_only_seg, prefix=prefix, sizes=sizes, with_loss=True)

    module.backbone.encode = encode_copies


def build(overrides: list[str], device: torch.device) -> dict[str, GLUSModule]:
    modules = {
        "copies": load_module(compose(overrides), device),
        "shared": load_module(compose(overrides), device),
        "reference": load_module(compose([*overrides, "inference.decoding=sliding"]), device),
    }
    copy_frames_per_expression(modules["copies"])
    return modules


def timed(run: Callable[[], list[np.ndarray]], device: torch.device) -> tuple[float, list[np.ndarray]]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    masks = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, masks


def peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    """Tensor bytes made by ``run`` at their peak: the CUDA allocator's peak above its level before, or on the CPU
    ``LiveTensorBytes`` (exact, a few times slower: untimed)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    tracker = LiveTensorBytes()
    with tracker.mode:
        run()
    return tracker.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--expressions", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the (untimed) peak-memory pass")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. experiment=demo inference.window=8")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modules = build(args.overrides, device)
    cfg = modules["shared"].cfg
    counters = {path: WorkCounter(module) for path, module in modules.items()}
    text = OmegaConf.to_container(cfg.backbone.tiny.text_config) if cfg.backbone.path is None else cfg.backbone.path
    print(f"device {device} ({torch.get_num_threads()} CPU threads) | backbone {cfg.backbone.family} {text} "
          f"(image {cfg.backbone.image_size}) | SAM2 {cfg.segmenter.size} at {cfg.data.image_size} px | C={cfg.data.num_context} "
          f"context frames, window {cfg.inference.window}, reference turns {cfg.data.num_query} | best of {args.repeats}")
    rng = np.random.default_rng(0)
    size = cfg.data.image_size
    warm = Video("warm-up", [f"{i:05d}" for i in range(4)], list(rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8)))
    for module in modules.values():
        segment_video(module, warm, [Expression("0", "the shape", ())])
    for counter in counters.values():
        counter.take()
    print("| E | frames | path | s | frames/s | peak MB | vision frames | LM tokens | masks = copies |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---|")
    summary = []
    for num_exp in args.expressions:
        expressions = [Expression(str(i), f"the moving shape number {i}", ()) for i in range(num_exp)]
        for length in sorted(args.lengths):
            video = Video("random", [f"{i:05d}" for i in range(length)],
                          list(rng.integers(0, 256, (length, size, size, 3), dtype=np.uint8)))
            rows = {}
            for path, module in modules.items():
                run = functools.partial(segment_video, module, video, expressions)
                best, masks = float("inf"), None
                for _ in range(args.repeats):
                    seconds, masks = timed(run, device)
                    best = min(best, seconds)
                frames, tokens = (n // args.repeats for n in counters[path].take())
                peak = 0 if args.no_memory else peak_bytes(run, device)
                counters[path].take()
                rows[path] = (best, peak, frames, tokens, masks)
            same = all(np.array_equal(a, b) for a, b in zip(rows["copies"][4], rows["shared"][4], strict=True))
            for path, (best, peak, frames, tokens, _) in rows.items():
                check = "" if path == "reference" else ("yes" if same else "**NO**")
                memory = "-" if args.no_memory else f"{peak / 2**20:.1f}"
                print(f"| {num_exp} | {length} | {path} | {best:.2f} | {length / best:.1f} | {memory} | {frames} | {tokens} | {check} |")
            copies, shared, reference = rows["copies"], rows["shared"], rows["reference"]
            summary.append((num_exp, length, copies[2] / shared[2], copies[3] / shared[3], copies[0] / shared[0],
                            reference[0] / shared[0], same))
    print("\n| E | frames | vision frames copies/shared | LM tokens copies/shared | time copies/shared | time reference/shared | masks equal |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for num_exp, length, frames, tokens, speed, ref, same in summary:
        print(f"| {num_exp} | {length} | {frames:.1f}x | {tokens:.2f}x | {speed:.2f}x | {ref:.2f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
