"""Backbone families by name: ``build_backbone(cfg, prompt)`` picks the one ``cfg.family`` names."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from glus_lightning.config import BackboneConfig, ConfigError, PromptConfig

from .base import MLLMBackbone
from .internvl import InternVLBackbone
from .llava import LlavaBackbone
from .qwen2_5_vl import Qwen2_5_VLBackbone

BACKBONES: dict[str, type[MLLMBackbone]] = {cls.family: cls for cls in (LlavaBackbone, Qwen2_5_VLBackbone, InternVLBackbone)}


def build_backbone(
    cfg: BackboneConfig | DictConfig, prompt: PromptConfig | DictConfig, load_device: torch.device | None = None
) -> MLLMBackbone:
    """The backbone of ``cfg.family``: loaded from ``cfg.path``, or tiny random-init when it is None.

    ``prompt``: the conversation's wording (the config's ``prompt`` group). ``load_device``: where 4-bit (QLoRA) weights load, this rank's device (``loading.quantized_device_map``).
    """
    if cfg.family not in BACKBONES:
        raise ConfigError(f"backbone.family={cfg.family!r} is not a family; valid: {', '.join(BACKBONES)}")
    return BACKBONES[cfg.family](cfg, prompt, load_device)
