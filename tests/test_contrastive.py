"""Object-contrastive loss: InfoNCE value, choice of positives and negatives under our rules and the GLUS reference's
(``ContrastiveRules``), the FIFO bank (checkpointed, identical on every rank) and the "pairs" expression sampling that
feeds it."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import subprocess
import sys
import zlib
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig

from datamodules.batch import RefVOSBatch
from datamodules.datamodule import RefVOSDataModule
from datamodules.records import Expression, VideoRecord
from datamodules.sampling import choose_expressions, plan_train
from glus_lightning.config import ConfigError, compose
from glus_lightning.heads.contrastive_keys import EMPTY, RowKeys, row_keys
from glus_lightning.heads.contrastive_rules import AnchorCandidates, ContrastiveRules, choose_terms
from glus_lightning.heads.object_contrastive import ObjectContrastiveHead
from glus_lightning.module import GLUSModule

ROOT = Path(__file__).resolve().parents[1]
FROZEN = ["backbone.train_vision_tower=false", "segmenter.train_image_encoder=false", "segmenter.train_memory=false"]
REFERENCE_EXPERIMENT = "glus_s_reference_contrastive"


def ours(**changes: object) -> ContrastiveRules:
    """The rules conf/config.yaml sets (read from it, not restated here), with ``changes``."""
    return dataclasses.replace(ContrastiveRules.from_config(compose().loss, ["synthetic"]), **changes)


def reference(**changes: object) -> ContrastiveRules:
    """The rules of the reference experiment, with ``changes``."""
    cfg = compose([f"experiment={REFERENCE_EXPERIMENT}"])
    return dataclasses.replace(ContrastiveRules.from_config(cfg.loss, [s.name for s in cfg.data.train]), **changes)


def keys(video: list[int], objects: list[int], num_query: int, datasets: list[str] | None = None) -> RowKeys:
    """Expression e has key 1000 + e; frame q of video v has key 100 * v + q (a video's expressions share its frames)."""
    return RowKeys(list(video), list(objects), [1000 + e for e in range(len(objects))],
                   [[100 * v + q for q in range(num_query)] for v in video], datasets or ["mevis"] * len(objects))


def push(head: ObjectContrastiveHead, rows: torch.Tensor, row_keys: list[tuple[int, int, int]]) -> None:
    """Push rows with (object set, expression, frame) keys."""
    head.push(rows, torch.tensor(row_keys, dtype=torch.long))


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.double() @ b.double()) / (float(a.double().norm()) * float(b.double().norm()))


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: list[torch.Tensor], temperature: float) -> float:
    """-log(e^(cos(a,p)/t) / (e^(cos(a,p)/t) + sum_n e^(cos(a,n)/t))), one term written out."""
    s_pos = math.exp(cos(anchor, positive) / temperature)
    return -math.log(s_pos / (s_pos + sum(math.exp(cos(anchor, n) / temperature) for n in negatives)))


def reference_loss(emb: torch.Tensor, video: list[int], objects: list[int], bank: torch.Tensor, bank_keys: list[int],
                   pointer: int, num_negatives: int, temperature: float) -> float:
    """Our default loss as docs/design.md states it, one anchor, positive and negative at a time."""
    num_exp, num_query, _ = emb.shape
    terms = []
    for e in range(num_exp):
        for q in range(num_query):
            negatives = []
            for frame in [q] + [f for f in range(num_query) if f != q]:
                for o in range(num_exp):
                    if video[o] == video[e] and objects[o] != objects[e]:
                        negatives.append(emb[o, frame])
            for back in range(1, len(bank_keys) + 1):
                slot = (pointer - back) % len(bank_keys)
                if bank_keys[slot] != EMPTY and bank_keys[slot] != objects[e]:
                    negatives.append(bank[slot])
            negatives = negatives[:num_negatives]
            for p in range(num_exp):
                if p == e or video[p] != video[e] or objects[p] != objects[e]:
                    continue
                terms.append(info_nce(emb[e, q], emb[p, q], negatives, temperature))
    return sum(terms) / len(terms)


