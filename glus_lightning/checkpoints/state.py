"""What a training checkpoint holds of the model: only what training changes.

Frozen weights (the pretrained MLLM and SAM2 parts, or a tiny model's seeded random init) are rebuilt from the
config when the module is constructed, so a checkpoint keeps the trainable parameters (LoRA adapters, heads,
decoder, trained embeddings) and the buffers. Loading checks that the checkpoint fits the module: same backbone
family, every trainable parameter present, no unknown key.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def trainable_state(module: nn.Module, state_dict: dict[str, Any], also: tuple[str, ...] = ()) -> dict[str, Any]:
    """The entries of ``state_dict`` (``module``'s) that are trainable parameters or buffers, or start with a prefix
    in ``also`` (parameters changed outside the optimiser, e.g. the self-refined frame scorer)."""
    keep = {name for name, p in module.named_parameters() if p.requires_grad} | {name for name, _ in module.named_buffers()}
    return {k: v for k, v in state_dict.items() if k in keep or k.startswith(also)}


def check_checkpoint_fits(module: nn.Module, checkpoint: dict[str, Any], family: str, optional: tuple[str, ...] = ()) -> None:
    """Raise ValueError naming what differs when ``checkpoint`` was not written by a module like ``module``.

    Keys starting with a prefix in ``optional`` are training-only state (the contrastive bank): a model built without
    it ignores them, and a model with it that finds none starts it empty. A kept entry must have the model's shape.
    """
    config = checkpoint.get("hyper_parameters", {}).get("config", {})
    saved = config.get("backbone", {}).get("family")
    if saved != family:
        raise ValueError(
            f"checkpoint was trained with backbone.family={saved!r} but this model is backbone.family={family!r}; "
            f"use backbone={saved} (or the config saved with the checkpoint)"
        )
    keys = set(checkpoint.get("state_dict", {}))
    if not keys:  # FSDP ranks other than 0 see an empty dict: the strategy loaded it already
        return
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(trainable - keys)
    own = module.state_dict()
    unknown = sorted(k for k in keys - set(own) if not k.startswith(optional))
    if missing or unknown:
        raise ValueError(
            "checkpoint does not fit this model (different LoRA / training switches?): "
            f"{len(missing)} trainable parameters missing {missing[:5]}, {len(unknown)} unknown keys {unknown[:5]}"
        )
    saved_state = checkpoint["state_dict"]
    reshaped = sorted(k for k in keys & set(own) if tuple(saved_state[k].shape) != tuple(own[k].shape))
    if reshaped:
        raise ValueError(
            "checkpoint does not fit this model (other sizes, e.g. loss.contrastive_bank_size?): "
            + ", ".join(f"{k} {tuple(saved_state[k].shape)} vs {tuple(own[k].shape)}" for k in reshaped[:5])
        )
