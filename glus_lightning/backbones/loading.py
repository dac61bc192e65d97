"""Hugging Face checkpoints in, ready to train: checks, 4-bit loading, added tokens, LoRA and what is frozen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from glus_lightning.config import BackboneConfig, ConfigError, QuantizationConfig
from glus_lightning.precision import torch_dtype

from .adapters import with_lora
from .token_rows import train_only_rows

if TYPE_CHECKING:
    from peft import PeftModel

TOKEN_ROWS = ("all", "added")
GRADIENT_CHECKPOINTING = {"use_reentrant": False}  # frozen embeddings: reentrant checkpoints would drop LoRA grads


def plain(node: Any) -> Any:
    """OmegaConf nodes as plain Python containers (configs may come as dataclasses or DictConfigs)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def tiny_section(tiny: dict[str, Any], key: str) -> Any:
    if key not in tiny:
        raise ConfigError(f"backbone.tiny has no {key!r} (needed to build the tiny random-init model); it has: {sorted(tiny)}")
    return tiny[key]


def checkpoint_config(path: Path, family: str, model_type: str) -> dict[str, Any]:
    """``path``'s config.json, checked to be a Hugging Face checkpoint of ``model_type``."""
    expected = f"a Hugging Face {family} checkpoint directory (config.json model_type {model_type!r})"
    config_file = path / "config.json"
    if not config_file.is_file():
        problem = "has no config.json" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"backbone.path={str(path)!r} {problem}; expected {expected}")
    config = json.loads(config_file.read_text())
    found = config.get("model_type")
    if found != model_type:
        raise ConfigError(
            f"backbone.path={str(path)!r}: config.json says model_type={found!r}, "
            f"but backbone.family={family!r} expects {expected}"
        )
    return config


def quantized_device_map(load_device: torch.device | None) -> dict[str, int] | None:
    """Where 4-bit weights load: they are quantised while loading, onto the device they will run on.

    ``load_device`` is the strategy's root device (``runner`` passes it): under DDP each rank's own GPU, known from
    the cluster environment (LOCAL_RANK, SLURM_LOCALID) before Lightning sets the CUDA device, when
    ``torch.cuda.current_device()`` is still GPU 0 on every rank. Without one: the current GPU, else the CPU.
    """
    if load_device is None:
        return {"": torch.cuda.current_device()} if torch.cuda.is_available() else None
    if load_device.type != "cuda":
        return None
    return {"": load_device.index if load_device.index is not None else torch.cuda.current_device()}


def quantization_config(q: QuantizationConfig | DictConfig, unquantized_modules: list[str]) -> BitsAndBytesConfig:
    """NF4/FP4 weights for every linear layer outside ``unquantized_modules``."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype, "backbone.quantization.compute_dtype"),
        llm_int8_skip_modules=unquantized_modules,
    )


def add_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, token: str) -> int:
    """``token``'s id, added to ``tokenizer`` (and a row to ``model``'s embeddings) when it lacks it."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token])
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # new rows are drawn from the old embeddings' mean and covariance (transformers' default); its warning that it
        # does so offers a switch our configs do not expose, so it is kept to this call
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model.resize_token_embeddings(len(tokenizer))
        finally:
            hf_logging.set_verbosity(verbosity)
    return tokenizer.convert_tokens_to_ids(token)


def trainable(
    hf: PreTrainedModel,
    cfg: BackboneConfig | DictConfig,
    *,
    language_model: str,
    vision_module: str,
    projector_module: str,
    unused_vision: list[nn.Parameter],
    added_rows: list[int],
) -> PreTrainedModel | PeftModel:
    """``hf`` with only the parts ``cfg`` trains left trainable: LoRA on ``language_model`` (wrapped by peft when
    enabled), the vision tower less ``unused_vision`` (parameters the forward never reaches), projector, embeddings
    and LM head (every row, or only ``added_rows``, the ids of the tokens added here, per ``train_token_rows``).

    Frozen weights stay in backbone.dtype (or NF4); GLUSModule casts what trains to fp32 (precision.py), unlike
    peft's prepare_model_for_kbit_training, which would also upcast the frozen vision tower and LM head.
    """
    hf.requires_grad_(False)
    # Hugging Face's checkpointing and peft each make every input embedding's output require grad (for reentrant
    # checkpoints, which we do not use): a frozen vision tower then keeps each block's input for a backward that
    # changes nothing (120 MiB per block at Qwen2.5-VL-7B's shapes). Each call's hooks are removed right after it,
    # so only what trains, or feeds what trains, keeps a graph.
    if cfg.gradient_checkpointing:
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=GRADIENT_CHECKPOINTING)
        hf.disable_input_require_grads()
    model = with_lora(hf, cfg.lora, language_model, cfg.quantization.load_in_4bit) if cfg.lora.enabled else hf
    hf.disable_input_require_grads()
    hf.get_submodule(vision_module).requires_grad_(cfg.train_vision_tower)
    for param in unused_vision:  # never reached by the forward: trained, they idle under DDP
        param.requires_grad_(False)
    hf.get_submodule(projector_module).requires_grad_(cfg.train_projector)  # after: Qwen's sits in the tower
    if cfg.train_token_rows not in TOKEN_ROWS:
        raise ConfigError(f"backbone.train_token_rows={cfg.train_token_rows!r} is not valid; valid: {', '.join(TOKEN_ROWS)}")
    if cfg.train_token_rows == "added" and (cfg.train_embeddings or cfg.train_lm_head):
        if not (cfg.train_embeddings and cfg.train_lm_head):
            raise ConfigError("backbone.train_token_rows=added trains the added rows of both the embeddings and the LM head: "
                              "set train_embeddings and train_lm_head both true (or both false)")
        train_only_rows(hf, added_rows)
    else:
        if cfg.train_embeddings:
            hf.get_input_embeddings().requires_grad_(True)
        if cfg.train_lm_head:
            hf.get_output_embeddings().requires_grad_(True)
    return model
