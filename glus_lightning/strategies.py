"""Trainer strategies by name: ``trainer.strategy`` = ddp | fsdp (FSDP2) | fsdp1 | any Lightning strategy string,
and the FSDP rules of the model: which modules are units, in which dtypes they compute, when they are gathered.

FSDP2 (``ModelParallelStrategy``) shards in ``GLUSModule.configure_model`` (``shard_fsdp2``) and holds whole
weights while evaluating (``GatheredEvaluation``, every run's callback); FSDP1
(``FSDPStrategy``) wraps the same units through ``UnitPolicy``. Units (``fsdp_units``) are the "blocks" that hold
nearly all the weights: the transformer layers of the Hugging Face models (every ``GradientCheckpointingLayer``:
LLM decoder layers, vision-tower layers), SAM2's Hiera blocks and memory-attention layers (and the frame scorer,
see ``SHARDED_BLOCKS``); and every largest subtree whose parameters all train (LoRA adapters, trained embeddings
and LM head, projector, SAM2's mask decoder), so that under the precision policy (fp32 trainable, bf16 frozen,
``precision.py``) each unit holds parameters of one dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from omegaconf import DictConfig
from sam2.modeling.backbones.hieradet import MultiScaleBlock
from sam2.modeling.memory_attention import MemoryAttentionLayer
from torch import nn
from torch.distributed.fsdp import MixedPrecision
from torch.distributed.fsdp.wrap import _Policy
from transformers.modeling_layers import GradientCheckpointingLayer

from glus_lightning.config import ConfigError
from glus_lightning.keyframes.scorer import FrameScorer
from glus_lightning.precision import fsdp_mixed_precision

# FrameScorer is tiny, but as its own unit it can be called (and fitted by keyframe self-refinement) on its own
SHARDED_BLOCKS: tuple[type[nn.Module], ...] = (GradientCheckpointingLayer, MultiScaleBlock, MemoryAttentionLayer, FrameScorer)


def is_block(module: nn.Module) -> bool:
    """Whether ``module`` is its own FSDP unit."""
    return isinstance(module, SHARDED_BLOCKS)


CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)  # never called: no forward to gather in


def fsdp_units(root: nn.Module) -> list[nn.Module]:
    """The modules of ``root`` that become FSDP units, deepest first (the order ``fully_shard`` needs).

    Every block, and inside a block that is not wholly trained the largest non-container subtrees whose parameters
    all train (LoRA's ``lora_A['default']`` in a frozen decoder layer): under the precision policy those are fp32 in a
    bf16 block, and each unit is called through its own forward, where FSDP gathers it. Everything else stays in
    the root, whose forward (and registered forward methods) gathers it: trained heads, embeddings and SAM2's mask
    decoder are used by other modules' code (SAM2's image path runs the decoder's ``conv_s0``; its tokens are read
    as ``.weight``), so they cannot be units of their own.
    """
    blocks = [(name, module) for name, module in root.named_modules() if module is not root and is_block(module)]
    chosen = dict.fromkeys(module for _, module in blocks)
    for block_name, block in blocks:
        if all(p.requires_grad for p in block.parameters()):
            continue
        taken: list[str] = []
        for name, module in block.named_modules(prefix=block_name):
            if module is block or isinstance(module, CONTAINERS) or any(name.startswith(f"{t}.") for t in taken):
                continue
            params = list(module.parameters())
            if params and all(p.requires_grad for p in params):
                taken.append(name)
                chosen[module] = None
    depth = {id(module): name.count(".") for name, module in root.named_modules()}
    return sorted(chosen, key=lambda module: -depth[id(module)])


def root_params(root: nn.Module, units: list[nn.Module]) -> list[nn.Parameter]:
    """The parameters no unit holds: the root unit's own."""
    in_units = {id(p) for unit in units for p in unit.parameters()}
    return [p for p in root.parameters() if id(p) not in in_units]


def unit_dtypes(root: nn.Module, units: list[nn.Module]) -> dict[str, set[torch.dtype]]:
    """The floating-point dtypes of the parameters each unit manages itself (not those of units inside it), by name."""
    names = {id(module): name or "<root>" for name, module in root.named_modules()}
    owner: dict[int, str] = {}
    for unit in [root, *reversed(units)]:  # parents first: deeper units overwrite what they own
        for param in unit.parameters():
            owner[id(param)] = names[id(unit)]
    dtypes: dict[str, set[torch.dtype]] = {}
    for param in root.parameters():
        if param.is_floating_point():
            dtypes.setdefault(owner[id(param)], set()).add(param.dtype)
    return dtypes