def filled_head(rules: ContrastiveRules | None = None) -> ObjectContrastiveHead:
    """Bank of 4 slots: object sets 10 (slot 0), 20 (slot 1), 30 (slot 2), slot 3 empty; pointer 3."""
    head = ObjectContrastiveHead(dim=8, bank_size=4, temperature=0.5, rules=rules or ours())
    push(head, torch.randn(3, 8), [(10, 510, 9), (EMPTY, EMPTY, EMPTY), (20, 520, 9)])
    push(head, torch.randn(1, 8), [(30, 530, 9)])
    return head


def test_keys_are_stable_and_ignore_object_order(data_root: Path) -> None:
    cfg = tiny_config(data_root)
    batch = next(iter(RefVOSDataModule(cfg.data).train_dataloader()))
    k = row_keys(batch)
    b = int(batch.expression_video[0])
    name = f"{batch.datasets[b]}/{batch.video_ids[b]}"
    objs = ",".join(str(o) for o in sorted(batch.expression_objects[0]))
    assert k.video[0] == zlib.crc32(name.encode()) and k.objects[0] == zlib.crc32(f"{name}/{objs}".encode())
    assert k.expression[0] == zlib.crc32(f"{name}/{batch.expression_ids[0]}".encode())
    assert k.frame[0] == [zlib.crc32(f"{name}/{f}".encode()) for f in batch.frame_names[b]]
    assert k.dataset[0] == batch.datasets[b]
    batch.expression_objects[0] = tuple(reversed(batch.expression_objects[0]))
    assert row_keys(batch).objects[0] == k.objects[0]


def test_push_is_fifo_wraps_and_skips_padding() -> None:
    head = ObjectContrastiveHead(dim=3, bank_size=4, temperature=0.1, rules=ours())
    assert head.bank_keys.tolist() == [EMPTY] * 4 and int(head.bank_pointer) == 0
    rows = torch.tensor([[3.0, 0, 0], [1, 1, 1], [0, 0, 2]])
    push(head, rows, [(1, 11, 21), (EMPTY, EMPTY, EMPTY), (2, 12, 22)])
    assert head.bank_keys.tolist() == [1, 2, EMPTY, EMPTY] and int(head.bank_pointer) == 2
    assert head.bank_expressions.tolist() == [11, 12, EMPTY, EMPTY] and head.bank_frames.tolist() == [21, 22, EMPTY, EMPTY]
    torch.testing.assert_close(head.bank_embeddings[:2], torch.tensor([[1.0, 0, 0], [0, 0, 1]]))  # normalised
    push(head, torch.randn(3, 3), [(3, 13, 23), (4, 14, 24), (5, 15, 25)])
    assert head.bank_keys.tolist() == [5, 2, 3, 4] and int(head.bank_pointer) == 1
    push(head, torch.randn(6, 3), [(k, k + 10, k + 20) for k in range(10, 16)])  # more than the bank: the last 4 survive
    assert head.bank_keys.tolist() == [13, 14, 15, 12] and int(head.bank_pointer) == 3
    assert head.bank_frames.tolist() == [33, 34, 35, 32]
    assert [int(head.bank_keys[s]) for s in head.bank_order()] == [15, 14, 13, 12]  # most recent first


def test_negatives_hard_same_frame_first_then_bank_most_recent_first() -> None:
    # expressions: 0, 1 -> video 1 object set 10; 2 -> video 1 object set 99; 3 -> video 2 object set 77
    k = keys([1, 1, 1, 2], [10, 10, 99, 77], num_query=2)
    head = filled_head()
    candidates = AnchorCandidates(k, head.bank_snapshot(), head.rules)
    bank = 4 * 2  # first bank row: E * Q
    # anchor (0, q=1): expression 2 at frame 1, then at frame 0; bank slot 2 (30), slot 1 (20); slot 0 holds the
    # anchor's own object set (10) and slot 3 is empty
    assert candidates.negatives(0, 1) == [2 * 2 + 1, 2 * 2 + 0, bank + 2, bank + 1]
    assert candidates.negatives(2, 0) == [0, 2, 1, 3, bank + 2, bank + 1, bank + 0]
    assert candidates.negatives(3, 0) == [bank + 2, bank + 1, bank + 0]  # no hard ones
    assert candidates.positives(0, 1) == [1 * 2 + 1] and candidates.positives(2, 0) == candidates.positives(3, 0) == []
    three = dataclasses.replace(head.rules, num_negatives=3)
    anchors = AnchorCandidates(k, head.bank_snapshot(), three).anchors()
    assert [(t.anchor, t.positive, t.negatives) for t in choose_terms(anchors, three)][1] == (1, 3, [5, 4, bank + 2])


