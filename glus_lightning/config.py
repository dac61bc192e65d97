"""Typed config schemas and the composition of the YAML groups in ``conf/``.

The dataclasses here only fix names and types: every default value lives in the YAML files
(``conf/`` is the single source of defaults). Composition order, later wins:
``conf/config.yaml`` -> the experiment's group choices (overridden by ``group=choice`` on the
command line) -> the experiment's own keys -> ``dotted.key=value`` overrides.

Inheritance: a file of any group may name a parent in its own group, ``defaults: {<group>: <parent>}``
(``experiment: glus_s`` in ``conf/experiment/glus_s_qlora.yaml``, ``segmenter: _memory`` in a segmenter file).
The parent is composed first, recursively, and the file's keys merge onto it; an experiment inherits its
parent's group choices too, its own ``defaults`` winning. One parent per file; a cycle or a parent that does
not exist is a ``ConfigError`` naming the file. A file whose name starts with ``_`` is a shared fragment: a
parent only, not a choice (``group_choices`` leaves it out, ``group=_name`` is refused).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

GROUPS = ("backbone", "prompt", "segmenter", "data", "trainer")


@dataclass
class LoraConfig:
    enabled: bool = MISSING
    r: int = MISSING
    alpha: int = MISSING
    dropout: float = MISSING
    target_modules: list[str] = MISSING


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = MISSING
    quant_type: str = MISSING  # "nf4" or "fp4"
    double_quant: bool = MISSING
    compute_dtype: str = MISSING  # "bfloat16", "float16", "float32"


@dataclass
class PromptConfig:
    """The conversation's wording, shared by every backbone family (conf/prompt/)."""

    context_instruction: str = MISSING  # after the context images, before the first query image
    query_templates: list[str] = MISSING  # each holds "{expression}"; training draws one per query, evaluation the first
    answer_templates: list[str] = MISSING  # each holds "[SEG]" once; drawn like the queries
    join_context_images: bool = MISSING  # context images back to back, then "\n" (the reference); else the family's separator after each
    strip_period: bool = MISSING  # drop one trailing "." of the expression, then surrounding whitespace
    lowercase_expression: bool = MISSING


@dataclass
class BackboneConfig:
    family: str = MISSING  # "llava", "qwen2_5_vl" or "internvl"
    path: str | None = MISSING  # local HF directory; None builds the tiny random-init model
    tiny: dict[str, Any] = field(default_factory=dict)  # size overrides of the tiny config
    dtype: str = MISSING
    image_size: int = MISSING  # vision tower input size
    image_token_pool: str = MISSING  # "<rows>x<cols>" patch tokens averaged into one, in raster order ("1x1": off)
    image_resize: str = MISSING  # "squash" (the whole frame) or "center_crop" (its centre square, as CLIPImageProcessor)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    train_embeddings: bool = MISSING
    train_lm_head: bool = MISSING
    train_token_rows: str = MISSING  # "all" (the reference) or "added": only the rows of tokens added here ([SEG])
    train_projector: bool = MISSING
    train_vision_tower: bool = MISSING
    gradient_checkpointing: bool = MISSING


@dataclass
class MemoryConfig:  # conf/segmenter/_memory.yaml explains each; the GLUS reference's values in glus_s_released
    backprop: str = MISSING  # "full", "checkpointed" or "none": gradients through the memory bank
    conditioning_frame: bool = MISSING
    object_pointers: bool = MISSING
    temporal_encoding: bool = MISSING
    eval_stride: int = MISSING
    gate_by_object_score: bool = MISSING
    encoder_input: str = MISSING  # "raw" or "conditioned"
    bank: bool = MISSING  # false: no memory attention (an ablation)
    unprompted_frames: float = MISSING  # training: chance that a query frame after a window's first gets no prompt


