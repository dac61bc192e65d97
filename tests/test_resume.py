"""Exact resume after a SIGKILL, trainable-only safe checkpoints, and atomic checkpoint writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_contrastive import REFERENCE_RULES
from test_datamodule import data_cfg, signature, source, write_dataset
from test_scale import FROZEN, ROOT, read_run, run_worker

from datamodules.datamodule import RefVOSDataModule, rank_batches
from glus_lightning.checkpoints.checkpoint_io import AtomicCheckpointIO, atomic_torch_save, load_checkpoint
from glus_lightning.checkpoints.state import check_checkpoint_fits
from glus_lightning.config import ConfigError, compose
from glus_lightning.module import GLUSModule
from glus_lightning.runner import trainer_arguments


def overrides(data_root: Path, run_dir: Path) -> list[str]:
    # 2 steps per epoch, 4 steps: the checkpoint of step 2 is written at the end of epoch 0's validation.
    # The object-contrastive loss is on, as in the glus experiments: steps 2 and 3 draw negatives from its bank.
    return [f"data.root={data_root}", "data.num_workers=0", "data.num_context=2", "data.num_query=3", "data.batch_size=1",
            "data.max_expressions=3", "data.samples_per_epoch=2", "trainer.max_steps=4", "text_warmup.steps=0", "trainer.val_every_n_steps=2",
            "data.expression_sampling=pairs", "loss.contrastive_weight=0.1", f"run_dir={run_dir}"]


def kill_at_step(out: Path, step: int, overrides: list[str]) -> None:
    """``fit_worker`` with ``overrides`` until it reaches ``step`` (its checkpoints written), then SIGKILL."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fit_worker.py"), str(out), "--hang-at-step", str(step),
                             *overrides], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 150
    while not (out / "hung").exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"the run to interrupt ended or never reached step {step}"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # a real kill: no teardown, no final checkpoint
    _, stderr = proc.communicate()
    assert "not resumable" not in stderr  # Lightning's warning about a loader it cannot resume mid-epoch


