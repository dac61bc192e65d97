"""Tensor memory on the CPU counted as a GPU's allocator counts it, for tests and benchmarks without a GPU."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

Kernel = Callable[[Any, tuple, dict], Any]


class LiveTensorBytes:
    """CPU stand-in for the CUDA allocator's counters: bytes of the tensor storages created while ``mode`` is active.

    A ``TorchDispatchMode`` sees every aten op (forward, backward, recomputation, optimiser), records each new output
    storage once and subtracts it when the storage is freed (a weakref finalizer), so ``live`` and ``peak`` count
    tensors exactly as ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` do on a GPU (the process's RSS
    does not: glibc keeps freed memory, caches and fragmentation come and go). Tensors that existed before (weights,
    inputs) are not counted. Outputs that share an input's storage (views such as a weight's ``.t()`` inside
    ``F.linear``, in-place results) are not new memory: counting them would add every weight a step touches.
    Not seen: scratch memory a kernel allocates and frees inside itself. ``kernel``: runs the ops instead of
    their own kernels (same outputs), e.g. bf16 ops through fp32 kernels on a CPU without bf16 GEMMs.
    """

    def __init__(self, kernel: Kernel | None = None) -> None:
        tracker = self
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = kernel(func, args, kwargs) if kernel is not None else func(*args, **kwargs)
                tracker._count(out, args, kwargs)
                return out

        self.mode = Mode()

    def _count(self, out: Any, args: tuple, kwargs: dict) -> None:
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.sizes and key not in inputs:  # a view or in-place result is not new memory
                    self.sizes[key] = n = storage.nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)
