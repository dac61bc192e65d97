"""``glus refine-scores``: keyframe self-refinement of a checkpoint (or of imported weights), written as a checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from datamodules.datamodule import RefVOSDataModule
from glus_lightning.checkpoints import state as ckpt_state
from glus_lightning.checkpoints.checkpoint_io import atomic_torch_save, load_checkpoint
from glus_lightning.config import ConfigError, compose_or_report
from glus_lightning.inference.predictor import load_module
from glus_lightning.keyframes.refinement import collect_targets, fit_scorer, format_stats, training_videos
from glus_lightning.module import GLUSModule


def configure_refine_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides; ckpt_path=... is the model to refine")
    parser.add_argument("--out", type=Path, default=None,
                        help="checkpoint to write (default: <ckpt_path stem>-refined.ckpt, or <run_dir>/<name>/refined.ckpt)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def default_out(cfg: DictConfig) -> Path:
    if cfg.ckpt_path is not None:
        ckpt = Path(cfg.ckpt_path)
        return ckpt.with_name(f"{ckpt.stem}-refined.ckpt")
    return Path(cfg.run_dir, cfg.name, "refined.ckpt")


def refined_checkpoint(module: GLUSModule, ckpt_path: str | None) -> dict[str, Any]:
    """``ckpt_path``'s checkpoint (optimizer and loops kept, so training can resume from it) with the fitted scorer;
    without one, a weights-only checkpoint of the module's trainable state (e.g. imported published weights)."""
    if ckpt_path is not None:
        checkpoint = load_checkpoint(ckpt_path)
    else:
        checkpoint = {
            "pytorch-lightning_version": L.__version__,
            "hyper_parameters": {"config": OmegaConf.to_container(module.cfg, resolve=True)},
            "state_dict": {k: v.cpu() for k, v in ckpt_state.trainable_state(module, module.state_dict()).items()},
        }
    checkpoint["state_dict"].update({k: v.cpu() for k, v in module.frame_scorer.state_dict(prefix="frame_scorer.").items()})
    return checkpoint


def _check_not_last(cfg: DictConfig) -> None:
    if cfg.ckpt_path == "last":
        raise ConfigError("ckpt_path=last is for resuming `glus fit`; give the checkpoint file to refine")


def run_refine(args: argparse.Namespace) -> int:
    """``glus refine-scores``: measure, write the targets, fit the scorer, write a checkpoint that holds it."""
    cfg = compose_or_report("refine-scores", args.overrides, _check_not_last)
    if cfg is None:
        return 2
    out = args.out or default_out(cfg)
    try:
        RefVOSDataModule(cfg.data).prepare_data()  # the built-in synthetic data is generated if missing
        module = load_module(cfg, "cuda" if torch.cuda.is_available() else "cpu")
        targets = collect_targets(module, training_videos(cfg.data, cfg.refine.videos), progress=not args.no_progress)
        targets_file = targets.save(out.with_suffix(".targets.safetensors"))
        stats = fit_scorer(module.frame_scorer, targets, cfg.refine.steps, cfg.refine.lr)
        atomic_torch_save(refined_checkpoint(module, cfg.ckpt_path), out)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"glus refine-scores: {err}", file=sys.stderr)
        return 2
    print(format_stats(stats))
    print(f"targets: {targets_file}\ncheckpoint: {out}")
    print(f"next: glus validate {' '.join(a for a in args.overrides if not a.startswith('ckpt_path='))} ckpt_path={out} inference.keyframes=true")
    return 0
