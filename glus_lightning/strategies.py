"""Trainer strategies by name: ``trainer.strategy`` = ddp | fsdp (FSDP2) | fsdp1 | any Lightning strategy string.

FSDP2 (``ModelParallelStrategy``) shards in ``GLUSModule.configure_model``; FSDP1 (``FSDPStrategy``) wraps the
same blocks through its auto-wrap policy. Both shard "blocks": the transformer layers of the Hugging Face models
(every ``GradientCheckpointingLayer``: LLM decoder layers, vision-tower layers) and SAM2's Hiera blocks and
memory-attention layers, the units that hold nearly all the weights (and the frame scorer, see ``SHARDED_BLOCKS``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from omegaconf import DictConfig
from sam2.modeling.backbones.hieradet import MultiScaleBlock
from sam2.modeling.memory_attention import MemoryAttentionLayer
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from glus_lightning.heads.frame_scorer import FrameScorer

# FrameScorer is tiny, but as its own unit it can be called (and fitted by keyframe self-refinement) on its own
SHARDED_BLOCKS: tuple[type[nn.Module], ...] = (GradientCheckpointingLayer, MultiScaleBlock, MemoryAttentionLayer, FrameScorer)


def is_block(module: nn.Module) -> bool:
    """Whether ``module`` is its own FSDP unit."""
    return isinstance(module, SHARDED_BLOCKS)


def _fsdp1_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    return True if recurse else is_block(module)


def build_strategy(trainer: DictConfig) -> Strategy | str:
    """The Lightning strategy for ``trainer.strategy``; other names go to Lightning unchanged ("auto", "ddp_spawn")."""
    name = trainer.strategy
    if name == "ddp":
        # every trainable parameter gets a gradient each step (SAM2's IoU and object heads are trained too),
        # so DDP need not search for unused ones; tests/test_scale.py trains 2 processes with this
        return DDPStrategy(find_unused_parameters=False)
    if name == "fsdp":
        # Lightning's "auto" mesh is (num_nodes, devices per node); GLUSModule.configure_model shards over that whole
        # 2-D mesh, i.e. HSDP: weights sharded across the GPUs of a node, replicated across nodes (data is split by
        # global rank either way). Single-file checkpoints: they hold only the trainable state.
        return ModelParallelStrategy(data_parallel_size="auto", tensor_parallel_size="auto", save_distributed_checkpoint=False)
    if name == "fsdp1":
        if trainer.accelerator == "cpu":
            raise ValueError("trainer.strategy=fsdp1 (Lightning FSDPStrategy) runs on GPUs only; use trainer.strategy=fsdp on the CPU")
        return FSDPStrategy(auto_wrap_policy=_fsdp1_policy, state_dict_type="full", use_orig_params=True)
    return name


def gather_units(module: nn.Module) -> None:
    """Gather every FSDP2 unit's full weights and keep them until ``release_units``, so that forwards run no collective.

    Keyframe self-refinement measures different videos on each rank; with per-forward all-gathers the ranks' block
    collectives would have to match call for call; validation and test give ranks different numbers of videos.
    Inference holds the whole model per rank anyway. A no-op without FSDP2 (DDP, one device).
    """
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.unshard()  # every rank walks the units in the same order: the all-gathers match
            unit.set_reshard_after_forward(False, recurse=False)


def release_units(module: nn.Module) -> None:
    """Back to sharded weights and FSDP2's defaults (reshard after forward, except the root)."""
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()
            unit.set_reshard_after_forward(unit is not module, recurse=False)


@contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """``gather_units`` for the duration of a block."""
    gather_units(module)
    try:
        yield
    finally:
        release_units(module)
