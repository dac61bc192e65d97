"""Builds the Lightning objects of a run from the resolved config and runs fit / validate / test."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from callbacks.mask_overlay import MaskOverlayLogger
from callbacks.progress import PROGRESS_FILE, StepProgressBar, TextProgress
from datamodules.datamodule import RefVOSDataModule
from glus_lightning.checkpoints.checkpoint_io import AtomicCheckpointIO
from glus_lightning.checkpoints.resume import DataEpochFromLoop, LastCheckpoint, StepSeed, ValidateLastStep
from glus_lightning.config import ConfigError, to_yaml
from glus_lightning.evaluation import EvaluationResult, write_csv
from glus_lightning.keyframes.callback import KeyframeSelfRefinement
from glus_lightning.module import GLUSModule
from glus_lightning.precision import check_run_config
from glus_lightning.strategies import GatheredEvaluation, build_strategy
from glus_lightning.text_warmup import warm_up_text

CONFIG_FILE = "config.yaml"


def resolve_checkpoint(cfg: DictConfig) -> tuple[str | None, int | None]:
    """The checkpoint to resume from and the log version it belongs to (``ckpt_path: last`` finds the newest)."""
    if cfg.ckpt_path is None:
        return None, None
    if cfg.ckpt_path != "last":
        if not Path(cfg.ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path!r}: no such checkpoint file")
        return str(cfg.ckpt_path), None
    candidates = sorted(Path(cfg.run_dir, cfg.name).glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError(f"ckpt_path=last: no {cfg.run_dir}/{cfg.name}/version_*/checkpoints/last.ckpt to resume")
    last = candidates[-1]
    return str(last), int(last.parents[1].name.removeprefix("version_"))


def quiet_dependencies() -> None:
    """Filter, by message and origin, deprecations inside the pinned dependencies that a user cannot act on."""
    # Lightning 2.6's CombinedLoader builds torch.utils._pytree.LeafSpec, deprecated in torch 2.14
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"lightning\.pytorch\.utilities\._pytree")


STEP_KEYS = ("val_every_n_steps", "checkpoint_every_n_steps")  # trainer keys of ours, not Lightning Trainer arguments


def trainer_arguments(trainer: DictConfig) -> dict:
    """Lightning Trainer arguments of ``cfg.trainer``: the cadences in optimiser steps become Lightning's micro-batch
    count across epochs (``check_val_every_n_epoch=None``), which counts optimiser steps because every epoch is whole
    accumulation cycles (``datamodules.datamodule.rank_batches``); it need not fit in one epoch, so any number of
    ranks can start."""
    kwargs = OmegaConf.to_container(trainer)
    for key in STEP_KEYS:
        value = kwargs.pop(key)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"trainer.{key} must be a whole number of optimiser steps >= 1, got {value!r}")
    if not (isinstance(trainer.accumulate_grad_batches, int) and trainer.accumulate_grad_batches >= 1):
        raise ConfigError(f"trainer.accumulate_grad_batches must be an integer >= 1, got {trainer.accumulate_grad_batches!r}")
    # min_epochs=0: the fit loop may stop (and validate, ValidateLastStep) at max_steps inside the first epoch too
    return {**kwargs, "check_val_every_n_epoch": None, "val_check_interval": trainer.val_every_n_steps * trainer.accumulate_grad_batches,
            "min_epochs": 0}


def build_trainer(
    cfg: DictConfig, version: int | None = None, extra_callbacks: list[L.Callback] | None = None
) -> tuple[L.Trainer, TensorBoardLogger]:
    """The Trainer of a run: validation every ``trainer.val_every_n_steps`` optimiser steps and at the last (the best
    ``val/J&F`` checkpoint is kept), ``last.ckpt`` every ``trainer.checkpoint_every_n_steps``, after each validation and at the end.

    Progress in optimiser steps: a bar on a terminal, else a plain-text line every ``trainer.log_every_n_steps`` steps;
    the lines are appended to ``<log_dir>/progress.log`` either way."""
    arguments = trainer_arguments(cfg.trainer)
    logger = TensorBoardLogger(cfg.run_dir, name=cfg.name, version=version)
    log_dir = Path(logger.log_dir)
    val_every, last_step = cfg.trainer.val_every_n_steps, cfg.trainer.max_steps
    interactive = sys.stdout.isatty()
    callbacks = [
        ModelCheckpoint(dirpath=log_dir / "checkpoints", save_last=False, save_top_k=1, monitor="val/J&F", mode="max",
                        filename="step{step}-jf{val/J&F:.4f}", auto_insert_metric_name=False),
        LastCheckpoint(log_dir / "checkpoints", cfg.trainer.checkpoint_every_n_steps,
                       lambda step: step % val_every == 0 or step == last_step),
        ValidateLastStep(),
        LearningRateMonitor(logging_interval="step"),
        DataEpochFromLoop(),
        StepSeed(cfg.seed),
        MaskOverlayLogger(cfg.overlay_videos),
        GatheredEvaluation(),
        TextProgress(cfg.trainer.log_every_n_steps, log_dir / PROGRESS_FILE, echo=not interactive),
        *([StepProgressBar()] if interactive else []),
        *(extra_callbacks or []),
    ]
    check_run_config(cfg)
    quiet_dependencies()
    kwargs = {**arguments, "strategy": build_strategy(cfg.trainer), "enable_progress_bar": interactive}
    trainer = L.Trainer(**kwargs, plugins=[AtomicCheckpointIO()], logger=logger, callbacks=callbacks, default_root_dir=cfg.run_dir)
    return trainer, logger


def save_config(cfg: DictConfig, trainer: L.Trainer, log_dir: Path) -> None:
    """Print the resolved config and save it beside the run's logs (rank 0 only)."""
    if trainer.is_global_zero:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / CONFIG_FILE).write_text(to_yaml(cfg))
        print(f"Resolved config (saved to {log_dir / CONFIG_FILE}):\n{to_yaml(cfg)}")