@dataclass
class SegmenterConfig:
    size: str = MISSING  # "test", "tiny", "small", "base_plus", "large"
    version: str = MISSING  # "sam2" or "sam2.1"
    checkpoint: str | None = MISSING  # official .pt file; None keeps random init
    dtype: str = MISSING  # frozen weights' dtype; trainable parameters are always float32 (glus_lightning/precision.py)
    image_size: int = MISSING
    max_memories: int = MISSING
    train_image_encoder: bool = MISSING
    train_memory: bool = MISSING  # memory attention + memory encoder
    train_mask_decoder: bool = MISSING
    multimask_fallback: bool = MISSING  # SAM2's stability fallback at inference
    memory: MemoryConfig = field(default_factory=MemoryConfig)


@dataclass
class DatasetSource:
    name: str = MISSING
    shards: str = MISSING  # brace pattern or glob of .tar files
    weight: float = MISSING


@dataclass
class SyntheticConfig:
    num_train: int = MISSING
    num_val: int = MISSING
    frames: int = MISSING
    size: int = MISSING
    seed: int = MISSING
    objects: list[int] = MISSING  # [min, max] objects per video
    lookalike: float = MISSING  # chance an object copies an earlier one's looks but one attribute
    twins: float = MISSING  # chance that a video holds a pair of twins
    naming: str = MISSING  # shortest: the fewest words that pick an object; colour: the fewest that name its colour too
    twin_motion: str = MISSING  # crossing: twins move apart throughout; settled: only before the middle frame


@dataclass
class DataConfig:
    root: str = MISSING  # where prepared shards live
    synthetic: SyntheticConfig | None = MISSING  # set: the built-in dataset is generated under root if missing
    train: list[DatasetSource] = MISSING
    val: list[DatasetSource] = MISSING
    num_context: int = MISSING
    num_query: int = MISSING
    max_expressions: int = MISSING
    image_size: int = MISSING  # frames are squashed to this square size (the segmenter's)
    batch_size: int = MISSING
    num_workers: int = MISSING
    samples_per_epoch: int = MISSING  # training stream is resampled, so an epoch is a count
    shuffle_buffer: int = MISSING
    seed: int = MISSING
    expression_sampling: str = MISSING  # "uniform" or "pairs" (a same-object positive, then other objects)


@dataclass
class LossConfig:
    ce_weight: float = MISSING
    bce_weight: float = MISSING
    dice_weight: float = MISSING
    contrastive_weight: float = MISSING
    contrastive_temperature: float = MISSING  # InfoNCE temperature on cosine similarity
    contrastive_negatives: int = MISSING  # negatives per anchor: at most this many (hard_first), exactly (uniform)
    contrastive_bank_size: int = MISSING  # FIFO bank of past [SEG] embeddings, synchronised across ranks, checkpointed
    contrastive_positives: str = MISSING  # "batch" (every one in the batch) or "bank" (one drawn, the reference)
    contrastive_negative_sampling: str = MISSING  # "hard_first" or "uniform_with_replacement" (the reference)
    contrastive_min_negatives: int = MISSING  # skip an anchor with fewer negative candidates (0: never)
    contrastive_min_anchors: int = MISSING  # the term is zero with fewer valid anchors
    contrastive_push: str = MISSING  # "after" or "before" the loss (the reference): the step's rows enter the bank
    contrastive_bank_sources: list[str] | None = MISSING  # datasets whose rows enter the bank; None: every dataset
    object_weight: float = MISSING  # SAM2's object-presence head (BCE: is the target non-empty in the frame)
    iou_weight: float = MISSING  # SAM2's IoU-prediction head (L1 to the IoU its mask achieves)
    ce_only_seg: bool = MISSING  # CE on [SEG] targets only (reference) or on every answer token


@dataclass
class OptimConfig:
    lr: float = MISSING
    betas: list[float] = MISSING
    weight_decay: float = MISSING
    warmup_steps: int = MISSING
    segmenter_lr: float | None = MISSING  # None: same as lr