@pytest.mark.parametrize("rules", [[], REFERENCE_RULES], ids=["ours", "reference"])
def test_killed_run_resumes_exactly(data_root: Path, tmp_path: Path, rules: list[str]) -> None:
    """With the reference's contrastive rules too: their random draws (positives, negatives) are the same on resume."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_worker(full, [*overrides(data_root, full / "runs"), *rules])

    kill_at_step(cut, 2, [*overrides(data_root, cut / "runs"), *rules])
    assert load_checkpoint(next((cut / "runs").rglob("last.ckpt")))["global_step"] == 2

    run_worker(cut, [*overrides(data_root, cut / "runs"), *rules, "ckpt_path=last"])
    (expected,), _ = read_run(full, 1)
    (got,), _ = read_run(cut, 1)  # steps 0, 1 before the kill, then 2, 3 after resuming
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    for want, have in zip(expected, got, strict=True):
        assert (have["videos"], have["frames"], have["expressions"]) == (want["videos"], want["frames"], want["expressions"])
        assert have["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
    final = load_checkpoint(next((cut / "runs").rglob("last.ckpt")))
    assert final["global_step"] == 4
    banks = [json.loads((run / "bank.rank0.json").read_text()) for run in (full, cut)]
    assert banks[0] == banks[1] and banks[0]["pointer"] > 0  # the bank came back from the checkpoint, entry for entry


def mid_epoch_overrides(data_root: Path, run_dir: Path) -> list[str]:
    # 6 micro-batches per epoch = 2 optimiser steps of 3 (one epoch is whole accumulation cycles), 2 workers taking
    # turns: last.ckpt at step 3 is written at a batch end in the middle of epoch 1 (3 of its batches consumed: 2 from
    # worker 0, 1 from worker 1), at step 6 at the last batch of epoch 2; validation at step 5 (15 micro-batches, more
    # than an epoch, which Lightning's per-epoch micro-batch interval would refuse), in the middle of epoch 2.
    return [f"data.root={data_root}", "data.num_workers=2", "data.num_context=2", "data.num_query=3", "data.batch_size=1",
            "data.max_expressions=3", "data.samples_per_epoch=6", "trainer.max_steps=7", "text_warmup.steps=0", "trainer.accumulate_grad_batches=3",
            "trainer.val_every_n_steps=5", "trainer.checkpoint_every_n_steps=3", "data.expression_sampling=pairs",
            "loss.contrastive_weight=0.1", f"run_dir={run_dir}"]


def records(out: Path, name: str) -> list[dict]:
    path = out / f"{name}.rank0.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_run_killed_mid_epoch_resumes_exactly_with_accumulation_and_workers(data_root: Path, tmp_path: Path) -> None:
    full, cut, first, second = (tmp_path / name for name in ("full", "cut", "first", "second"))
    runs = cut / "runs"  # the interrupted run and its two resumptions share one run directory
    run_worker(full, mid_epoch_overrides(data_root, full / "runs"), timeout=240)
    batches = records(full, "losses")
    assert len(batches) == 7 * 3 and [(r["epoch"], r["batch"]) for r in batches[:7]] == [(0, i) for i in range(6)] + [(1, 0)]
    assert [r["step"] for r in records(full, "val_steps")] == [5, 7]  # the cadence's, and the last step's (ValidateLastStep)
    # last.ckpt every 3 steps at a batch end, after the validation (both files at step 5) and after the last step's
    assert [(r["step"], r["epoch"], r["batch"]) for r in records(full, "saves")] == [
        (3, 1, 2), (5, 2, 2), (5, 2, 2), (6, 2, 5), (7, 3, 2)]

    kill_at_step(cut, 4, mid_epoch_overrides(data_root, runs))  # killed in step 4: last.ckpt is step 3's
    assert load_checkpoint(next(runs.rglob("last.ckpt")))["global_step"] == 3
    kill_at_step(first, 6, [*mid_epoch_overrides(data_root, runs), "ckpt_path=last"])  # killed in step 6: step 6's
    assert load_checkpoint(next(runs.rglob("last.ckpt")))["global_step"] == 6
    run_worker(second, [*mid_epoch_overrides(data_root, runs), "ckpt_path=last"], timeout=240)

    # the first resumption starts with batch 3 of epoch 1, the second with epoch 3: each the batches the full run drew
    resumed = records(first, "losses") + records(second, "losses")
    assert [(r["epoch"], r["batch"]) for r in resumed] == [(r["epoch"], r["batch"]) for r in batches[9:]]
    for want, have in zip(batches[9:], resumed, strict=True):
        assert (have["videos"], have["frames"], have["expressions"]) == (want["videos"], want["frames"], want["expressions"])
        assert have["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
    assert [r["step"] for r in records(first, "val_steps")] == [5] and [r["step"] for r in records(second, "val_steps")] == [7]
    assert records(first, "val_steps")[0]["J&F"] == pytest.approx(records(full, "val_steps")[0]["J&F"], rel=1e-5)
    assert records(second, "val_steps")[0]["J&F"] == pytest.approx(records(full, "val_steps")[1]["J&F"], rel=1e-5)
    _, (params,) = read_run(second, 1)
    _, (want_params,) = read_run(full, 1)
    assert params["sum"] == pytest.approx(want_params["sum"], rel=1e-9)
    assert load_checkpoint(next(runs.rglob("last.ckpt")))["global_step"] == 7


def test_a_loader_resumed_at_any_batch_continues_with_the_same_batches(tmp_path: Path) -> None:
    write_dataset(tmp_path, "a", videos=5, per_shard=2)
    cfg = data_cfg(tmp_path, [source("a")], num_workers=2, samples_per_epoch=12)  # 6 batches of 2, 3 per worker
    full = RefVOSDataModule(cfg).train_dataloader()
    passes = [signature(list(full)) for _ in range(2)]
    assert len(passes[0]) == 6 and full.state_dict() == {"epoch": 1, "batches": 6}
    for done in range(7):  # a position at the pass's end continues with the next pass, as Lightning does
        loader = RefVOSDataModule(cfg).train_dataloader()
        loader.load_state_dict({"epoch": 0, "batches": done})
        assert signature(list(loader)) == (passes[0][done:] if done < 6 else passes[1]), done


def test_cadence_is_in_optimiser_steps_on_any_number_of_ranks() -> None:
    # GLUS-S on 2 nodes x 8 GPUs: a rank's epoch is 10000 / 16 / 2 -> 320 micro-batches (whole cycles of 10, 80 per
    # worker), fewer than the 500 x 10 between validations: Lightning counts them across epochs
    cfg = compose(["experiment=glus_s", "trainer.num_nodes=2", "trainer.devices=8"])
    data, trainer = cfg.data, cfg.trainer
    assert rank_batches(data.samples_per_epoch, data.batch_size, 16, data.num_workers, trainer.accumulate_grad_batches) == 320
    arguments = trainer_arguments(trainer)
    assert arguments["val_check_interval"] == 500 * 10 and arguments["check_val_every_n_epoch"] is None
    assert not {"val_every_n_steps", "checkpoint_every_n_steps"} & set(arguments)
    assert rank_batches(10, 1, 1, 2, 3) == 12 and rank_batches(12, 1, 1, 2, 3) == 12  # lcm(workers, accumulation)
    # the default `glus fit` (demo): an epoch is samples / batch optimiser steps
    demo = compose([])
    steps = rank_batches(demo.data.samples_per_epoch, demo.data.batch_size, 1, demo.data.num_workers, 1)
    assert demo.trainer.accumulate_grad_batches == 1 and steps == demo.data.samples_per_epoch // demo.data.batch_size
    for key in ("val_every_n_steps", "checkpoint_every_n_steps"):
        with pytest.raises(ConfigError, match=f"trainer.{key} must be .* >= 1, got 0"):
            trainer_arguments(compose([f"trainer.{key}=0"]).trainer)


def test_checkpoint_holds_trainable_state_and_refuses_other_families(data_root: Path, tmp_path: Path) -> None:
    cfg = compose([f"data.root={data_root}", *FROZEN])
    torch.manual_seed(0)
    model = GLUSModule(cfg)
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(checkpoint["state_dict"])
    assert not any("vision_tower" in k or "image_encoder" in k for k in checkpoint["state_dict"])  # frozen: not saved
    atomic_torch_save(checkpoint, tmp_path / "model.ckpt")
    loaded = load_checkpoint(tmp_path / "model.ckpt")  # weights_only: plain containers and tensors only
    model.on_load_checkpoint(loaded)

    qwen = compose([f"data.root={data_root}", "backbone=qwen2_5_vl_tiny", *FROZEN])
    with pytest.raises(ValueError, match="backbone.family='llava'.*backbone.family='qwen2_5_vl'"):
        check_checkpoint_fits(GLUSModule(qwen), loaded, "qwen2_5_vl")
    del loaded["state_dict"][min(trainable)]
    with pytest.raises(ValueError, match="1 trainable parameters missing"):
        model.on_load_checkpoint(loaded)


def test_unsafe_checkpoint_is_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": {}, "payload": Path("x")}, tmp_path / "unsafe.ckpt")  # a pickled object, not a tensor
    with pytest.raises(ValueError, match="unsafe.ckpt.*weights_only=True"):
        load_checkpoint(tmp_path / "unsafe.ckpt")


SAVE_LOOP = """
import sys, torch
from glus_lightning.checkpoints.checkpoint_io import AtomicCheckpointIO
io, i = AtomicCheckpointIO(), 0
while True:
    i += 1
    io.save_checkpoint({"version": i, "weights": torch.full((4_000_000,), float(i))}, sys.argv[1])
"""


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"version": 0, "weights": torch.zeros(4_000_000)}, path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(path)], cwd=ROOT, env=env)
    deadline = time.monotonic() + 60
    # kill it while a new version is being written (a temp file beside the checkpoint exists), after a few saves
    while not (load_checkpoint(path)["version"] >= 3 and list(tmp_path.glob(".last.ckpt.*.tmp"))):
        assert proc.poll() is None and time.monotonic() < deadline
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoint = AtomicCheckpointIO().load_checkpoint(path)
    assert checkpoint["version"] >= 3 and torch.equal(checkpoint["weights"], torch.full((4_000_000,), float(checkpoint["version"])))
