"""Dataset J&F over referring expressions as a torchmetrics ``Metric`` that synchronises across ranks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from .davis import boundary_f, mask_iou


class JAndF(Metric):
    """J, F and J&F as the RVOS benchmarks report them: per-frame DAVIS J and F, averaged over the
    frames of each expression, then over expressions; J&F = (J + F) / 2.

    Each ``update`` takes the frames of one expression. Its optional ``key`` (e.g.
    ``"<video>/<exp_id>"``) names the expression in :meth:`per_expression` and makes an expression
    seen twice (DistributedSampler pads ranks by repeating samples) count once. The states are
    per-expression lists concatenated across ranks; keys travel with them as NUL-terminated UTF-8
    bytes so that they stay aligned with their values after synchronisation.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    expression_j: list[Tensor]
    expression_f: list[Tensor]
    expression_keys: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # all states in self.dtype: a rank without updates syncs an empty tensor of that dtype
        self.add_state("expression_j", default=[], dist_reduce_fx="cat")
        self.add_state("expression_f", default=[], dist_reduce_fx="cat")
        self.add_state("expression_keys", default=[], dist_reduce_fx="cat")

    def update(self, pred: Tensor, target: Tensor, key: str | None = None) -> None:
        """Add one expression: bool/uint8 masks ``[T, H, W]`` (nonzero = object), on any device."""
        if pred.ndim != 3 or target.ndim != 3 or pred.shape[0] == 0:
            raise ValueError(
                f"JAndF.update expects one expression's frames [T, H, W] with T >= 1, "
                f"got pred {tuple(pred.shape)} and target {tuple(target.shape)}"
            )
        if key is not None and (not isinstance(key, str) or not key or "\0" in key):
            raise ValueError(f"JAndF.update: key must be a non-empty string without NUL characters, got {key!r}")
        scores = torch.stack([mask_iou(pred, target).mean(), boundary_f(pred, target).mean()])
        scores = scores.to(device=self.device, dtype=self.dtype)
        self.expression_j.append(scores[:1])
        self.expression_f.append(scores[1:])
        code = list((key or "").encode("utf-8")) + [0]
        self.expression_keys.append(torch.tensor(code, dtype=self.dtype, device=self.device))

    def _expressions(self) -> tuple[list[str | None], Tensor, Tensor]:
        """Keys (None when not given), J and F of the expressions, a repeated key kept once (first seen)."""
        if isinstance(self.expression_j, list) and not self.expression_j:
            empty = torch.zeros(0, dtype=self.dtype, device=self.device)
            return [], empty, empty
        codes = bytes(dim_zero_cat(self.expression_keys).to(torch.uint8).tolist())
        keys = [name.decode("utf-8") or None for name in codes.split(b"\0")[:-1]]
        keep, seen = [], set()
        for i, name in enumerate(keys):
            if name is None or name not in seen:
                keep.append(i)
            seen.add(name)
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        j, f = dim_zero_cat(self.expression_j)[index], dim_zero_cat(self.expression_f)[index]
        return [keys[i] for i in keep], j, f

    def compute(self) -> dict[str, Tensor]:
        """``{"J", "F", "J&F"}`` (float64, NaN before any update) and ``"count"``, the number of expressions."""
        _, j, f = self._expressions()
        j_mean, f_mean = j.double().mean(), f.double().mean()
        count = torch.tensor(j.numel(), device=self.device)
        return {"J": j_mean, "F": f_mean, "J&F": (j_mean + f_mean) / 2, "count": count}

    def per_expression(self) -> dict[str, dict[str, float]]:
        """``{key: {"J", "F", "J&F"}}`` of every keyed expression on all ranks, for per-video tables.

        Like ``compute`` it is a collective call under DDP: every rank must make it.
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync):
            keys, j, f = self._expressions()
        return {
            name: {"J": j_value, "F": f_value, "J&F": (j_value + f_value) / 2}
            for name, j_value, f_value in zip(keys, j.tolist(), f.tolist())
            if name is not None
        }
