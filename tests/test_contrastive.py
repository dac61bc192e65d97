"""Object-contrastive loss: InfoNCE value, choice of positives and negatives, the FIFO bank (checkpointed, identical
on every rank) and the "pairs" expression sampling that feeds it."""

from __future__ import annotations

import json
import math
import os
import random
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
from glus_lightning.config import compose
from glus_lightning.heads.object_contrastive import EMPTY, ObjectContrastiveHead, expression_keys
from glus_lightning.module import GLUSModule

ROOT = Path(__file__).resolve().parents[1]
FROZEN = ["backbone.train_vision_tower=false", "segmenter.train_image_encoder=false", "segmenter.train_memory=false"]


def reference_loss(emb: torch.Tensor, video: list[int], objects: list[int], bank: torch.Tensor, bank_keys: list[int],
                   pointer: int, num_negatives: int, temperature: float) -> float:
    """The loss as METHOD.md states it, one anchor, positive and negative at a time."""
    num_exp, num_query, _ = emb.shape

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b) / (float(a.norm()) * float(b.norm()))

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
                s_ap = cos(emb[e, q], emb[p, q]) / temperature
                denominator = math.exp(s_ap) + sum(math.exp(cos(emb[e, q], n) / temperature) for n in negatives)
                terms.append(-math.log(math.exp(s_ap) / denominator))
    return sum(terms) / len(terms)


def filled_head(num_negatives: int = 128) -> ObjectContrastiveHead:
    """Bank of 4 slots: keys 10 (slot 0), 20 (slot 1), 30 (slot 2), slot 3 empty; pointer 3."""
    head = ObjectContrastiveHead(dim=8, bank_size=4, num_negatives=num_negatives, temperature=0.5)
    head.push(torch.randn(3, 8), torch.tensor([10, EMPTY, 20]))
    head.push(torch.randn(1, 8), torch.tensor([30]))
    return head


def test_keys_are_stable_and_ignore_object_order(data_root: Path) -> None:
    cfg = tiny_config(data_root)
    batch = next(iter(RefVOSDataModule(cfg.data).train_dataloader()))
    video_keys, object_keys = expression_keys(batch)
    b = int(batch.expression_video[0])
    name = f"{batch.datasets[b]}/{batch.video_ids[b]}"
    objs = ",".join(str(o) for o in sorted(batch.expression_objects[0]))
    assert int(video_keys[0]) == zlib.crc32(name.encode()) and int(object_keys[0]) == zlib.crc32(f"{name}/{objs}".encode())
    batch.expression_objects[0] = tuple(reversed(batch.expression_objects[0]))
    assert int(expression_keys(batch)[1][0]) == int(object_keys[0])


def test_push_is_fifo_wraps_and_skips_padding() -> None:
    head = ObjectContrastiveHead(dim=3, bank_size=4, num_negatives=8, temperature=0.1)
    assert head.bank_keys.tolist() == [EMPTY] * 4 and int(head.bank_pointer) == 0
    rows = torch.tensor([[3.0, 0, 0], [1, 1, 1], [0, 0, 2]])
    head.push(rows, torch.tensor([1, EMPTY, 2]))
    assert head.bank_keys.tolist() == [1, 2, EMPTY, EMPTY] and int(head.bank_pointer) == 2
    torch.testing.assert_close(head.bank_embeddings[:2], torch.tensor([[1.0, 0, 0], [0, 0, 1]]))  # normalised
    head.push(torch.randn(3, 3), torch.tensor([3, 4, 5]))
    assert head.bank_keys.tolist() == [5, 2, 3, 4] and int(head.bank_pointer) == 1
    head.push(torch.randn(6, 3), torch.tensor([10, 11, 12, 13, 14, 15]))  # more than the bank: the last 4 survive
    assert head.bank_keys.tolist() == [13, 14, 15, 12] and int(head.bank_pointer) == 3
    assert [int(head.bank_keys[s]) for s in head.bank_order()] == [15, 14, 13, 12]  # most recent first


def test_negatives_hard_same_frame_first_then_bank_most_recent_first() -> None:
    # expressions: 0, 1 -> video 1 object set 10; 2 -> video 1 object set 99; 3 -> video 2 object set 77
    video, objects = [1, 1, 1, 2], [10, 10, 99, 77]
    head = filled_head()
    bank = 4 * 2  # first bank row: E * Q
    # anchor (0, q=1): expression 2 at frame 1, then at frame 0; bank slot 2 (30), slot 1 (20); slot 0 holds the
    # anchor's own object set (10) and slot 3 is empty
    assert head.select_negatives(0, 1, video, objects, num_query=2) == [2 * 2 + 1, 2 * 2 + 0, bank + 2, bank + 1]
    assert head.select_negatives(2, 0, video, objects, num_query=2) == [0, 2, 1, 3, bank + 2, bank + 1, bank + 0]
    assert head.select_negatives(3, 0, video, objects, num_query=2) == [bank + 2, bank + 1, bank + 0]  # no hard ones
    head.num_negatives = 3
    assert head.select_negatives(0, 1, video, objects, num_query=2) == [5, 4, bank + 2]
    assert head.positives(0, video, objects) == [1] and head.positives(2, video, objects) == []
    assert head.positives(3, video, objects) == []


