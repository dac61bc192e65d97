"""One precision policy for every strategy (docs/scaling.md, "Precision").

- Trainable parameters are float32, whatever ``backbone.dtype`` / ``segmenter.dtype`` say: the optimiser keeps
  fp32 master weights and fp32 Adam moments (as DeepSpeed did for the reference), so small updates to bf16-sized
  weights are not rounded away.
- Frozen weights stay as loaded: ``backbone.dtype`` / ``segmenter.dtype`` (bf16 at 7B), NF4 under QLoRA.
- Compute follows ``trainer.precision``: ``bf16-mixed`` autocasts to bf16 (FSDP all-gathers parameters in bf16 and
  reduces gradients in fp32); ``bf16-true`` casts the whole module to bf16, trainable parameters and optimiser
  states included (less memory, no fp32 master weights); ``32-true`` computes in fp32 and so needs fp32 weights.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from omegaconf import DictConfig
from torch import nn

from glus_lightning.config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRAINABLE_DTYPE = torch.float32
MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # trainer.precision -> autocast dtype
HALF_PRECISIONS = ("bf16-mixed", "bf16-true", "16-mixed", "16-true")
QLORA_STRATEGIES = ("auto", "ddp")  # each rank holds its own 4-bit copy; FSDP cannot shard bitsandbytes' packed weights


def torch_dtype(name: str, key: str) -> torch.dtype:
    """The torch dtype of a config value, or a ConfigError naming ``key`` and the valid names."""
    if name not in DTYPES:
        raise ConfigError(f"{key}={name!r} is not a dtype; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def check_run_config(cfg: DictConfig) -> None:
    """Refuse, before anything is built, combinations of dtypes, precision and strategy that cannot run."""
    precision = str(cfg.trainer.precision)
    for key, name in (("backbone.dtype", cfg.backbone.dtype), ("segmenter.dtype", cfg.segmenter.dtype)):
        if torch_dtype(name, key) != torch.float32 and precision not in HALF_PRECISIONS:
            raise ConfigError(
                f"{key}={name} keeps frozen weights in {name}, which trainer.precision={precision} cannot compute with "
                f"(it feeds float32 inputs); use trainer.precision=bf16-mixed (or bf16-true), or {key}=float32"
            )
    strategy = str(cfg.trainer.strategy)
    if cfg.backbone.quantization.load_in_4bit and strategy not in QLORA_STRATEGIES:
        raise ConfigError(
            f"QLoRA (backbone.quantization.load_in_4bit=true) runs with trainer.strategy in {QLORA_STRATEGIES} "
            f"(one 4-bit copy per rank, about 4 GiB at 7B), not {strategy!r}: FSDP cannot shard bitsandbytes' packed "
            "4-bit weights; use trainer=ddp, or LoRA without quantization under trainer=fsdp"
        )


def keep_trainable_fp32(module: nn.Module) -> None:
    """Cast every trainable parameter to float32 in place (the same Parameter objects: build optimisers after)."""
    for param in module.parameters():
        if param.requires_grad and param.dtype != TRAINABLE_DTYPE:
            param.data = param.data.to(TRAINABLE_DTYPE)


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen floating-point parameters of ``module`` to ``dtype`` (trainable ones are left alone)."""
    for param in module.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def fsdp_mixed_precision(precision: str) -> tuple[torch.dtype, torch.dtype] | None:
    """(parameter dtype for compute, gradient-reduction dtype) of FSDP under ``trainer.precision``; None: as stored.

    Under ``bf16-mixed`` parameters are all-gathered in bf16 (half the traffic, the dtype autocast computes in
    anyway) and gradients reduced in fp32 (no precision lost summing over many ranks); the sharded fp32 trainable
    parameters stay the optimiser's master weights.
    """
    return (MIXED[precision], torch.float32) if precision in MIXED else None


def compute_precision(precision: str, device: torch.device) -> AbstractContextManager:
    """The autocast a Trainer's ``trainer.precision`` enters around every step, for inference outside a Trainer
    (``glus predict``, the experiments): without it the frozen bf16 weights meet the fp32 trained ones' outputs."""
    return torch.autocast(device.type, dtype=MIXED[precision]) if precision in MIXED else nullcontext()


def layer_norms_follow_weights_on_cpu(module: nn.Module) -> None:
    """Let every ``nn.LayerNorm`` of ``module`` take fp32 inputs with half weights under CPU autocast.

    CUDA autocast runs ``layer_norm`` in fp32 whatever its arguments; CPU autocast leaves it alone, and the CPU kernel
    refuses bf16 weights with an fp32 input, which is what bf16 frozen (or FSDP-gathered) weights meet on the CPU (tests,
    the rehearsal). Under CPU autocast only, the input is cast to the weights' dtype; everything else is untouched.
    """
    for sub in module.modules():
        if isinstance(sub, nn.LayerNorm) and sub.elementwise_affine:
            sub.register_forward_pre_hook(_input_to_weight_dtype_on_cpu)


def _input_to_weight_dtype_on_cpu(norm: nn.LayerNorm, args: tuple) -> tuple | None:
    x = args[0]
    if torch.is_autocast_enabled("cpu") and x.device.type == "cpu" and x.dtype != norm.weight.dtype:
        return (x.to(norm.weight.dtype), *args[1:])
    return None