@pytest.mark.parametrize("num_negatives", [128, 3, 1])
def test_loss_matches_a_direct_computation(num_negatives: int) -> None:
    torch.manual_seed(0)
    # video 1: object sets 10 (x2), 99; video 2: object set 10's key by coincidence but another video (no positive),
    # object set 55 twice; video 3: one expression (no positive)
    video, objects = [1, 1, 1, 2, 2, 2, 3], [10, 10, 99, 10, 55, 55, 66]
    head = filled_head(ours(num_negatives=num_negatives))
    emb = torch.randn(len(video), 3, 8, dtype=torch.float64, requires_grad=True)
    loss = head(emb, keys(video, objects, num_query=3))
    expected = reference_loss(emb.detach(), video, objects, head.bank_embeddings.double(), head.bank_keys.tolist(),
                              int(head.bank_pointer), num_negatives, head.temperature)
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64))
    loss.backward()
    assert emb.grad[[0, 1, 4, 5]].abs().sum() > 0 and emb.grad[6].abs().sum() == 0  # no anchor, not a negative of any


def test_no_positive_gives_a_connected_zero() -> None:
    head = ObjectContrastiveHead(dim=8, bank_size=4, temperature=0.07, rules=ours())
    emb = torch.randn(3, 2, 8, requires_grad=True)
    loss = head(emb, keys([1, 1, 2], [5, 6, 7], num_query=2))
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert emb.grad is not None


# ------------------------------------------------------------------------------ the reference's rules, one by one
def test_bank_sources_feed_only_the_named_datasets() -> None:
    k = keys([1, 2, 3], [10, 20, 30], num_query=2, datasets=["mevis", "ref-youtube-vos", "mevis"])
    emb = torch.randn(3, 2, 4)
    head = ObjectContrastiveHead(dim=4, bank_size=8, temperature=0.1, rules=ours(bank_sources=("mevis",)))
    rows, row_keys_ = head.padded_rows(emb, k, capacity=7)
    # expressions 0 and 2 (mevis), each at frames 0 and 1; then padding
    assert row_keys_.tolist() == [[10, 1000, 100], [10, 1000, 101], [30, 1002, 300], [30, 1002, 301]] + [[EMPTY] * 3] * 3
    torch.testing.assert_close(rows[:4], torch.nn.functional.normalize(emb[[0, 0, 2, 2], [0, 1, 0, 1]], dim=-1))
    head.push(rows, row_keys_)
    assert head.bank_keys.tolist() == [10, 10, 30, 30] + [EMPTY] * 4
    every = ObjectContrastiveHead(dim=4, bank_size=8, temperature=0.1, rules=ours())  # null: every dataset
    every.push(*every.padded_rows(emb, k, capacity=7))
    assert every.bank_keys.tolist() == [10, 10, 20, 20, 30, 30, EMPTY, EMPTY]


