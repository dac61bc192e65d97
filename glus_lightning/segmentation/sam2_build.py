"""Build ``SAM2Base`` from the ``sam2`` package's own YAML configs, load official weights, freeze per config.

Official sizes use the package config unchanged except for the image size, the number of memories and
SAM2's stability fallback; the "test" size is the tiny config shrunk (``TEST_SIZE_OVERRIDES``) so that
the same modules run on CPU in tests.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sam2.modeling.sam2_base import SAM2Base

from glus_lightning.config import SegmenterConfig

VERSIONS = ("sam2", "sam2.1")
SIZE_FILES = {"test": "t", "tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}

# The "test" size: the tiny config's modules with a 32-wide, 5-block Hiera, a 64-wide neck / mask decoder /
# memory attention and 16-wide memories (SAM2's 256 -> 64 memory compression, scaled down).
TEST_SIZE_OVERRIDES = [
    "model.image_encoder.trunk.embed_dim=32",
    "model.image_encoder.trunk.stages=[1,1,2,1]",
    "model.image_encoder.trunk.global_att_blocks=[3]",
    "model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    "model.image_encoder.neck.d_model=64",
    "model.image_encoder.neck.backbone_channel_list=[256,128,64,32]",
    "model.image_encoder.neck.position_encoding.num_pos_feats=64",
    "model.memory_attention.d_model=64",
    "model.memory_attention.num_layers=1",
    "model.memory_attention.layer.d_model=64",
    "model.memory_attention.layer.dim_feedforward=128",
    "model.memory_attention.layer.self_attention.embedding_dim=64",
    "model.memory_attention.layer.cross_attention.embedding_dim=64",
    "model.memory_attention.layer.cross_attention.kv_in_dim=16",
    "model.memory_encoder.out_dim=16",
    "model.memory_encoder.in_dim=64",
    "model.memory_encoder.mask_downsampler.embed_dim=64",
    "model.memory_encoder.position_encoding.num_pos_feats=16",
    "model.memory_encoder.fuser.layer.dim=64",
    "model.memory_encoder.fuser.num_layers=1",
]

# Which config flag trains each parameter of SAM2Base (by name prefix).
PARAM_GROUPS = {
    "train_image_encoder": ("image_encoder.",),
    "train_memory": (
        "memory_attention.", "memory_encoder.", "maskmem_tpos_enc", "no_mem_embed",
        "no_obj_embed_spatial", "obj_ptr_proj.", "obj_ptr_tpos_proj.", "no_obj_ptr",
    ),
    "train_mask_decoder": ("sam_mask_decoder.",),
}
# Always frozen: the prompt encoder (only its no-mask embedding is used, as in the reference, and its not-a-point
# token for frames trained without a prompt, segmenter.memory.unprompted_frames), the
# mask-input downsampler (unused: there are no mask prompts) and no_mem_pos_enc (unused: every official
# config adds no_mem_embed directly instead of attending to it).
FROZEN_PREFIXES = ("sam_prompt_encoder.", "mask_downsample.", "no_mem_pos_enc")


class SegmenterConfigError(ValueError):
    """A segmenter config value is invalid; the message names the key and what is valid."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the configured SAM2 architecture (another size or version)."""


def package_config_path(version: str, size: str) -> Path:
    """The sam2 package's YAML for this version and size (the test size starts from tiny)."""
    if version not in VERSIONS:
        raise SegmenterConfigError(f"segmenter.version={version!r}; valid: {', '.join(VERSIONS)}")
    if size not in SIZE_FILES:
        raise SegmenterConfigError(f"segmenter.size={size!r}; valid: {', '.join(SIZE_FILES)}")
    return Path(str(resources.files("sam2") / "configs" / version / f"{version}_hiera_{SIZE_FILES[size]}.yaml"))


def build_sam2(cfg: SegmenterConfig) -> SAM2Base:
    """Instantiate SAM2Base from the package config with this segmenter config's overrides."""
    if cfg.image_size <= 0 or cfg.image_size % 32:
        raise SegmenterConfigError(f"segmenter.image_size={cfg.image_size}: must be a positive multiple of 32 (Hiera stride)")
    if cfg.max_memories < 1:
        raise SegmenterConfigError(f"segmenter.max_memories={cfg.max_memories}: must be >= 1")
    stride_16 = cfg.image_size // 16
    overrides = [
        f"model.image_size={cfg.image_size}",
        f"model.num_maskmem={cfg.max_memories}",
        f"model.memory_attention.layer.self_attention.feat_sizes=[{stride_16},{stride_16}]",
        f"model.memory_attention.layer.cross_attention.feat_sizes=[{stride_16},{stride_16}]",
        f"model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability={str(cfg.multimask_fallback).lower()}",
    ]
    if cfg.size == "test":
        overrides = TEST_SIZE_OVERRIDES + overrides
    model_cfg = OmegaConf.merge(OmegaConf.load(package_config_path(cfg.version, cfg.size)), OmegaConf.from_dotlist(overrides))
    return instantiate(model_cfg.model, _recursive_=True)


def load_official_checkpoint(sam: SAM2Base, path: str, what: str) -> None:
    """Load an official ``{"model": state_dict}`` .pt strictly; ``what`` names the configured model in errors."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"segmenter.checkpoint={path!r} does not exist (resolved: {file.resolve()}); put the official {what} "
            "weights there or set segmenter.checkpoint=null for random init"
        )
    blob = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "model" not in blob:
        keys = sorted(blob)[:5] if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointMismatchError(f"{path}: expected an official SAM2 checkpoint {{'model': state_dict}}, found {keys}")
    state, expected = blob["model"], sam.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f"{path} does not fit {what} (a checkpoint of another size or version?): "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, "
            f"{len(mismatched)} shape mismatches {mismatched[:5]}"
        )
    sam.load_state_dict(state, strict=True)


def apply_freezing(sam: SAM2Base, cfg: SegmenterConfig) -> None:
    """Set ``requires_grad`` of every SAM2 parameter from the config's train_* flags."""
    for name, param in sam.named_parameters():
        flag = next((f for f, prefixes in PARAM_GROUPS.items() if name.startswith(prefixes)), None)
        if flag is None and not name.startswith(FROZEN_PREFIXES):
            raise RuntimeError(f"SAM2 parameter {name!r} is in no group of PARAM_GROUPS nor FROZEN_PREFIXES; assign it")
        param.requires_grad_(flag is not None and bool(getattr(cfg, flag)))
