"""Embeddings and LM head that train only some rows (the tokens this project adds: ``[SEG]``).

Why: training them whole, as the reference does, holds weights, gradients and two AdamW moments of every row in
fp32: 16 bytes x 2 x vocabulary x width, 16 GiB at Qwen2.5's 152,064 rows x 3584 (4 GiB at LLaMA-2's 32,000 x 4096).
Here the frozen matrix stays in ``backbone.dtype`` and only the listed rows are parameters of their own, so the
gradient and optimiser state are a few rows. ``backbone.train_token_rows: added`` selects it (``all``: the reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _TrainedRows:
    """The listed rows (``rows`` buffer, ``trained`` parameter [n, D] in fp32) over a frozen ``weight``."""

    rows: Tensor
    trained: nn.Parameter
    weight: nn.Parameter

    def _init_rows(self, rows: Sequence[int], shared: nn.Parameter | None) -> None:
        ids = torch.tensor(sorted(set(rows)), dtype=torch.long, device=self.weight.device)
        if len(ids) == 0 or int(ids.max()) >= self.weight.shape[0] or int(ids.min()) < 0:
            raise ValueError(f"trained rows {list(rows)} must be non-empty ids below {self.weight.shape[0]}")
        self.register_buffer("rows", ids, persistent=False)
        self.weight.requires_grad_(False)
        self.trained = shared if shared is not None else nn.Parameter(self.weight.detach()[ids].float())

    def full_weight(self) -> Tensor:
        """The matrix with the trained rows in place, in the frozen weight's dtype (what export writes)."""
        return self.weight.detach().index_copy(0, self.rows, self.trained.detach().to(self.weight.dtype))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], *args: Any) -> None:
        """A whole matrix without ``trained`` (a checkpoint that trained every row) also sets the trained rows."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)  # type: ignore[misc]
        weight, trained = prefix + "weight", prefix + "trained"
        if weight in state_dict and trained not in state_dict:
            with torch.no_grad():
                self.trained.copy_(state_dict[weight][self.rows.to(state_dict[weight].device)])
            if trained in missing_keys:
                missing_keys.remove(trained)


class RowTrainedEmbedding(_TrainedRows, nn.Embedding):
    """``nn.Embedding`` whose lookups of the trained rows read ``trained``."""

    def __init__(self, base: nn.Embedding, rows: Sequence[int]) -> None:
        nn.Embedding.__init__(self, base.num_embeddings, base.embedding_dim, base.padding_idx, device="meta")
        self.weight = base.weight
        self._init_rows(rows, None)

    def forward(self, input: Tensor) -> Tensor:
        out = F.embedding(input, self.weight, self.padding_idx)
        hit = input[..., None] == self.rows  # [..., n]
        own = hit.to(self.trained.dtype) @ self.trained  # [..., D]: the trained row where one is looked up, else 0
        return torch.where(hit.any(-1, keepdim=True), own.to(out.dtype), out)


class RowTrainedHead(_TrainedRows, nn.Linear):
    """``nn.Linear`` LM head whose logits of the trained rows come from ``trained``."""

    def __init__(self, base: nn.Linear, rows: Sequence[int], tied: RowTrainedEmbedding | None = None) -> None:
        nn.Linear.__init__(self, base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self._init_rows(rows, tied.trained if tied is not None else None)

    def forward(self, input: Tensor) -> Tensor:
        logits = F.linear(input, self.weight, self.bias)
        own = F.linear(input, self.trained.to(input.dtype))
        if self.bias is not None:
            own = own + self.bias[self.rows]
        return logits.index_copy(-1, self.rows, own.to(logits.dtype))


def train_only_rows(hf: nn.Module, rows: Sequence[int]) -> None:
    """Replace ``hf``'s input embeddings and LM head by row-trained ones (tied weights stay tied: one ``trained``)."""
    embeddings, head = hf.get_input_embeddings(), hf.get_output_embeddings()
    new_embeddings = RowTrainedEmbedding(embeddings, rows)
    _replace(hf, embeddings, new_embeddings)
    if head is not None:
        tied = new_embeddings if head.weight is embeddings.weight else None
        _replace(hf, head, RowTrainedHead(head, rows, tied))


def with_full_rows(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """``state`` (of ``model``) with every row-trained matrix written whole and its ``trained``/``rows`` entries dropped,
    so that it loads into the plain Hugging Face class."""
    out = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, _TrainedRows):
            prefix = f"{name}." if name else ""
            out.pop(prefix + "trained", None)
            out[prefix + "weight"] = module.full_weight()
    return out


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for name, module in root.named_modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)
                return
    raise ValueError(f"{type(old).__name__} not found in {type(root).__name__}")
