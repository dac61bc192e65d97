"""Object-contrastive InfoNCE on the projected ``[SEG]`` embeddings, with a FIFO bank of past embeddings.

Two expressions of the same object set at the same frame should give close prompts; the prompts of the other
objects of the same video (the confusable ones) and of earlier steps' objects should be far. Which rows count as
positives and negatives is ``ContrastiveRules`` (ours by default, the GLUS reference's as options). The bank is made
of buffers, so it lands in checkpoints, and every rank pushes every rank's embeddings, so the banks stay identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glus_lightning.heads.contrastive_keys import EMPTY, RowKeys
from glus_lightning.heads.contrastive_rules import AnchorCandidates, BankKeys, ContrastiveRules, choose_terms

KEY_COLUMNS = 3  # a pushed row's keys: object set, expression, frame (RowKeys)


class ObjectContrastiveHead(nn.Module):
    """InfoNCE over (anchor, positive) pairs of ``[SEG]`` embeddings ``[E, Q, P]`` on cosine similarity.

    Candidate rows: the batch's embeddings flattened (row ``e * Q + q``), then the bank slots (row ``E * Q + slot``).
    It has no parameters: nothing for DDP to find idle. The bank keeps each row's object-set key (``bank_keys``),
    expression key and frame key; a checkpoint written before the last two existed loads them as ``EMPTY``.
    """

    def __init__(self, dim: int, bank_size: int, temperature: float, rules: ContrastiveRules) -> None:
        super().__init__()
        if bank_size < 1 or temperature <= 0:
            raise ValueError(f"loss.contrastive_bank_size ({bank_size}) must be >= 1 and loss.contrastive_temperature "
                             f"({temperature}) > 0")
        self.temperature = temperature
        self.rules = rules
        self.register_buffer("bank_embeddings", torch.zeros(bank_size, dim))
        self.register_buffer("bank_keys", torch.full((bank_size,), EMPTY, dtype=torch.long))
        self.register_buffer("bank_expressions", torch.full((bank_size,), EMPTY, dtype=torch.long))
        self.register_buffer("bank_frames", torch.full((bank_size,), EMPTY, dtype=torch.long))
        self.register_buffer("bank_pointer", torch.zeros((), dtype=torch.long))

    @property
    def bank_size(self) -> int:
        return self.bank_keys.shape[0]

    def bank_order(self) -> list[int]:
        """Bank slots from the most recently written to the oldest."""
        pointer = int(self.bank_pointer)
        return [(pointer - 1 - i) % self.bank_size for i in range(self.bank_size)]

    def bank_snapshot(self) -> BankKeys:
        """The bank's keys on the host (one transfer), its written slots most recent first."""
        objects, expression, frame = torch.stack([self.bank_keys, self.bank_expressions, self.bank_frames]).tolist()
        return BankKeys(objects, expression, frame, [s for s in self.bank_order() if objects[s] != EMPTY])

    def forward(self, embeddings: Tensor, keys: RowKeys) -> Tensor:
        """Mean InfoNCE over the terms ``rules`` choose; a graph-connected zero when there are fewer than
        ``rules.min_anchors`` anchors with a positive and enough negative candidates."""
        anchors = AnchorCandidates(keys, self.bank_snapshot(), self.rules).anchors()
        if len(anchors) < self.rules.min_anchors:  # min_anchors >= 1: also when there is no anchor
            return embeddings.sum() * 0
        terms = choose_terms(anchors, self.rules)
        z = F.normalize(embeddings.float().flatten(0, 1), dim=-1)
        candidates = torch.cat([z, self.bank_embeddings.to(z)])
        width = max(len(t.negatives) for t in terms)
        index = torch.zeros(len(terms), width, dtype=torch.long)
        valid = torch.zeros(len(terms), width, dtype=torch.bool)
        for i, t in enumerate(terms):
            index[i, : len(t.negatives)] = torch.tensor(t.negatives, dtype=torch.long)
            valid[i, : len(t.negatives)] = True
        index, valid = index.to(z.device), valid.to(z.device)
        anchor = z[torch.tensor([t.anchor for t in terms], device=z.device)]
        s_pos = (anchor * candidates[torch.tensor([t.positive for t in terms], device=z.device)]).sum(-1) / self.temperature
        s_neg = (anchor[:, None] * candidates[index]).sum(-1) / self.temperature
        logits = torch.cat([s_pos[:, None], s_neg.masked_fill(~valid, float("-inf"))], dim=1)
        return (torch.logsumexp(logits, dim=1) - s_pos).mean()

    def padded_rows(self, embeddings: Tensor, keys: RowKeys, capacity: int) -> tuple[Tensor, Tensor]:
        """This step's rows that feed the bank (``rules.bank_sources``), detached, normalised, float32, as
        ``[capacity, P]`` and their keys ``[capacity, 3]``, padded with ``EMPTY`` keys.

        Every rank must gather tensors of one shape, whatever its number of expressions.
        """
        _, num_query, dim = embeddings.shape
        feeds = [e for e in range(keys.num_expressions) if self.rules.feeds_bank(keys.dataset[e])]
        count = len(feeds) * num_query
        if count > capacity:
            raise ValueError(f"{count} embeddings exceed the bank push capacity {capacity}")
        padded = torch.zeros(capacity, dim, dtype=torch.float32, device=embeddings.device)
        padded_keys = torch.full((capacity, KEY_COLUMNS), EMPTY, dtype=torch.long)
        if feeds:
            padded[:count] = F.normalize(embeddings.detach()[feeds].float().reshape(-1, dim), dim=-1)
            padded_keys[:count] = torch.tensor([[keys.objects[e], keys.expression[e], keys.frame[e][q]]
                                                for e in feeds for q in range(num_query)], dtype=torch.long)
        return padded, padded_keys.to(embeddings.device)

    @torch.no_grad()
    def push(self, embeddings: Tensor, keys: Tensor) -> None:
        """Write ``embeddings [N, P]`` with ``keys [N, 3]`` (``padded_rows``) FIFO into the bank (wrapping); rows whose
        object-set key is ``EMPTY`` are padding, not written."""
        keep = keys[:, 0] != EMPTY
        rows, keys = F.normalize(embeddings[keep].float(), dim=-1), keys[keep]
        count = rows.shape[0]
        if count == 0:
            return
        kept = min(count, self.bank_size)  # a push larger than the bank: only its last rows survive
        slots = (int(self.bank_pointer) + count - kept + torch.arange(kept, device=self.bank_keys.device)) % self.bank_size
        self.bank_embeddings[slots] = rows[-kept:].to(self.bank_embeddings)
        for column, buffer in enumerate((self.bank_keys, self.bank_expressions, self.bank_frames)):
            buffer[slots] = keys[-kept:, column].to(buffer)
        self.bank_pointer.fill_((int(self.bank_pointer) + count) % self.bank_size)
