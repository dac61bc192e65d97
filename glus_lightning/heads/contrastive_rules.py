"""Which rows the object-contrastive loss compares with an anchor, as options (``loss.contrastive_*``).

The defaults in ``conf/config.yaml`` are this repo's rules; each of the GLUS reference's rules is one value away
(``docs/design.md`` says why they differ and lists the overrides). An anchor is one (expression, query frame) row of
the batch. Candidate rows are numbered as the head lays them out: the batch's rows ``e * Q + q`` (with their graph),
then the bank's slots ``E * Q + slot`` (detached; after a push before the loss they include this step's rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from glus_lightning.config import LossConfig
from glus_lightning.heads.contrastive_keys import RowKeys

POSITIVES = ("batch", "bank")
NEGATIVE_SAMPLING = ("hard_first", "uniform_with_replacement")
PUSH = ("after", "before")


def _check_choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"loss.{key}={value!r} is not valid; valid: {', '.join(valid)}")


def _check_at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"loss.{key}={value} is not valid; valid: an integer >= {low}")


@dataclass(frozen=True)
class ContrastiveRules:
    """The rules ``loss.contrastive_*`` select, checked when built (the message names the key and what is valid)."""

    positives: str  # batch: every other expression of the anchor's object set in the batch, at the anchor's frame;
    #                 bank: one drawn from the bank's rows of another expression of that object set at that frame
    negative_sampling: str  # hard_first: the batch's other object sets of the video, then the bank most recent first,
    #                         the first num_negatives; uniform_with_replacement: num_negatives drawn from the bank
    num_negatives: int
    min_negatives: int  # an anchor with fewer negative candidates is skipped (0: never)
    min_anchors: int  # the term is a zero unless at least this many anchors have a positive and enough negatives
    push: str  # after: the step's rows enter the bank after its loss; before: before it, as candidates of that loss
    bank_sources: tuple[str, ...] | None  # datasets whose rows enter the bank; None: every dataset

    def __post_init__(self) -> None:
        _check_choice("contrastive_positives", self.positives, POSITIVES)
        _check_choice("contrastive_negative_sampling", self.negative_sampling, NEGATIVE_SAMPLING)
        _check_choice("contrastive_push", self.push, PUSH)
        _check_at_least("contrastive_negatives", self.num_negatives, 1)
        _check_at_least("contrastive_min_negatives", self.min_negatives, 0)
        _check_at_least("contrastive_min_anchors", self.min_anchors, 1)
        if self.bank_sources is not None and (not self.bank_sources or not all(isinstance(s, str) and s for s in self.bank_sources)):
            raise ValueError(f"loss.contrastive_bank_sources={list(self.bank_sources)} is not valid; "
                             "valid: null (every dataset) or a non-empty list of dataset names")

    @classmethod
    def from_config(cls, loss: LossConfig | DictConfig, train_datasets: list[str]) -> ContrastiveRules:
        """The rules of ``loss``; a bank source must name a dataset of ``data.train`` (``train_datasets``)."""
        sources = None if loss.contrastive_bank_sources is None else tuple(loss.contrastive_bank_sources)
        rules = cls(positives=loss.contrastive_positives, negative_sampling=loss.contrastive_negative_sampling,
                    num_negatives=loss.contrastive_negatives, min_negatives=loss.contrastive_min_negatives,
                    min_anchors=loss.contrastive_min_anchors, push=loss.contrastive_push, bank_sources=sources)
        unknown = [s for s in sources or () if s not in train_datasets]
        if unknown:
            raise ValueError(f"loss.contrastive_bank_sources={list(sources)}: {unknown} not in data.train, so nothing of "
                             f"theirs would reach the bank; valid: {', '.join(train_datasets)}")
        return rules

    @property
    def draws(self) -> bool:
        """Whether a rule draws at random (torch's generator, which ``StepSeed`` seeds per training batch)."""
        return self.positives == "bank" or self.negative_sampling == "uniform_with_replacement"

    def feeds_bank(self, dataset: str) -> bool:
        return self.bank_sources is None or dataset in self.bank_sources


@dataclass(frozen=True)
class BankKeys:
    """The bank's keys per slot, and its written slots from the most recently written to the oldest."""

    objects: list[int]
    expression: list[int]
    frame: list[int]
    recent_first: list[int]


@dataclass(frozen=True)
class Anchor:
    row: int
    positives: list[int]  # candidate rows
    negatives: list[int]  # every negative candidate, in the order the sampling reads them


@dataclass(frozen=True)
class Term:
    """One InfoNCE term: an anchor row, its positive row and its negative rows."""

    anchor: int
    positive: int
    negatives: list[int]


class AnchorCandidates:
    """The positive and negative candidate rows of each anchor ``(e, q)`` of a batch under ``rules``."""

    def __init__(self, keys: RowKeys, bank: BankKeys, rules: ContrastiveRules) -> None:
        self.keys, self.bank, self.rules = keys, bank, rules
        self.num_query = len(keys.frame[0]) if keys.frame else 0
        self.first_bank_row = keys.num_expressions * self.num_query

    def _same_video(self, e: int, same_objects: bool) -> list[int]:
        k = self.keys
        return [o for o in range(k.num_expressions) if o != e and k.video[o] == k.video[e]
                and (k.objects[o] == k.objects[e]) == same_objects]

    def positives(self, e: int, q: int) -> list[int]:
        """Rows of another expression of the anchor's object set at the anchor's frame: the batch's (expressions of a
        video share its query frames) or the bank's, most recent first."""
        if self.rules.positives == "batch":
            return [o * self.num_query + q for o in self._same_video(e, same_objects=True)]
        k, b = self.keys, self.bank
        return [self.first_bank_row + s for s in b.recent_first
                if b.objects[s] == k.objects[e] and b.expression[s] != k.expression[e] and b.frame[s] == k.frame[e][q]]

    def negatives(self, e: int, q: int) -> list[int]:
        return self._hard_first(e, q) if self.rules.negative_sampling == "hard_first" else self._bank_negatives(e, q)

    def _hard_first(self, e: int, q: int) -> list[int]:
        """The batch's other object sets of the anchor's video at frame ``q``, then at the other frames (in frame
        order); then the bank most recent first, without the anchor's own object set (the same object in an earlier
        step is not a negative) and, after a push before the loss, without the bank's copies of those batch rows."""
        k, b, nq = self.keys, self.bank, self.num_query
        others = self._same_video(e, same_objects=False)
        rows = [o * nq + q for o in others] + [o * nq + f for f in range(nq) if f != q for o in others]
        copies = {(k.expression[o], k.frame[o][f]) for o in others for f in range(nq)} if self.rules.push == "before" else set()
        return rows + [self.first_bank_row + s for s in b.recent_first
                       if b.objects[s] != k.objects[e] and (b.expression[s], b.frame[s]) not in copies]

    def _bank_negatives(self, e: int, q: int) -> list[int]:
        """The reference's: the bank's rows (most recent first) other than the anchor's own expression and the rows of
        another expression of its object set at its frame (its positives). Other frames of that object set count."""
        k, b = self.keys, self.bank
        return [self.first_bank_row + s for s in b.recent_first if b.expression[s] != k.expression[e]
                and not (b.objects[s] == k.objects[e] and b.frame[s] == k.frame[e][q])]

    def anchors(self) -> list[Anchor]:
        """Anchors in row order that have a positive and at least ``min_negatives`` negative candidates."""
        found = []
        for e in range(self.keys.num_expressions):
            for q in range(self.num_query):
                positives = self.positives(e, q)
                if not positives:
                    continue
                negatives = self.negatives(e, q)
                if len(negatives) >= self.rules.min_negatives:
                    found.append(Anchor(e * self.num_query + q, positives, negatives))
        return found


def draw(u: float, n: int) -> int:
    """The index ``floor(u * n)`` for ``u`` uniform in [0, 1), kept below ``n`` against rounding."""
    return min(int(u * n), n - 1)


def choose_terms(anchors: list[Anchor], rules: ContrastiveRules) -> list[Term]:
    """The InfoNCE terms of the anchors.

    Positives: ``batch``, one term per positive; ``bank``, one term with a positive drawn uniformly. Negatives:
    ``hard_first``, the first ``num_negatives`` candidates; ``uniform_with_replacement``, ``num_negatives`` drawn
    uniformly with replacement (none when there is no candidate). Randomness: one ``torch.rand(A, 1 + num_negatives,
    dtype=float64)`` on the CPU generator for the A anchors in order; anchor a's positive is ``draw(u[a, 0], P)`` and
    its j-th negative ``draw(u[a, 1 + j], C)`` over its candidate lists.
    """
    n = rules.num_negatives
    u = torch.rand(len(anchors), 1 + n, dtype=torch.float64).tolist() if rules.draws else None
    terms = []
    for a, anchor in enumerate(anchors):
        neg = anchor.negatives
        if rules.negative_sampling == "hard_first":
            chosen = neg[:n]
        else:
            chosen = [neg[draw(x, len(neg))] for x in u[a][1:]] if neg else []
        if rules.positives == "batch":
            terms += [Term(anchor.row, p, chosen) for p in anchor.positives]
        else:
            terms.append(Term(anchor.row, anchor.positives[draw(u[a][0], len(anchor.positives))], chosen))
    return terms