def fit(cfg: DictConfig, extra_callbacks: list[L.Callback] | None = None,
        module_class: type[GLUSModule] = GLUSModule) -> dict[str, float]:
    """Train; returns the final model's validation scores (validated inside fit at its last step, ValidateLastStep; again
    here only when fit ran no step, e.g. resumed from a finished run); prints where the logs and checkpoints are. ``module_class``: a GLUSModule subclass (experiments)."""
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path, version = resolve_checkpoint(cfg)
    refinement = [KeyframeSelfRefinement(cfg.refine, cfg.data)] if cfg.inference.keyframes else []
    trainer, logger = build_trainer(cfg, version, [*refinement, *(extra_callbacks or [])])
    log_dir = Path(logger.log_dir)
    save_config(cfg, trainer, log_dir)
    datamodule = RefVOSDataModule(cfg.data)
    model = module_class(cfg, load_device=trainer.strategy.root_device)
    if cfg.text_warmup.steps > 0 and ckpt_path is None:  # a resumed run's checkpoint holds the warmed weights
        warm_up(model, cfg, trainer, logger)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    step, scores = model.last_validation or (None, None)
    if step != trainer.global_step:  # the final model is not validated yet (fit resumed a run that had finished)
        scores = next(iter(trainer.validate(model, datamodule=datamodule, weights_only=True)), None)
    if trainer.is_global_zero:
        last, best = (next(c for c in trainer.callbacks if isinstance(c, kind)) for kind in (LastCheckpoint, ModelCheckpoint))
        print(f"\nLogs: {log_dir}  (tensorboard --logdir {cfg.run_dir})")
        print(f"Checkpoints: last {last.last_model_path or '-'}  best {best.best_model_path or '-'}")
    return scores or {}


def warm_up(model: GLUSModule, cfg: DictConfig, trainer: L.Trainer, logger: TensorBoardLogger) -> None:
    """``text_warmup`` before the Trainer starts, on a data module of its own (the run's training data, its first
    passes). It runs before the processes of a multi-device run exist or each of them runs it again: every rank starts
    from the same seed and the same data (no process group yet: one rank's view), so all end with the same weights."""
    data = RefVOSDataModule(cfg.data)
    data.prepare_data()
    loader = data.train_dataloader()

    def passes():
        while True:
            empty = True
            for batch in loader:
                empty = False
                yield batch
            if empty:
                return

    progress = next(c for c in trainer.callbacks if isinstance(c, TextProgress))

    def report(line: str, scalars: dict[str, float], step: int) -> None:
        progress.write(line, echo=True)  # printed on a terminal too: no progress bar runs yet
        if trainer.is_global_zero:
            for name, value in scalars.items():
                logger.experiment.add_scalar(f"text_warmup/{name}", value, step)

    warm_up_text(model, passes(), cfg, report)


def validate(cfg: DictConfig, csv: str | Path | None = None) -> dict[str, float]:
    """J, F and J&F of the configured model (``ckpt_path`` loads trained weights) on the validation split.

    ``csv``: also write per-expression, per-video and overall scores there.
    """
    return _evaluate(cfg, "validate", csv)


def test(cfg: DictConfig, csv: str | Path | None = None) -> dict[str, float]:
    """Lightning's test loop over ``data.val``: ``test/J``, ``test/F``, ``test/J&F`` (and ``csv`` as in validate)."""
    return _evaluate(cfg, "test", csv)


def _evaluate(cfg: DictConfig, loop: str, csv: str | Path | None) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path, version = resolve_checkpoint(cfg)
    trainer, logger = build_trainer(cfg, version)
    save_config(cfg, trainer, Path(logger.log_dir))
    model = GLUSModule(cfg, load_device=trainer.strategy.root_device)
    results = getattr(trainer, loop)(model, datamodule=RefVOSDataModule(cfg.data), ckpt_path=ckpt_path, weights_only=True)
    if csv is not None and trainer.is_global_zero:
        print(f"Per-expression scores: {write_csv(EvaluationResult.from_expressions(model.expression_scores), csv)}")
    return results[0] if results else {}