def min_negatives_case(min_negatives: int) -> tuple[torch.Tensor, torch.Tensor, float, ObjectContrastiveHead]:
    """Q = 1. Bank (most recent first): object sets 50, 10, 40, 30. Video 1: expressions 0, 1 of object set 10 and 2
    of 20, so anchors 0 and 1 have 4 negative candidates (expression 2; bank 50, 40, 30). Video 2: expressions 3, 4
    of object set 50, with 3 candidates (bank 10, 40, 30)."""
    torch.manual_seed(1)
    head = ObjectContrastiveHead(dim=6, bank_size=8, temperature=0.2, rules=ours(min_negatives=min_negatives))
    bank = torch.randn(4, 6)
    push(head, bank, [(30, 530, 9), (40, 540, 9), (10, 510, 9), (50, 550, 9)])
    emb = torch.randn(5, 1, 6, requires_grad=True)
    loss = head(emb, keys([1, 1, 1, 2, 2], [10, 10, 20, 50, 50], num_query=1))
    x = emb.detach()[:, 0]
    video_1 = [info_nce(x[0], x[1], [x[2], bank[3], bank[1], bank[0]], 0.2),
               info_nce(x[1], x[0], [x[2], bank[3], bank[1], bank[0]], 0.2)]
    video_2 = [info_nce(x[3], x[4], [bank[2], bank[1], bank[0]], 0.2), info_nce(x[4], x[3], [bank[2], bank[1], bank[0]], 0.2)]
    expected = {3: sum(video_1 + video_2) / 4, 4: sum(video_1) / 2}.get(min_negatives, 0.0)
    return loss, emb, expected, head


@pytest.mark.parametrize("min_negatives", [3, 4, 5])
def test_an_anchor_with_too_few_negative_candidates_contributes_nothing(min_negatives: int) -> None:
    loss, emb, expected, _ = min_negatives_case(min_negatives)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    loss.backward()
    assert (emb.grad[3:].abs().sum() > 0) == (min_negatives <= 3)  # video 2's anchors count only with 3 or fewer
    assert (emb.grad[:2].abs().sum() > 0) == (min_negatives <= 4)


