"""Object-contrastive InfoNCE on the projected ``[SEG]`` embeddings, with a FIFO bank of past embeddings.

Two expressions of the same object set at the same frame should give close prompts; the prompts of the other
objects of the same video (the confusable ones) and of earlier steps' objects should be far. The bank is made of
buffers, so it lands in checkpoints, and every rank pushes every rank's embeddings, so the banks stay identical.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.batch import RefVOSBatch

EMPTY = -1  # the key of an empty bank slot and of padding rows in a push


def stable_key(text: str) -> int:
    """A key that is the same in every process and run (Python's ``hash`` of a str is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


def expression_keys(batch: RefVOSBatch) -> tuple[Tensor, Tensor]:
    """Video keys and object-set keys ``[E]`` (int64) of a batch's expressions.

    Object key: "dataset/video/sorted object ids", so two expressions of one object set share it in every step.
    """
    video, objects = [], []
    for b, obj_ids in zip(batch.expression_video.tolist(), batch.expression_objects, strict=True):
        name = f"{batch.datasets[b]}/{batch.video_ids[b]}"
        video.append(stable_key(name))
        objects.append(stable_key(f"{name}/{','.join(str(o) for o in sorted(obj_ids))}"))
    device = batch.expression_video.device
    return torch.tensor(video, dtype=torch.long, device=device), torch.tensor(objects, dtype=torch.long, device=device)


class ObjectContrastiveHead(nn.Module):
    """InfoNCE over (anchor, positive) pairs of ``[SEG]`` embeddings ``[E, Q, P]`` on cosine similarity.

    Candidate rows for negatives: the batch's embeddings flattened (row ``e * Q + q``), then the bank slots
    (row ``E * Q + slot``). It has no parameters: nothing for DDP to find idle.
    """

    def __init__(self, dim: int, bank_size: int, num_negatives: int, temperature: float) -> None:
        super().__init__()
        if bank_size < 1 or num_negatives < 1 or temperature <= 0:
            raise ValueError(
                f"loss.contrastive_bank_size ({bank_size}) and loss.contrastive_negatives ({num_negatives}) must be >= 1 "
                f"and loss.contrastive_temperature ({temperature}) > 0"
            )
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.register_buffer("bank_embeddings", torch.zeros(bank_size, dim))
        self.register_buffer("bank_keys", torch.full((bank_size,), EMPTY, dtype=torch.long))
        self.register_buffer("bank_pointer", torch.zeros((), dtype=torch.long))

    @property
    def bank_size(self) -> int:
        return self.bank_keys.shape[0]

    def bank_order(self) -> list[int]:
        """Bank slots from the most recently written to the oldest."""
        pointer = int(self.bank_pointer)
        return [(pointer - 1 - i) % self.bank_size for i in range(self.bank_size)]

    def positives(self, e: int, video_keys: list[int], object_keys: list[int]) -> list[int]:
        """The other expressions of the same video and object set (at the anchor's frame: same query frames)."""
        return [o for o in range(len(object_keys)) if o != e and video_keys[o] == video_keys[e] and object_keys[o] == object_keys[e]]

    def select_negatives(self, e: int, q: int, video_keys: list[int], object_keys: list[int], num_query: int,
                         bank_keys: list[int] | None = None) -> list[int]:
        """Candidate rows of the negatives of anchor ``(e, q)``, at most ``num_negatives``, best first.

        Hard negatives first: the batch's other object sets of the same video, at frame ``q``, then at the other
        frames (in frame order); then the bank, most recent first, without empty slots and without the anchor's own
        object set seen in an earlier step. ``bank_keys``: ``self.bank_keys`` as a list (passed to list it once).
        """
        others = [o for o in range(len(object_keys)) if video_keys[o] == video_keys[e] and object_keys[o] != object_keys[e]]
        rows = [o * num_query + q for o in others]
        rows += [o * num_query + f for f in range(num_query) if f != q for o in others]
        keys = self.bank_keys.tolist() if bank_keys is None else bank_keys
        first_bank_row = len(object_keys) * num_query
        rows += [first_bank_row + s for s in self.bank_order() if keys[s] not in (EMPTY, object_keys[e])]
        return rows[: self.num_negatives]

    def forward(self, embeddings: Tensor, video_keys: Tensor, object_keys: Tensor) -> Tensor:
        """Mean InfoNCE loss over (anchor, positive) pairs; a graph-connected zero when no anchor has a positive."""
        num_exp, num_query, _ = embeddings.shape
        vk, ok, bank_keys = video_keys.tolist(), object_keys.tolist(), self.bank_keys.tolist()
        anchors, positives, negatives = [], [], []
        for e in range(num_exp):
            pos = self.positives(e, vk, ok)
            if not pos:
                continue
            for q in range(num_query):
                neg = self.select_negatives(e, q, vk, ok, num_query, bank_keys)
                for p in pos:
                    anchors.append(e * num_query + q)
                    positives.append(p * num_query + q)
                    negatives.append(neg)
        if not anchors:
            return embeddings.sum() * 0
        z = F.normalize(embeddings.float().flatten(0, 1), dim=-1)
        candidates = torch.cat([z, self.bank_embeddings.to(z)])
        width = max(len(n) for n in negatives)
        index = torch.zeros(len(anchors), width, dtype=torch.long, device=z.device)
        valid = torch.zeros(len(anchors), width, dtype=torch.bool, device=z.device)
        for i, neg in enumerate(negatives):
            index[i, : len(neg)] = torch.tensor(neg, dtype=torch.long)
            valid[i, : len(neg)] = True
        anchor = z[torch.tensor(anchors, device=z.device)]
        s_pos = (anchor * z[torch.tensor(positives, device=z.device)]).sum(-1) / self.temperature
        s_neg = (anchor[:, None] * candidates[index]).sum(-1) / self.temperature
        logits = torch.cat([s_pos[:, None], s_neg.masked_fill(~valid, float("-inf"))], dim=1)
        return (torch.logsumexp(logits, dim=1) - s_pos).mean()

    @staticmethod
    def padded_rows(embeddings: Tensor, object_keys: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
        """This step's rows ``[capacity, P]`` (detached, normalised, float32) and keys, padded with ``EMPTY`` keys.

        Every rank must gather tensors of one shape, whatever its number of expressions.
        """
        _, num_query, dim = embeddings.shape
        rows = F.normalize(embeddings.detach().float().reshape(-1, dim), dim=-1)
        if rows.shape[0] > capacity:
            raise ValueError(f"{rows.shape[0]} embeddings exceed the bank push capacity {capacity}")
        keys = object_keys.repeat_interleave(num_query)
        padded = torch.zeros(capacity, dim, dtype=rows.dtype, device=rows.device)
        padded_keys = torch.full((capacity,), EMPTY, dtype=torch.long, device=rows.device)
        padded[: rows.shape[0]], padded_keys[: rows.shape[0]] = rows, keys
        return padded, padded_keys

    @torch.no_grad()
    def push(self, embeddings: Tensor, keys: Tensor) -> None:
        """Write ``embeddings [N, P]`` FIFO into the bank (wrapping); rows keyed ``EMPTY`` are padding, not written."""
        keep = keys != EMPTY
        rows, keys = F.normalize(embeddings[keep].float(), dim=-1), keys[keep]
        count = rows.shape[0]
        if count == 0:
            return
        kept = min(count, self.bank_size)  # a push larger than the bank: only its last rows survive
        slots = (int(self.bank_pointer) + count - kept + torch.arange(kept, device=self.bank_keys.device)) % self.bank_size
        self.bank_embeddings[slots] = rows[-kept:].to(self.bank_embeddings)
        self.bank_keys[slots] = keys[-kept:].to(self.bank_keys)
        self.bank_pointer.fill_((int(self.bank_pointer) + count) % self.bank_size)