def check_uniform_units(root: nn.Module, units: list[nn.Module]) -> None:
    """FSDP1 flattens each unit's parameters into one tensor, which needs one dtype: name the unit that has several."""
    mixed = {name: sorted(str(d) for d in dtypes) for name, dtypes in unit_dtypes(root, units).items() if len(dtypes) > 1}
    if mixed:
        raise ConfigError(
            f"trainer.strategy=fsdp1 needs one parameter dtype per FSDP unit, but {mixed}: a block mixes frozen "
            "weights of several dtypes (backbone.dtype, segmenter.dtype, backbone.quantization)"
        )


class UnitPolicy(_Policy):
    """FSDP1 auto-wrap policy wrapping exactly ``fsdp_units`` (the units FSDP2 gets).

    FSDP1 flattens each unit into one tensor of one dtype. Blocks are uniform (frozen bf16, their LoRA adapters are
    units of their own); the root mixes trained fp32 parameters with the few frozen weights outside blocks (patch
    embeddings, norms, SAM2's neck and memory encoder: a few MB), which are therefore upcast to fp32 here.
    """

    def _run_policy(self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: dict[str, Any]) -> dict:
        units = fsdp_units(root_module)
        for param in root_params(root_module, units):
            if param.is_floating_point():
                param.data = param.data.float()
        check_uniform_units(root_module, units)
        return {unit: dict(root_kwargs) for unit in units if unit not in ignored_modules}


def shard_fsdp2(module: nn.Module, mesh: Any, precision: str, forward_methods: tuple[str, ...]) -> None:
    """FSDP2: each unit of ``fsdp_units``, then the root; ``forward_methods`` gather the root's weights like forward.

    Under a mixed ``trainer.precision`` units all-gather parameters in bf16 and reduce gradients in fp32
    (``precision.fsdp_mixed_precision``); the fp32 shards stay the optimiser's master weights.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if isinstance(module, FSDPModule):  # configure_model runs again for validate after fit
        return
    dtypes = fsdp_mixed_precision(precision)
    policy = MixedPrecisionPolicy(*dtypes) if dtypes else MixedPrecisionPolicy()
    for unit in fsdp_units(module):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    for name in forward_methods:
        register_fsdp_forward_method(module, name)


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
        dtypes = fsdp_mixed_precision(str(trainer.precision))
        mixed = MixedPrecision(param_dtype=dtypes[0], reduce_dtype=dtypes[1]) if dtypes else None  # buffers as stored
        return FSDPStrategy(auto_wrap_policy=UnitPolicy(), mixed_precision=mixed, state_dict_type="full", use_orig_params=True)
    return name


def fsdp1_clips_norm(root: nn.Module, clip_val: float | None, algorithm: str | None) -> bool:
    """Clip by global norm through FSDP1's own ``clip_grad_norm_`` when ``root`` (the strategy's wrapped model) is an
    FSDP1 module; True if it did. Each rank holds a shard of each gradient, so only the root's method sees the global
    norm; Lightning's FSDP precision refuses ``gradient_clip_algorithm='norm'`` rather than clip per shard."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not (isinstance(root, FullyShardedDataParallel) and clip_val and algorithm in (None, "norm")):
        return False
    root.clip_grad_norm_(clip_val)
    return True


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


class GatheredEvaluation(L.Callback):
    """FSDP2: whole weights on every rank from the start to the end of each validation, test and predict epoch
    (``gather_units``), since ranks evaluate different numbers of videos; a no-op without FSDP2."""

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        gather_units(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        release_units(pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        gather_units(pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        release_units(pl_module)

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        gather_units(pl_module)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        release_units(pl_module)


def gather_from_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``[world, *tensor.shape]``: every rank's tensor in rank order (``[1, ...]`` on a single process), no gradient.

    Lightning's ``all_gather`` goes through ``torch.distributed.nn.functional.all_gather``, deprecated in torch 2.14
    (a warning on every run with several ranks that a user cannot act on); nothing here needs its autograd.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor[None]
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor)
    return torch.stack(parts)
