"""The arms of the demo's experiments (``ablations.py``, ``demo_controls.py``): what each trains or switches off, and
where its scores are kept.

Each (arm, seed) trains the demo with ``seed`` and ``data.seed`` set (only the arm's overrides differ), then scores
its last checkpoint on the synthetic validation split (``scoring.py``) and saves the scores to ``<out>/<arm>_s<seed>.json``
as soon as it has them. An arm already there is skipped and a training that was interrupted resumes, so runs resume
and several processes (different arms or seeds) can share the work.
"""

from __future__ import annotations

import argparse
import json
import random
from itertools import islice
from pathlib import Path
from typing import ClassVar

import lightning as L
import numpy as np
import torch
from scoring import COLUMNS, MaskFn, evaluate, hard_start, mean_spread, model_masks, swapped_text

from datamodules.batch import RefVOSBatch
from datamodules.datamodule import resolve_shards
from datamodules.records import Expression, VideoRecord
from datamodules.synthetic import VOCABULARY
from datamodules.targets import DenseTargets
from glus_lightning import runner
from glus_lightning.config import compose
from glus_lightning.inference.predictor import load_module, video_batch
from glus_lightning.inference.sources import record_video, shard_records
from glus_lightning.keyframes.propagation import track_from_keyframes
from glus_lightning.keyframes.refinement import collect_targets, fit_scorer, format_stats, keyframe_targets, training_videos
from glus_lightning.masks import masks_from_logits
from glus_lightning.module import GLUSModule


class ShuffledExpressions(L.Callback):
    """Replaces each training expression by a random one from a pool of earlier batches' other videos: the text then
    carries no information about the target, so the model can only learn a prior such as "segment some shape"."""

    def __init__(self, seed: int, pool_size: int = 256) -> None:
        self.rng = random.Random(seed)
        self.pool: list[tuple[str, str]] = []  # (video id, expression)
        self.pool_size = pool_size

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: RefVOSBatch, batch_idx: int) -> None:
        own = [(batch.video_ids[v], text) for v, text in zip(batch.expression_video.tolist(), batch.expressions)]
        shuffled = []
        for video, text in own:
            others = [t for v, t in self.pool if v != video]
            shuffled.append(self.rng.choice(others) if others else text)
        self.pool = (self.pool + own)[-self.pool_size :]
        batch.expressions = shuffled


class BagOfWordsPrompts(GLUSModule):
    """The demo with each ``[SEG]`` prompt replaced by a bag-of-words text encoder: the sum of a learned vector per word
    of the expression (N(0, 1) at the start, as SAM2's own tokens; "the" left out, it is in every expression). The
    MLLM still runs, only its prompt is unused. What the rest of the demo (SAM2, memory, losses, recipe) makes of a
    text path that encodes every word from the first step: a control for the MLLM's part in grounding."""

    WORDS: ClassVar[dict[str, int]] = {w: i for i, w in enumerate(sorted(VOCABULARY - {"the"}))}

    def __init__(self, config, load_device: torch.device | None = None) -> None:
        super().__init__(config, load_device)
        self.words = torch.nn.Embedding(len(self.WORDS), self.segmenter.prompt_dim)
        self.texts: list[str] = []

    def forward(self, batch: RefVOSBatch):
        self.texts = batch.expressions
        return super().forward(batch)

    def _window_prompts(self, batch: RefVOSBatch):
        self.texts = batch.expressions
        yield from super()._window_prompts(batch)

    def _project(self, seg_hidden: torch.Tensor) -> torch.Tensor:
        ids = [torch.tensor([self.WORDS[w] for w in text.split() if w != "the"], device=seg_hidden.device) for text in self.texts]
        prompts = torch.stack([self.words(i).sum(0) for i in ids])[:, None].expand(*seg_hidden.shape[:2], -1)
        return prompts + 0 * super()._project(seg_hidden)  # the projection stays in the graph (no idle parameters)


UNTRAINED = "untrained"  # the demo's model at initialisation (scored, never trained)
TRAINED = {
    "glus": [],
    "no_context": ["data.num_context=0"],
    "no_memory": ["segmenter.memory.bank=false"],
    "contrastive": ["loss.contrastive_weight=0.1", "data.expression_sampling=pairs"],  # GLUS's loss, the reference's weight
    "unprompted": ["segmenter.memory.unprompted_frames=0.5"],  # SAM2's way: some frames tracked from memory alone
    "no_context_unprompted": ["data.num_context=0", "segmenter.memory.unprompted_frames=0.5"],
    "shuffled": [],  # + ShuffledExpressions
    "bag_of_words": [],  # BagOfWordsPrompts
}
MODULES = {"bag_of_words": BagOfWordsPrompts}  # the arms trained as another GLUSModule class
INFERENCES = ("swapped_text", "memory_off", "first_prompt_only", "oracle_keyframe_prompt_only",
              "hard_start_first_prompt_only", "hard_start_oracle_keyframe_prompt_only", "keyframes", "oracle_keyframes",
              "hard_start", "hard_start_keyframes", "hard_start_oracle_keyframes")
