"""Projection of the MLLM's ``[SEG]`` hidden state to a SAM2 sparse prompt embedding."""

from __future__ import annotations

from torch import Tensor, nn


class SegProjection(nn.Sequential):
    """``D -> D -> prompt_dim`` MLP with ReLU, as in LISA/GLUS (a new, always trained module)."""

    def __init__(self, hidden_size: int, prompt_dim: int) -> None:
        super().__init__(nn.Linear(hidden_size, hidden_size), nn.ReLU(inplace=True), nn.Linear(hidden_size, prompt_dim))

    def forward(self, seg_hidden: Tensor) -> Tensor:  # [..., D] -> [..., prompt_dim]
        return super().forward(seg_hidden)
