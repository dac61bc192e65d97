"""Configs saved with checkpoints and exports by earlier versions, read as today's schema.

A key added since a config was saved is filled with the value that computes what that run computed (not with
today's default, which may be another behaviour), and renamed or retyped keys are rewritten. Each entry says when.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from datamodules.synthetic import BEFORE_OPTIONS
from glus_lightning.config import GLUSConfig

ABSENT = object()

# keys added after a run could have been saved -> the value that reproduces the behaviour before they existed
ADDED: dict[str, Any] = {
    # 2026-12: memory-saving and reference-protocol switches
    "backbone.train_token_rows": "all",
    "backbone.image_resize": "squash",
    "prompt.join_context_images": False,
    "prompt.strip_period": False,
    "prompt.lowercase_expression": False,
    "segmenter.memory": {"backprop": "full", "conditioning_frame": True, "object_pointers": True,
                         "temporal_encoding": True, "eval_stride": 1, "gate_by_object_score": True, "encoder_input": "raw"},
    "loss.contrastive_positives": "batch",
    "loss.contrastive_negative_sampling": "hard_first",
    "loss.contrastive_min_negatives": 0,
    "loss.contrastive_min_anchors": 1,
    "loss.contrastive_push": "after",
    "loss.contrastive_bank_sources": None,
    "inference.decoding": "windowed",
    # 2026-12-04: the memory-bank ablation switch
    "segmenter.memory.bank": True,
    # 2026-12-04: query frames trained without their prompt (every frame was prompted)
    "segmenter.memory.unprompted_frames": 0.0,
    # 2026-12-04: the text warm-up before fit (none before)
    "text_warmup": {"steps": 0, "lr": 1.0e-3, "log_every_n_steps": 100},
}
# keys added to data.synthetic (filled only where a run generated the synthetic dataset)
ADDED_SYNTHETIC: dict[str, Any] = BEFORE_OPTIONS  # 2026-12-04: crowding, twins, naming and twin motion


def upgraded(saved: dict[str, Any] | DictConfig) -> DictConfig:
    """``saved`` (a resolved config of any earlier version) as a ``GLUSConfig`` of today."""
    cfg = OmegaConf.create(OmegaConf.to_container(saved, resolve=True) if isinstance(saved, DictConfig) else saved)
    backbone = cfg.get("backbone", {})
    if "prompt" in backbone and "prompt" not in cfg:  # 2026-12: the prompt became a config group of its own
        cfg.prompt = backbone.pop("prompt")
    if isinstance(backbone.get("image_token_pool"), int):  # 2026-12: k (k x k squares) became "<rows>x<cols>"
        k = backbone.image_token_pool
        backbone.image_token_pool = f"{k}x{k}"
    for key, value in ADDED.items():
        if OmegaConf.select(cfg, key, default=ABSENT) is ABSENT:
            OmegaConf.update(cfg, key, value, force_add=True)
    synthetic = OmegaConf.select(cfg, "data.synthetic", default=None)
    if synthetic is not None:
        for key, value in ADDED_SYNTHETIC.items():
            synthetic.setdefault(key, value)
    return OmegaConf.merge(OmegaConf.structured(GLUSConfig), cfg)