def test_the_term_is_dropped_with_fewer_than_min_anchors() -> None:
    """Positives from the bank (Q = 1): anchor 0 (object set 10, frame 100) has bank row P1 of another expression of
    10 at frame 100; anchor 1 (object set 70, frame 200) has P2. N is another object set at another frame."""
    torch.manual_seed(2)
    p1, n, p2 = torch.randn(3, 6)
    head = ObjectContrastiveHead(dim=6, bank_size=8, temperature=0.1, rules=ours(positives="bank", min_anchors=2))
    push(head, torch.stack([p1, n]), [(10, 777, 100), (60, 888, 555)])
    one = torch.randn(1, 1, 6, requires_grad=True)
    loss = head(one, keys([1], [10], num_query=1))
    assert loss.item() == 0 and loss.requires_grad  # one valid anchor: dropped
    default = ObjectContrastiveHead(dim=6, bank_size=8, temperature=0.1, rules=ours(positives="bank"))
    default.load_state_dict(head.state_dict())  # min_anchors 1: the same anchor counts
    assert default(one, keys([1], [10], num_query=1)).item() == pytest.approx(info_nce(one[0, 0].detach(), p1, [n], 0.1), rel=1e-5)

    push(head, p2[None], [(70, 999, 200)])
    two = torch.randn(2, 1, 6, requires_grad=True)
    loss = head(two, keys([1, 2], [10, 70], num_query=1))
    x = two.detach()[:, 0]
    expected = (info_nce(x[0], p1, [p2, n], 0.1) + info_nce(x[1], p2, [n, p1], 0.1)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    three = ObjectContrastiveHead(dim=6, bank_size=8, temperature=0.1, rules=ours(positives="bank", min_anchors=3))
    three.load_state_dict(head.state_dict())
    assert three(two, keys([1, 2], [10, 70], num_query=1)).item() == 0


def test_push_before_makes_the_batch_rows_positives_and_uniform_negatives_reproduce_a_hand_draw() -> None:
    """The reference's rules (but 3 negatives, at least 2). Video 1, Q = 2: expressions 0 and 1 of object set 10, 2
    of object set 20. Pushed first, the bank holds slots 0..5 = (e0,f0) (e0,f1) (e1,f0) (e1,f1) (e2,f0) (e2,f1)."""
    rules = reference(num_negatives=3, min_negatives=2)
    head = ObjectContrastiveHead(dim=6, bank_size=8, temperature=0.07, rules=rules)
    torch.manual_seed(3)
    emb = torch.randn(3, 2, 6, requires_grad=True)
    k = keys([1, 1, 1], [10, 10, 20], num_query=2)
    assert head(emb, k).item() == 0  # pushed after: nothing in the bank, no positive
    head.push(*head.padded_rows(emb, k, capacity=6))
    torch.manual_seed(11)
    loss = head(emb, k)

    slot = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    # per anchor in row order: its one positive slot, and its negative candidate slots, most recent first
    # (neither its own expression nor another expression of its object set at its frame); expression 2 has no positive
    hand = {(0, 0): (2, [5, 4, 3]), (0, 1): (3, [5, 4, 2]), (1, 0): (0, [5, 4, 1]), (1, 1): (1, [5, 4, 0])}
    torch.manual_seed(11)
    u = torch.rand(len(hand), 1 + 3, dtype=torch.float64)
    x = emb.detach()
    terms = []
    for a, ((e, q), (pos, cands)) in enumerate(hand.items()):
        chosen = [cands[math.floor(float(u[a, 1 + j]) * len(cands))] for j in range(3)]
        terms.append(info_nce(x[e, q], x[slot[pos]], [x[slot[c]] for c in chosen], 0.07))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    loss.backward()
    assert emb.grad[:2].abs().sum() > 0 and emb.grad[2].abs().sum() == 0  # bank rows are detached: anchors only
    torch.manual_seed(11)
    assert head(emb, k).item() == loss.item()  # the same seed, the same draws
    torch.manual_seed(12)
    assert head(emb, k).item() != loss.item()


def test_hard_first_after_a_push_before_keeps_the_batch_rows_once() -> None:
    """Video 1: expressions 0, 1 of object set 10, 2 of 20; video 2: expression 3 of 30 (Q = 2). With the push before
    the loss, anchor (0, 0)'s hard negatives are still expression 2's batch rows (with their graph), and its bank part
    gains the step's rows of video 2 but not the bank's copies of expression 2's rows."""
    k = keys([1, 1, 1, 2], [10, 10, 20, 30], num_query=2)
    emb = torch.randn(4, 2, 6)
    for push_at, bank_part in (("after", [8 + 0]), ("before", [8 + 8, 8 + 7, 8 + 0])):
        head = ObjectContrastiveHead(dim=6, bank_size=16, temperature=0.1, rules=ours(push=push_at))
        push(head, torch.randn(1, 6), [(40, 540, 9)])  # an earlier step: slot 0
        if push_at == "before":
            head.push(*head.padded_rows(emb, k, capacity=8))  # slots 1..8: (e0,f0) ... (e3,f1)
        candidates = AnchorCandidates(k, head.bank_snapshot(), head.rules)
        assert candidates.negatives(0, 0) == [2 * 2 + 0, 2 * 2 + 1, *bank_part]
        assert candidates.positives(0, 0) == [1 * 2 + 0]


def test_the_reference_experiment_selects_every_reference_rule() -> None:
    cfg = compose([f"experiment={REFERENCE_EXPERIMENT}"])
    assert reference() == ContrastiveRules(positives="bank", negative_sampling="uniform_with_replacement", num_negatives=128,
                                           min_negatives=128, min_anchors=2, push="before", bank_sources=("mevis",))
    assert cfg.data.expression_sampling == "uniform" and cfg.loss.contrastive_weight == 0.1
    assert cfg.loss.contrastive_temperature == 0.07 and cfg.loss.contrastive_bank_size == 512


@pytest.mark.parametrize(("key", "value", "message"), [
    ("contrastive_positives", "random", "loss.contrastive_positives='random' is not valid; valid: batch, bank"),
    ("contrastive_negative_sampling", "uniform",
     "loss.contrastive_negative_sampling='uniform' is not valid; valid: hard_first, uniform_with_replacement"),
    ("contrastive_push", "during", "loss.contrastive_push='during' is not valid; valid: after, before"),
    ("contrastive_negatives", "0", "loss.contrastive_negatives=0 is not valid; valid: an integer >= 1"),
    ("contrastive_min_negatives", "-1", "loss.contrastive_min_negatives=-1 is not valid; valid: an integer >= 0"),
    ("contrastive_min_anchors", "0", "loss.contrastive_min_anchors=0 is not valid; valid: an integer >= 1"),
    ("contrastive_bank_sources", "[]", "loss.contrastive_bank_sources=[] is not valid; valid: null (every dataset)"),
    ("contrastive_bank_sources", "[mevis]", ("loss.contrastive_bank_sources=['mevis']: ['mevis'] not in data.train, so "
                                             "nothing of theirs would reach the bank; valid: synthetic")),
])
def test_bad_rule_values_are_named_with_what_is_valid(key: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ContrastiveRules.from_config(compose([f"loss.{key}={value}"]).loss, ["synthetic"])


def test_a_rule_of_the_wrong_type_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="contrastive_min_anchors"):
        compose(["loss.contrastive_min_anchors=two"])


def expr(exp_id: str, *obj_ids: int) -> Expression:
    return Expression(exp_id, f"expression {exp_id}", obj_ids)


def test_pairs_sampling_gives_anchor_positive_then_other_objects() -> None:
    expressions = [expr("a", 1), expr("b", 1), expr("c", 2), expr("d", 3), expr("e", 3, 2), expr("f", 1)]
    seen_no_positive = seen_positive = False
    for seed in range(40):
        chosen = choose_expressions(expressions, 3, random.Random(seed), "pairs")
        assert chosen == choose_expressions(expressions, 3, random.Random(seed), "pairs")  # deterministic from the rng
        assert len(chosen) == 3 and len({e.exp_id for e in chosen}) == 3
        anchor = set(chosen[0].obj_ids)
        if sum(set(e.obj_ids) == anchor for e in expressions) > 1:  # the video has a positive: it comes second
            seen_positive = True
            assert set(chosen[1].obj_ids) == anchor and all(set(e.obj_ids) != anchor for e in chosen[2:])
        else:
            seen_no_positive = True
            assert all(set(e.obj_ids) != anchor for e in chosen[1:])
    assert seen_positive and seen_no_positive
    # too few other object sets: the rest are more expressions of the anchor's object set
    same = [expr("a", 1), expr("b", 1), expr("c", 1), expr("d", 2)]
    for seed in range(10):
        chosen = choose_expressions(same, 4, random.Random(seed), "pairs")
        assert sorted(e.exp_id for e in chosen) == ["a", "b", "c", "d"]
        if chosen[0].obj_ids == (1,):
            assert chosen[1].obj_ids == (1,) and chosen[2].obj_ids == (2,)


def test_uniform_sampling_is_unchanged_and_bad_values_are_named(data_root: Path) -> None:
    expressions = [expr(str(i), i) for i in range(6)]
    for seed in range(5):
        assert choose_expressions(expressions, 3, random.Random(seed), "uniform") == random.Random(seed).sample(expressions, 3)
    record = VideoRecord(dataset="d", video="v", frame_names=[f"{i}" for i in range(5)], frames=[b""] * 5, height=4, width=4,
                         expressions=expressions, masks={i: [None] * 5 for i in range(6)})
    assert plan_train(record, 2, 3, 3, random.Random(1)) == plan_train(record, 2, 3, 3, random.Random(1), "uniform")
    with pytest.raises(ValueError, match="data.expression_sampling='bogus'.*valid: uniform, pairs"):
        choose_expressions(expressions, 3, random.Random(0), "bogus")
    with pytest.raises(ValueError, match="data.expression_sampling"):
        RefVOSDataModule(tiny_config(data_root, "data.expression_sampling=bogus").data)


# ------------------------------------------------------------------------------------------- with the model
BANK = ("bank_embeddings", "bank_keys", "bank_expressions", "bank_frames", "bank_pointer")
# the reference's rules on the synthetic data (its only dataset feeds the bank), with negatives a tiny run can reach
REFERENCE_RULES = ["loss.contrastive_positives=bank", "loss.contrastive_negative_sampling=uniform_with_replacement",
                   "loss.contrastive_negatives=4", "loss.contrastive_min_negatives=2", "loss.contrastive_min_anchors=2",
                   "loss.contrastive_push=before", "loss.contrastive_bank_sources=[synthetic]"]


def tiny_config(data_root: Path, *overrides: str) -> DictConfig:
    return compose(["experiment=demo", f"data.root={data_root}", "data.num_workers=0", "data.num_context=2",
                    "data.num_query=3", "data.samples_per_epoch=8", "data.batch_size=2", "data.max_expressions=3",
                    "data.expression_sampling=pairs", "loss.contrastive_weight=0.1", *overrides])


def test_training_step_trains_the_projection_through_the_contrastive_term(data_root: Path) -> None:
    cfg = tiny_config(data_root)
    L.seed_everything(0)
    model = GLUSModule(cfg)
    assert model.contrastive is not None and not list(model.contrastive.parameters())
    assert GLUSModule(tiny_config(data_root, "loss.contrastive_weight=0")).contrastive is None
    def has_pair(batch: RefVOSBatch) -> bool:  # an anchor's video may have no second expression of its object set
        k = row_keys(batch)
        return len(set(zip(k.video, k.objects, strict=True))) < k.num_expressions

    batch = next(b for b in RefVOSDataModule(cfg.data).train_dataloader() if has_pair(b))
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss)
    rows = len(batch.expressions) * batch.num_query
    assert (model.contrastive.bank_keys != EMPTY).sum() == rows and int(model.contrastive.bank_pointer) == rows
    model.zero_grad()
    contrastive = model.contrastive(model(batch).prompts, row_keys(batch))
    assert contrastive > 0
    contrastive.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("seg_projection.")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_bank_survives_a_checkpoint_round_trip(data_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(data_root, "loss.contrastive_bank_size=16")
    model = GLUSModule(cfg)
    push(model.contrastive, torch.randn(5, model.segmenter.prompt_dim),
         [(1, 11, 21), (2, 12, 22), (EMPTY, EMPTY, EMPTY), (3, 13, 23), (4, 14, 24)])
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    assert {f"contrastive.{name}" for name in BANK} <= set(checkpoint["state_dict"])
    torch.save(checkpoint, tmp_path / "model.ckpt")
    loaded = torch.load(tmp_path / "model.ckpt", weights_only=True)

    fresh = GLUSModule(cfg)
    fresh.on_load_checkpoint(loaded)
    fresh.load_state_dict(loaded["state_dict"], strict=False)
    for name in BANK:
        assert torch.equal(getattr(fresh.contrastive, name), getattr(model.contrastive, name))
    assert fresh.contrastive.bank_keys[:5].tolist() == [1, 2, 3, 4, EMPTY] and int(fresh.contrastive.bank_pointer) == 4
    assert fresh.contrastive.bank_frames[:5].tolist() == [21, 22, 23, 24, EMPTY]

    # a bank saved before expression and frame keys existed: its rows load, those keys stay EMPTY
    older = {**loaded, "state_dict": {k: v for k, v in loaded["state_dict"].items()
                                      if k not in ("contrastive.bank_expressions", "contrastive.bank_frames")}}
    old = GLUSModule(cfg)
    old.on_load_checkpoint(older)
    old.load_state_dict(older["state_dict"], strict=False)
    assert old.contrastive.bank_keys[:5].tolist() == [1, 2, 3, 4, EMPTY] and old.contrastive.bank_expressions.tolist() == [EMPTY] * 16

    # evaluating without the loss: the bank is training-only state and is ignored
    GLUSModule(tiny_config(data_root, "loss.contrastive_weight=0")).on_load_checkpoint(loaded)
    # switching the loss on from a checkpoint trained without it: the bank starts empty
    without = {**loaded, "state_dict": {k: v for k, v in loaded["state_dict"].items() if not k.startswith("contrastive.")}}
    fresh.on_load_checkpoint(without)
    # another bank size cannot be loaded: the message names the setting
    with pytest.raises(ValueError, match="contrastive_bank_size.*contrastive.bank_keys"):
        GLUSModule(tiny_config(data_root, "loss.contrastive_bank_size=8")).on_load_checkpoint(loaded)


@pytest.mark.parametrize("rules", [[], REFERENCE_RULES], ids=["ours", "reference"])
def test_ddp_ranks_share_one_bank_with_both_ranks_entries(data_root: Path, tmp_path: Path, rules: list[str]) -> None:
    """Both push times: the gather pairs up across ranks and the banks stay identical, in rank order."""
    overrides = [f"data.root={data_root}", "data.num_workers=0", "data.num_context=2", "data.num_query=3",
                 "data.batch_size=1", "data.max_expressions=2", "data.samples_per_epoch=4", "trainer.max_steps=2", "text_warmup.steps=0",
                 "trainer.val_every_n_steps=2", "trainer.accumulate_grad_batches=1", f"run_dir={tmp_path / 'runs'}",
                 "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
                 "loss.contrastive_weight=0.1", "data.expression_sampling=pairs", *FROZEN, *rules]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fit_worker.py"), str(tmp_path), *overrides],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [[json.loads(line) for line in (tmp_path / f"losses.rank{r}.jsonl").read_text().splitlines()] for r in range(2)]
    banks = [json.loads((tmp_path / f"bank.rank{r}.json").read_text()) for r in range(2)]
    assert banks[0] == banks[1]
    # each step pushes rank 0's rows, then rank 1's: every expression once per query frame
    expected = [k for step in range(2) for rank in range(2) for k in steps[rank][step]["object_keys"] for _ in range(3)]
    assert set(steps[0][0]["object_keys"]) != set(steps[1][0]["object_keys"])  # the ranks saw different videos
    assert banks[0]["keys"][: len(expected)] == expected and banks[0]["pointer"] == len(expected)
    assert all(k == EMPTY for k in banks[0]["keys"][len(expected):])


@pytest.mark.parametrize("rules", [[], REFERENCE_RULES], ids=["ours", "reference"])
def test_one_process_trainer_step_pushes_this_steps_rows(data_root: Path, rules: list[str]) -> None:
    """With one process ``all_gather`` adds no rank dimension: the bank gets exactly this step's rows."""
    cfg = tiny_config(data_root, *FROZEN, *rules)
    L.seed_everything(0)
    model = GLUSModule(cfg)
    seen: list[int] = []

    class Rows(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: RefVOSBatch, batch_idx: int) -> None:
            seen.append(len(batch.expressions) * batch.num_query)

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Rows()])
    trainer.fit(model, datamodule=RefVOSDataModule(cfg.data))
    assert len(seen) == 2 and int(model.contrastive.bank_pointer) == sum(seen)
    assert int((model.contrastive.bank_keys != EMPTY).sum()) == sum(seen)


@pytest.mark.parametrize("push_at", ["after", "before"])
def test_the_push_comes_before_or_after_the_loss(data_root: Path, monkeypatch: pytest.MonkeyPatch, push_at: str) -> None:
    """The bank holds the step's rows when the loss is computed with ``push: before``, and only after it otherwise."""
    cfg = tiny_config(data_root, f"loss.contrastive_push={push_at}")
    L.seed_everything(0)
    model = GLUSModule(cfg)
    head, at_loss = model.contrastive, []
    real = head.forward
    monkeypatch.setattr(head, "forward", lambda emb, k: (at_loss.append(int(head.bank_pointer)), real(emb, k))[1])
    batch = next(iter(RefVOSDataModule(cfg.data).train_dataloader()))
    model.training_step(batch, 0)
    rows = len(batch.expressions) * batch.num_query
    assert at_loss == [rows if push_at == "before" else 0] and int(head.bank_pointer) == rows