@dataclass
class TrainerConfig:
    accelerator: str = MISSING
    devices: Any = MISSING
    num_nodes: int = MISSING
    strategy: str = MISSING
    precision: str = MISSING
    max_steps: int = MISSING
    accumulate_grad_batches: int = MISSING
    gradient_clip_val: float = MISSING
    val_every_n_steps: int = MISSING  # validate (and refit the keyframe scorer) every N optimiser steps
    checkpoint_every_n_steps: int = MISSING  # write last.ckpt every N optimiser steps (also after each validation and at the end)
    log_every_n_steps: int = MISSING
    num_sanity_val_steps: int = MISSING


@dataclass
class InferenceConfig:
    window: int = MISSING  # query frames per backbone call when segmenting a whole video
    kv_cache: bool = MISSING  # encode the shared prompt prefix once per video and reuse its key/value cache
    decoding: str = MISSING  # "windowed" (teacher-forced windows of query frames) or "sliding" (the reference's per frame)
    overlay: str = MISSING  # "gif", "mp4" or "none": the overlay `glus predict` draws for people to look at
    overlay_fps: int = MISSING
    overlay_alpha: float = MISSING  # opacity of the mask colour in the overlay
    keyframes: bool = MISSING  # start at the best-scored frame and propagate both ways (needs a refined frame scorer)


@dataclass
class RefineConfig:
    """Keyframe self-refinement: the frame scorer learns the IoU the model itself reaches on training frames."""

    videos: int = MISSING  # training videos scored per refinement (all their expressions and frames)
    steps: int = MISSING  # optimiser steps of the scorer per refinement
    lr: float = MISSING
    hidden: int = MISSING  # width of the scorer's hidden layer


@dataclass
class TextWarmupConfig:
    """Before fit, the MLLM learns to carry each sentence in its [SEG] prompts (glus_lightning/text_warmup.py)."""

    steps: int = MISSING  # 0: none
    lr: float = MISSING
    log_every_n_steps: int = MISSING


@dataclass
class GLUSConfig:
    experiment: str = MISSING
    seed: int = MISSING
    run_dir: str = MISSING  # logs, the saved config and checkpoints go under run_dir/name/version
    name: str = MISSING
    ckpt_path: str | None = MISSING  # "last" resumes the latest checkpoint of this run
    init_weights: str | None = MISSING  # safetensors of GLUSModule tensors copied in at build (imported [SEG] MLP)
    mask_threshold: float = MISSING
    overlay_videos: int = MISSING  # validation videos drawn as mask overlays in TensorBoard
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    text_warmup: TextWarmupConfig = field(default_factory=TextWarmupConfig)


class ConfigError(ValueError):
    """A config key, value or group choice is wrong; the message names it and what is valid."""


def conf_dir() -> Path:
    """The ``conf/`` directory: ``$GLUS_CONF_DIR`` if set, else the one beside the package."""
    return Path(os.environ.get("GLUS_CONF_DIR", Path(__file__).resolve().parents[1] / "conf"))


