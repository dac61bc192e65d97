"""Binary masks packed eight rows to a byte, for fast morphology on whole stacks of frames.

A packed stack of ``[..., H, W]`` masks is a uint8 tensor ``[..., ceil(H / 8), W]`` whose bit ``i``
of byte ``[j, x]`` is pixel ``(8 j + i, x)``; rows past ``H`` are padding bits. Every elementwise
operation then touches eight times less memory, which is what the boundary F-measure spends its
time on (shift-and-OR dilations at 720p); column shifts stay plain slices, row shifts carry bits
between neighbouring bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pack_rows(masks: Tensor) -> Tensor:
    """Pack bool masks ``[..., H, W]`` into uint8 ``[..., ceil(H / 8), W]`` (padding bits are 0)."""
    if masks.dtype != torch.bool:
        raise TypeError(f"pack_rows expects a bool tensor, got {masks.dtype}")
    height = masks.shape[-2]
    words = -(-height // 8)
    rows = masks.view(torch.uint8)
    if height % 8:
        rows = F.pad(rows, (0, 0, 0, 8 * words - height))
    rows = rows.unflatten(-2, (words, 8))
    weights = (1 << torch.arange(8, dtype=torch.uint8, device=masks.device)).view(8, 1)
    return (rows * weights).sum(dim=-2, dtype=torch.uint8)  # distinct bits: the sum is an OR


def unpack_rows(packed: Tensor, height: int) -> Tensor:
    """Inverse of :func:`pack_rows`: bool ``[..., height, W]``."""
    bits = torch.arange(8, dtype=torch.uint8, device=packed.device).view(8, 1)
    rows = (packed.unsqueeze(-2) >> bits) & 1  # [..., J, 8, W]
    return rows.flatten(-3, -2)[..., :height, :].bool()


def rows_below(packed: Tensor) -> Tensor:
    """Each bit replaced by the pixel one row below it (zero past the last packed row)."""
    out = packed >> 1
    out[..., :-1, :] |= packed[..., 1:, :] << 7
    return out


def rows_above(packed: Tensor) -> Tensor:
    """Each bit replaced by the pixel one row above it (zero for row 0)."""
    out = packed << 1
    out[..., 1:, :] |= packed[..., :-1, :] >> 7
    return out


def popcount(packed: Tensor) -> Tensor:
    """Number of set bits of each packed map ``[..., J, W]`` -> int64 ``[...]``."""
    x = packed - ((packed >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    x = (x + (x >> 4)) & 0x0F
    # int32 sums are ~15x faster than int64 ones from uint8 on CPU and hold any frame below 2^31 pixels
    return x.flatten(-2).sum(dim=-1, dtype=torch.int32).long()