@pytest.mark.parametrize("num_negatives", [128, 3, 1])
def test_loss_matches_a_direct_computation(num_negatives: int) -> None:
    torch.manual_seed(0)
    # video 1: object sets 10 (x2), 99; video 2: object set 10's key by coincidence but another video (no positive),
    # object set 55 twice; video 3: one expression (no positive)
    video, objects = [1, 1, 1, 2, 2, 2, 3], [10, 10, 99, 10, 55, 55, 66]
    head = filled_head(num_negatives)
    emb = torch.randn(len(video), 3, 8, dtype=torch.float64, requires_grad=True)
    loss = head(emb, torch.tensor(video), torch.tensor(objects))
    expected = reference_loss(emb.detach(), video, objects, head.bank_embeddings.double(), head.bank_keys.tolist(),
                              int(head.bank_pointer), num_negatives, head.temperature)
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64))
    loss.backward()
    assert emb.grad[[0, 1, 4, 5]].abs().sum() > 0 and emb.grad[6].abs().sum() == 0  # no anchor, not a negative of any


def test_no_positive_gives_a_connected_zero() -> None:
    head = ObjectContrastiveHead(dim=8, bank_size=4, num_negatives=4, temperature=0.07)
    emb = torch.randn(3, 2, 8, requires_grad=True)
    loss = head(emb, torch.tensor([1, 1, 2]), torch.tensor([5, 6, 7]))
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert emb.grad is not None


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
        video_keys, object_keys = (k.tolist() for k in expression_keys(batch))
        return any(model.contrastive.positives(e, video_keys, object_keys) for e in range(len(object_keys)))

    batch = next(b for b in RefVOSDataModule(cfg.data).train_dataloader() if has_pair(b))
    video_keys, object_keys = expression_keys(batch)
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss)
    rows = len(batch.expressions) * batch.num_query
    assert (model.contrastive.bank_keys != EMPTY).sum() == rows and int(model.contrastive.bank_pointer) == rows
    model.zero_grad()
    contrastive = model.contrastive(model(batch).prompts, video_keys, object_keys)
    assert contrastive > 0
    contrastive.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("seg_projection.")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_bank_survives_a_checkpoint_round_trip(data_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(data_root, "loss.contrastive_bank_size=16")
    model = GLUSModule(cfg)
    model.contrastive.push(torch.randn(5, model.segmenter.prompt_dim), torch.tensor([1, 2, EMPTY, 3, 4]))
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    assert {"contrastive.bank_embeddings", "contrastive.bank_keys", "contrastive.bank_pointer"} <= set(checkpoint["state_dict"])
    torch.save(checkpoint, tmp_path / "model.ckpt")
    loaded = torch.load(tmp_path / "model.ckpt", weights_only=True)

    fresh = GLUSModule(cfg)
    fresh.on_load_checkpoint(loaded)
    fresh.load_state_dict(loaded["state_dict"], strict=False)
    for name in ("bank_embeddings", "bank_keys", "bank_pointer"):
        assert torch.equal(getattr(fresh.contrastive, name), getattr(model.contrastive, name))
    assert fresh.contrastive.bank_keys[:5].tolist() == [1, 2, 3, 4, EMPTY] and int(fresh.contrastive.bank_pointer) == 4

    # evaluating without the loss: the bank is training-only state and is ignored
    GLUSModule(tiny_config(data_root, "loss.contrastive_weight=0")).on_load_checkpoint(loaded)
    # switching the loss on from a checkpoint trained without it: the bank starts empty
    without = {**loaded, "state_dict": {k: v for k, v in loaded["state_dict"].items() if not k.startswith("contrastive.")}}
    fresh.on_load_checkpoint(without)
    # another bank size cannot be loaded: the message names the setting
    with pytest.raises(ValueError, match="contrastive_bank_size.*contrastive.bank_keys"):
        GLUSModule(tiny_config(data_root, "loss.contrastive_bank_size=8")).on_load_checkpoint(loaded)


def test_ddp_ranks_share_one_bank_with_both_ranks_entries(data_root: Path, tmp_path: Path) -> None:
    overrides = [f"data.root={data_root}", "data.num_workers=0", "data.num_context=2", "data.num_query=3",
                 "data.batch_size=1", "data.max_expressions=2", "data.samples_per_epoch=4", "trainer.max_steps=2",
                 "trainer.val_every_n_steps=2", "trainer.accumulate_grad_batches=1", f"run_dir={tmp_path / 'runs'}",
                 "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
                 "loss.contrastive_weight=0.1", "data.expression_sampling=pairs", *FROZEN]
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


def test_one_process_trainer_step_pushes_this_steps_rows(data_root: Path) -> None:
    """With one process ``all_gather`` adds no rank dimension: the bank gets exactly this step's rows."""
    cfg = tiny_config(data_root, *FROZEN)
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
