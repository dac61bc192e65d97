"""LoRA on the language model only, and folding it back into plain Hugging Face weights."""

from __future__ import annotations

import re

import torch
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from glus_lightning.config import LoraConfig

ADAPTER = "default"


def language_model_lora(lora: LoraConfig, language_model: str) -> PeftLoraConfig:
    """A peft config whose targets match only under ``language_model``: the vision towers of
    LLaVA and InternVL have identically named q_proj/v_proj layers that must stay untouched."""
    names = "|".join(re.escape(name) for name in lora.target_modules)
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=rf"{re.escape(language_model)}\..*\.({names})",
        bias="none",
    )


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s weights under their plain names, each LoRA update added to its base weight,
    so the result loads into the unadapted model class and computes what the adapted one does."""
    lora_layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    merged: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        owner, sep, leaf = key.partition(".base_layer.")
        if sep:
            if leaf == "weight":
                value = value + lora_layers[owner].get_delta_weight(ADAPTER).to(value.dtype)
            key = f"{owner}.{leaf}"
        merged[key] = value
    return merged