INFERRED_ON = ("glus", "no_context", "unprompted", "no_context_unprompted")  # the trained arms inference arms run on


def inferred_arm(model: str, inference: str) -> str:
    """An inference arm's name: the inference alone on ``glus`` (e.g. ``memory_off``), else ``<model>_<inference>``."""
    return inference if model == "glus" else f"{model}_{inference}"


INFERRED_FROM = {inferred_arm(model, inference): model for model in INFERRED_ON for inference in INFERENCES}
INFERRED = tuple(INFERRED_FROM)
ARMS = (UNTRAINED, *TRAINED, *INFERRED)


def tracked_masks(module: GLUSModule, plan) -> MaskFn:
    """Masks of each expression tracked from keyframes by ``plan(evidence, record, expressions) -> (prompts,
    keyframes)``, given the video's evidence (every frame's prompts, features and memoryless masks)."""
    cfg = module.cfg

    @torch.no_grad()
    def masks_of(record: VideoRecord, expressions: list[Expression]) -> list[np.ndarray]:
        video = record_video(record)
        evidence = module.frame_evidence(video_batch(video, expressions, cfg.data.num_context, cfg.data.image_size))
        prompts, keyframes = plan(evidence, record, expressions)
        logits = track_from_keyframes(module.segmenter, evidence.features, prompts, keyframes).mask_logits
        return [masks_from_logits(lg, video.size, cfg.mask_threshold).cpu().numpy() for lg in logits]

    return masks_of


def oracle_keyframes(module: GLUSModule, evidence, record: VideoRecord, expressions: list[Expression]) -> list[int]:
    """Each expression's frame whose memoryless mask best matches the ground truth."""
    frames = range(record.num_frames)
    truth = DenseTargets([torch.from_numpy(np.stack([record.expression_mask(x, i) for i in frames])) for x in expressions])
    return keyframe_targets(evidence.mask_logits, truth, module.cfg.mask_threshold).argmax(1).tolist()


def prompted_at(module: GLUSModule, prompts: torch.Tensor, keyframes: list[int]) -> torch.Tensor:
    """``prompts [N, T, D]`` with every frame's prompt but each track's keyframe withheld (SAM2's not-a-point token, as
    ``segmenter.memory.unprompted_frames`` trains): the track then has only its memory after the keyframe."""
    withheld = torch.ones(prompts.shape[:2], dtype=torch.bool, device=prompts.device)
    withheld[torch.arange(len(keyframes)), keyframes] = False
    return module.segmenter.withhold_prompts(prompts, withheld)


def oracle_keyframe_masks(module: GLUSModule) -> MaskFn:
    """Masks tracked from each expression's best memoryless frame against the ground truth (an upper bound)."""
    return tracked_masks(module, lambda ev, record, xs: (ev.prompts, oracle_keyframes(module, ev, record, xs)))


def prompt_only_masks(module: GLUSModule, keyframes_of) -> MaskFn:
    """Masks tracked from each expression's keyframe (``keyframes_of(evidence, record, expressions)``) with only that
    frame's prompt, forward and backward: what the memory bank carries on its own."""

    def plan(evidence, record: VideoRecord, expressions: list[Expression]):
        keyframes = keyframes_of(evidence, record, expressions)
        return prompted_at(module, evidence.prompts, keyframes), keyframes

    return tracked_masks(module, plan)


def first_prompt_masks(module: GLUSModule) -> MaskFn:
    """Tracked from the first frame's prompt alone (SAM2's semi-supervised setting)."""
    return prompt_only_masks(module, lambda evidence, record, expressions: [0] * len(expressions))


def oracle_keyframe_prompt_masks(module: GLUSModule) -> MaskFn:
    """Tracked from the oracle keyframe's prompt alone: where the memory carries the track, the frame it starts from
    matters."""
    return prompt_only_masks(module, lambda evidence, record, expressions: oracle_keyframes(module, evidence, record, expressions))


