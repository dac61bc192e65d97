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
from test_scale import FROZEN, ROOT, read_run, run_worker

from glus_lightning.checkpoints.checkpoint_io import AtomicCheckpointIO, atomic_torch_save, load_checkpoint
from glus_lightning.checkpoints.state import check_checkpoint_fits
from glus_lightning.config import compose
from glus_lightning.module import GLUSModule


def overrides(data_root: Path, run_dir: Path) -> list[str]:
    # 2 steps per epoch, 4 steps: the checkpoint of step 2 is written at the end of epoch 0's validation.
    # The object-contrastive loss is on, as in the glus experiments: steps 2 and 3 draw negatives from its bank.
    return [f"data.root={data_root}", "data.num_workers=0", "data.num_context=2", "data.num_query=3", "data.batch_size=1",
            "data.max_expressions=3", "data.samples_per_epoch=2", "trainer.max_steps=4", "trainer.val_check_interval=1.0",
            "data.expression_sampling=pairs", "loss.contrastive_weight=0.1", f"run_dir={run_dir}"]


def test_killed_run_resumes_exactly(data_root: Path, tmp_path: Path) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_worker(full, overrides(data_root, full / "runs"))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fit_worker.py"), str(cut), "--hang-at-step", "2",
                             *overrides(data_root, cut / "runs")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while not (cut / "hung").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run to interrupt ended or never reached step 2"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # a real kill: no teardown, no final checkpoint
    proc.wait()
    assert load_checkpoint(next((cut / "runs").rglob("last.ckpt")))["global_step"] == 2

    run_worker(cut, [*overrides(data_root, cut / "runs"), "ckpt_path=last"])
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
