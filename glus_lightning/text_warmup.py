"""Text warm-up: before fit, the MLLM and the ``[SEG]`` projection learn to carry the sentence in every ``[SEG]`` prompt.

Why: GLUS starts from a pretrained MLLM whose ``[SEG]`` state already holds the sentence. A random tiny LM's does not:
the ``[SEG]`` prompts of one video's expressions start nearly identical (cosine 0.999), and SAM2's decoder, trained
from scratch beside it, learns to ignore its prompt before the prompts differ (docs/design.md, "What the demo
learns"). ``text_warmup.steps`` optimiser steps of a bag-of-tokens read-out stand in for that pretraining: a linear
layer from each prompt to the multi-hot set of its expression's tokens, binary cross-entropy. Only the backbone's
trainable parameters and the projection learn; SAM2 is not run; the read-out is dropped after. With 0 steps (every
pretrained backbone's config) nothing runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from glus_lightning.precision import compute_precision


@dataclass
class WarmupReport:
    steps: int
    loss: float  # of the last step
    exact_sets: float  # share of (expression, frame) prompts whose read-out gives exactly the expression's token set,
    #                    over the last ``log_every_n_steps`` steps
    prompt_cosine: float  # mean cosine between the prompts of different expressions of a batch, last step


def token_sets(tokenizer, expressions: list[str], vocab_size: int) -> Tensor:
    """Multi-hot ``[E, vocab_size]``: the tokens of each expression as the tokenizer splits it on its own."""
    sets = torch.zeros(len(expressions), vocab_size)
    for row, expression in enumerate(expressions):
        sets[row, tokenizer(expression, add_special_tokens=False)["input_ids"]] = 1.0
    return sets


def mean_cosine(prompts: Tensor) -> float:
    """Mean cosine similarity between different rows of ``prompts [E, P]`` (nan with one row)."""
    unit = F.normalize(prompts.float(), dim=-1)
    similarity = unit @ unit.T
    return float(similarity[~torch.eye(len(unit), dtype=torch.bool, device=unit.device)].mean())


def warm_up_text(module: nn.Module, batches: Iterable, cfg: DictConfig,
                 report: Callable[[str, dict[str, float], int], None]) -> WarmupReport:
    """``cfg.text_warmup.steps`` steps on ``batches`` (training batches of the run's data); ``report(line, scalars,
    step)`` every ``cfg.text_warmup.log_every_n_steps`` steps and at the end."""
    w = cfg.text_warmup
    backbone, device = module.backbone, module.device
    vocab_size = len(backbone.tokenizer)
    readout = nn.Linear(module.segmenter.prompt_dim, vocab_size, device=device)
    params = [p for part in (backbone, module.seg_projection) for p in part.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([*params, *readout.parameters()], lr=w.lr, betas=tuple(cfg.optim.betas), weight_decay=0.0)
    module.train()
    exact: list[float] = []

    def recent_exact() -> float:  # over the last log_every_n_steps steps
        window = exact[-w.log_every_n_steps:]
        return sum(window) / max(len(window), 1)

    step, loss, cosine = 0, float("nan"), float("nan")
    for step, batch in enumerate(islice(batches, w.steps), start=1):
        batch = batch.to(device)
        targets = token_sets(backbone.tokenizer, batch.expressions, vocab_size).to(device)
        with compute_precision(cfg.trainer.precision, device):
            out = backbone.encode(batch.context_frames, batch.query_frames, batch.expressions, ce_only_seg=cfg.loss.ce_only_seg,
                                  sizes=batch.video_sizes, rows=batch.expression_video, with_loss=False)
            prompts = module._project(out.seg_hidden)  # [E, Q, P]
        logits = readout(prompts.float())
        targets = targets[:, None].expand_as(logits)
        step_loss = F.binary_cross_entropy_with_logits(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        step_loss.backward()
        optimizer.step()
        loss = float(step_loss.detach())
        exact.append(float(((logits.detach() > 0) == (targets > 0)).all(-1).float().mean()))
        if step % w.log_every_n_steps == 0 or step == w.steps:
            cosine = mean_cosine(prompts.detach()[:, 0])
            recent = recent_exact()
            report(f"text warm-up step {step}/{w.steps}  loss {loss:.4f}  exact token sets {recent:.3f}  "
                   f"prompt cosine {cosine:.3f}", {"loss": loss, "exact_token_sets": recent, "prompt_cosine": cosine}, step)
    if step < w.steps:
        raise ValueError(f"text_warmup.steps={w.steps}: the training data gave only {step} batches")
    optimizer.zero_grad(set_to_none=True)
    return WarmupReport(step, loss, recent_exact(), cosine)