def group_choices(group: str) -> list[str]:
    """The selectable files of a group (``_``-prefixed shared fragments left out)."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml") if not p.stem.startswith("_"))


def _load_yaml(path: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err


def _group_file(group: str, choice: str) -> Path:
    path = conf_dir() / group / f"{choice}.yaml"
    if choice.startswith("_") or not path.is_file():
        raise ConfigError(f"{group}={choice!r} is not a choice; valid: {', '.join(group_choices(group))}")
    return path


def _load_inherited(group: str, path: Path, chain: tuple[Path, ...] = ()) -> tuple[DictConfig, dict[str, str]]:
    """A group file merged onto the parent its ``defaults`` names (recursively), and its inherited group choices.

    ``chain``: the files that inherit from this one, to report a cycle.
    """
    cfg = _load_yaml(path)
    defaults = cfg.pop("defaults", None)
    if defaults is not None and not isinstance(defaults, DictConfig):
        raise ConfigError(f"{path}: defaults must map group: choice, got {defaults!r}")
    choices: dict[str, str] = OmegaConf.to_container(defaults) if defaults is not None else {}  # type: ignore[assignment]
    allowed = (*GROUPS, "experiment") if group == "experiment" else (group,)
    unknown = sorted(set(choices) - set(allowed))
    if unknown:
        raise ConfigError(f"{path}: defaults names unknown groups {unknown}; valid: {', '.join(allowed)}")
    parent = choices.pop(group, None)
    if parent is None:
        return cfg, choices
    parent_path = conf_dir() / group / f"{parent}.yaml"
    if parent_path in (*chain, path):
        raise ConfigError(f"inheritance cycle: {' -> '.join(str(p) for p in (*chain, path, parent_path))}")
    if not parent_path.is_file():
        names = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
        raise ConfigError(f"{path}: defaults {group}: {parent!r} names no file in {path.parent}; valid: {', '.join(names)}")
    parent_cfg, inherited = _load_inherited(group, parent_path, (*chain, path))
    return OmegaConf.merge(parent_cfg, cfg), {**inherited, **choices}  # type: ignore[return-value]


GROUP_SCHEMAS = {"backbone": BackboneConfig, "prompt": PromptConfig, "segmenter": SegmenterConfig, "data": DataConfig, "trainer": TrainerConfig}


def load_group(group: str, choice: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """One group's YAML (with its parents) validated against its schema, to build a component on its own (tests, tools)."""
    group_cfg, _ = _load_inherited(group, _group_file(group, choice))
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(GROUP_SCHEMAS[group]), group_cfg, OmegaConf.from_dotlist(list(overrides)))
    except ConfigKeyError as err:
        raise ConfigError(f"{group}={choice}: unknown key {err.full_key!r}") from err
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{group}={choice}: keys without a value: {', '.join(missing)}")
    return cfg


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Build the validated config from ``conf/`` and ``key=value`` overrides."""
    group_overrides: dict[str, str] = {}
    dotted: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        if key in (*GROUPS, "experiment"):
            group_overrides[key] = value
        else:
            dotted.append(item)

    base = _load_yaml(conf_dir() / "config.yaml")
    experiment = group_overrides.get("experiment", base.get("experiment"))
    exp_cfg, choices = _load_inherited("experiment", _group_file("experiment", experiment))
    choices.update({k: v for k, v in group_overrides.items() if k != "experiment"})

    schema = OmegaConf.structured(GLUSConfig)
    try:
        cfg = OmegaConf.merge(schema, base, {"experiment": experiment})
        for group in GROUPS:
            if group not in choices:
                raise ConfigError(f"experiment {experiment!r} chooses no {group}; valid: {', '.join(group_choices(group))}")
            cfg = OmegaConf.merge(cfg, {group: _load_inherited(group, _group_file(group, choices[group]))[0]})
        cfg = OmegaConf.merge(cfg, exp_cfg, OmegaConf.from_dotlist(dotted))
    except ConfigKeyError as err:
        raise ConfigError(f"unknown config key {err.full_key!r}; valid keys there: {_valid_keys(err.full_key)}") from err
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad value for {getattr(err, 'full_key', '?')!r}: {err.msg if hasattr(err, 'msg') else err}") from err
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config keys without a value: {', '.join(missing)}")
    OmegaConf.resolve(cfg)
    return cfg


def _valid_keys(full_key: str) -> str:
    node: Any = OmegaConf.structured(GLUSConfig)
    for part in full_key.split(".")[:-1]:
        if part not in node:
            break
        node = node[part]
    return ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else "(none)"


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def compose_or_report(command: str, overrides: list[str], check: Callable[[DictConfig], None] | None = None) -> DictConfig | None:
    """The composed config (``check`` may raise ``ConfigError`` on it), or None after printing the error for ``glus command``."""
    try:
        cfg = compose(overrides)
        if check is not None:
            check(cfg)
    except ConfigError as err:
        print(f"glus {command}: config error: {err}", file=sys.stderr)
        return None
    return cfg
