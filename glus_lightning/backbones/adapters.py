"""LoRA on the language model only (via peft, imported when first needed), and folding it back into plain weights."""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from glus_lightning.config import LoraConfig

if TYPE_CHECKING:
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel

ADAPTER = "default"


@contextmanager
def peft_without_bitsandbytes(quantized: bool) -> Iterator[None]:
    """Run peft code (its import, ``get_peft_model``) without importing bitsandbytes, unless the model is quantised.

    peft imports bitsandbytes whenever it is installed: ``peft.helpers`` on ``import peft``, and LoRA's layer
    dispatch (``peft.tuners.lora.bnb``) on every ``get_peft_model``. That costs seconds and, on CPUs with AVX512-BF16,
    logs a kernel warning. While ``sys.modules["bitsandbytes"]`` is None, ``find_spec`` returns None and the import
    raises ImportError, both of which peft handles as "not installed". peft caches that answer (``is_bnb_available``
    and ``is_bnb_4bit_available`` are lru-cached), so the caches are cleared afterwards: a quantised model built later
    in the same process gets its 4-bit LoRA layers. A no-op once bitsandbytes is imported (a quantised model was
    loaded, which always imports it).
    """
    if quantized or "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]
        checks = sys.modules.get("peft.import_utils")
        for name in ("is_bnb_available", "is_bnb_4bit_available"):
            cached = getattr(checks, name, None)
            if hasattr(cached, "cache_clear"):
                cached.cache_clear()


def language_model_lora(lora: LoraConfig, language_model: str) -> PeftLoraConfig:
    """A peft config whose targets match only under ``language_model``: the vision towers of
    LLaVA and InternVL have identically named q_proj/v_proj layers that must stay untouched."""
    from peft import LoraConfig as PeftLoraConfig

    names = "|".join(re.escape(name) for name in lora.target_modules)
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=rf"{re.escape(language_model)}\..*\.({names})",
        bias="none",
    )


def with_lora(hf: PreTrainedModel, lora: LoraConfig, language_model: str, quantized: bool) -> PeftModel:
    """``hf`` wrapped by peft, with LoRA layers injected into the linear layers of ``language_model``."""
    with peft_without_bitsandbytes(quantized), warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` in every get_peft_model
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        from peft import get_peft_model

        return get_peft_model(hf, language_model_lora(lora, language_model))


def base_model(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside ``model``: peft's wrapper taken off, if it has one."""
    peft = sys.modules.get("peft")  # never imported: ``model`` cannot be a PeftModel
    return model.get_base_model() if peft is not None and isinstance(model, peft.PeftModel) else model


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s weights under their plain names, each LoRA update added to its base weight,
    so the result loads into the unadapted model class and computes what the adapted one does."""
    with peft_without_bitsandbytes(quantized=False):  # 4-bit weights cannot be merged (and have imported it already)
        from peft.tuners.lora import LoraLayer

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