def run_seed(arms: list[str], seed: int, overrides: list[str], out: Path, videos: int | None) -> None:
    """Train and score the arms of one seed that ``out`` does not hold yet."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    todo = [arm for arm in arms if not (out / f"{arm}_s{seed}.json").exists()]
    needed = {INFERRED_FROM[arm] for arm in todo if arm in INFERRED}
    models = [arm for arm in (UNTRAINED, *TRAINED) if arm in todo or arm in needed]
    for arm in models:
        arm_overrides = [*overrides, *TRAINED.get(arm, []), f"seed={seed}", f"data.seed={seed}", f"name=ablation_{arm}_s{seed}"]
        marker = out / f"{arm}_s{seed}.checkpoint"  # written once the arm's training has finished
        if arm == UNTRAINED:  # load_module seeds: the initialisation `glus fit` starts from
            marker.write_text("")
        elif not marker.exists():
            planned = compose(arm_overrides)
            interrupted = list(Path(planned.run_dir, planned.name).glob("version_*/checkpoints/last.ckpt"))
            resume = ["ckpt_path=last"] if interrupted else []
            runner.fit(compose([*arm_overrides, *resume]), [ShuffledExpressions(seed)] if arm == "shuffled" else None,
                       MODULES.get(arm, GLUSModule))
            marker.write_text(runner.resolve_checkpoint(compose([*arm_overrides, "ckpt_path=last"]))[0])
        checkpoint = marker.read_text() or None
        cfg = compose([*arm_overrides, f"ckpt_path={checkpoint or 'null'}"])
        urls = sorted({url for entry in cfg.data.val for url in resolve_shards(cfg.data.root, entry.shards)})
        records = list(islice(shard_records(urls), videos))
        module = load_module(cfg, device, MODULES.get(arm, GLUSModule))
        scored = {arm: (model_masks, records)}
        if arm in INFERRED_ON:
            no_bank = [*arm_overrides, f"ckpt_path={checkpoint}", "segmenter.memory.bank=false"]
            memory_off = lambda m, c=no_bank: model_masks(load_module(compose(c), device))  # the same checkpoint, no bank
            needs_hard = any(INFERRED_FROM.get(name) == arm and "hard_start" in name for name in todo)
            hard = [hard_start(record) for record in records] if needs_hard else []  # re-encodes the first frames
            inferences = {"swapped_text": (lambda m: swapped_text(model_masks(m)), records),
                          "memory_off": (memory_off, records),
                          "first_prompt_only": (first_prompt_masks, records),
                          "oracle_keyframe_prompt_only": (oracle_keyframe_prompt_masks, records),
                          "hard_start_first_prompt_only": (first_prompt_masks, hard),
                          "hard_start_oracle_keyframe_prompt_only": (oracle_keyframe_prompt_masks, hard),
                          "oracle_keyframes": (oracle_keyframe_masks, records),
                          "hard_start": (model_masks, hard),
                          "hard_start_oracle_keyframes": (oracle_keyframe_masks, hard),
                          # keyframes last: refinement fits the module's frame scorer and switches keyframes on
                          "keyframes": (refined_keyframe_masks, records),
                          "hard_start_keyframes": (refined_keyframe_masks, hard)}
            scored |= {inferred_arm(arm, name): how for name, how in inferences.items()}
        for name, (masks, scored_records) in scored.items():
            if name in todo:
                result = evaluate(masks(module), scored_records)
                (out / f"{name}_s{seed}.json").write_text(json.dumps({"arm": name, "seed": seed, "checkpoint": checkpoint, **result}))
                print(f"{name} seed {seed}: " + "  ".join(f"{c} {result[c]:.4f}" for c in COLUMNS), flush=True)


def refined_keyframe_masks(module: GLUSModule):
    """The module's masks from refined keyframes (GLUS self-refinement): its frame scorer fitted on training videos
    first, as ``glus refine-scores`` does (once: a module with keyframes on has it fitted)."""
    cfg = module.cfg
    if not cfg.inference.keyframes:
        with torch.enable_grad():
            stats = fit_scorer(module.frame_scorer, collect_targets(module, training_videos(cfg.data, cfg.refine.videos)),
                               cfg.refine.steps, cfg.refine.lr)
        print(format_stats(stats), flush=True)
        cfg.inference.keyframes = True
    return model_masks(module)


def print_table(out: Path, arms: tuple[str, ...] | list[str] = ARMS) -> dict[str, list[dict]]:
    """One row per arm: mean+-std over the seeds in ``out`` of every column; returns the results per arm."""
    results: dict[str, list[dict]] = {}
    for path in sorted(out.glob("*_s*.json")):
        result = json.loads(path.read_text())
        results.setdefault(result["arm"], []).append(result)
    print(f"\n| arm | seeds | {' | '.join(COLUMNS)} |\n|---|---:|" + "---:|" * len(COLUMNS))
    for arm in arms:
        rows = results.get(arm, [])
        if rows:
            cells = [mean_spread([row.get(c, float("nan")) for row in rows]) for c in COLUMNS]
            print(f"| {arm} | {len(rows)} | {' | '.join(cells)} |")
    return results


def run_cli(doc: str, choices: list[str], out: str, default: list[str] | None = None) -> dict[str, list[dict]]:
    """The experiments' shared command line: run the chosen arms (``default``: all ``choices``) for each seed, print
    the table of what ``--out`` holds and return it per arm."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=choices, default=default or choices)
    parser.add_argument("--videos", type=int, default=None, help="score only the first N validation videos")
    parser.add_argument("--out", type=Path, default=Path(out), help="one JSON per (arm, seed)")
    parser.add_argument("--table-only", action="store_true", help="print the table of what --out holds")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for seed in args.seeds:
            run_seed(args.arms, seed, args.overrides, args.out, args.videos)
    return print_table(args.out, choices)
