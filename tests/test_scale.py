"""Scale: strategy factory, 2-process DDP and FSDP2 training on the CPU (gloo), and a QLoRA tiny run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from test_module import train_steps

from datamodules.datamodule import RefVOSDataModule
from datamodules.prepare import prepare_synthetic
from glus_lightning.checkpoints.checkpoint_io import load_checkpoint
from glus_lightning.config import compose, load_group
from glus_lightning.module import GLUSModule
from glus_lightning.strategies import build_strategy

ROOT = Path(__file__).resolve().parents[1]
# the reference freezing policy: with it every trainable parameter gets a gradient each step (strict DDP)
FROZEN = ["backbone.train_vision_tower=false", "segmenter.train_image_encoder=false", "segmenter.train_memory=false"]


KEYFRAMES = ("inference.keyframes=true", "refine.videos=3", "refine.steps=5")


def tiny_overrides(data_root: Path, run_dir: Path) -> list[str]:
    return [f"data.root={data_root}", "data.num_workers=0", "data.num_context=2", "data.num_query=3", "data.batch_size=1",
            "data.max_expressions=2", "data.samples_per_epoch=4", "trainer.max_steps=2", "text_warmup.steps=0", "trainer.val_every_n_steps=2",
            "trainer.accumulate_grad_batches=1", f"run_dir={run_dir}", *FROZEN]


def run_worker(out: Path, overrides: list[str], timeout: float = 120) -> None:
    """``tests/fit_worker.py`` in a fresh process (Lightning's launcher starts the second rank from it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fit_worker.py"), str(out), *overrides],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (out / "stderr.txt").write_text(proc.stderr)


def read_run(out: Path, ranks: int) -> tuple[list[list[dict]], list[dict]]:
    losses = [[json.loads(line) for line in (out / f"losses.rank{r}.jsonl").read_text().splitlines()] for r in range(ranks)]
    params = [json.loads((out / f"params.rank{r}.json").read_text()) for r in range(ranks)]
    return losses, params


def two_process_run(data_root: Path, out: Path, strategy: str) -> tuple[list[list[dict]], list[dict]]:
    """Two ranks train 2 steps, then refine the frame scorer (keyframe self-refinement) and validate from keyframes."""
    run_worker(out, [*tiny_overrides(data_root, out / "runs"), f"trainer={strategy}", "trainer.accelerator=cpu",
                     "trainer.devices=2", "trainer.precision=32-true", *KEYFRAMES])
    return read_run(out, 2)


def scorers(out: Path) -> list[dict]:
    return [json.loads((out / f"scorer.rank{r}.json").read_text()) for r in range(2)]


def validations(out: Path) -> list[dict]:
    return [json.loads((out / f"val.rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def uneven_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """Like ``data_root``, but 3 validation videos (one per shard): one rank validates 2 videos, the other 1."""
    root = tmp_path_factory.mktemp("uneven")
    manifests = prepare_synthetic(root, seed=5, num_train=8, num_val=3, frames=6, size=48)
    assert len(manifests["val"].shards) == 3
    return root, manifests["val"].expressions


@pytest.fixture(scope="module")
def ddp_run(uneven_root: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[dict]], list[dict]]:
    out = tmp_path_factory.mktemp("ddp")
    return out, *two_process_run(uneven_root[0], out, "ddp")


def test_strategy_names_build_lightning_strategies() -> None:
    cpu = load_group("trainer", "cpu")
    assert isinstance(build_strategy(load_group("trainer", "ddp")), DDPStrategy)
    assert isinstance(build_strategy(load_group("trainer", "fsdp")), ModelParallelStrategy)
    assert isinstance(build_strategy(load_group("trainer", "fsdp1")), FSDPStrategy)
    assert build_strategy(cpu) == "auto"  # other names go to Lightning as they are
    with pytest.raises(ValueError, match="fsdp1.*GPUs only"):
        build_strategy(load_group("trainer", "fsdp1", ["accelerator=cpu"]))


def test_ddp_two_processes_train_in_step(ddp_run: tuple[Path, list[list[dict]], list[dict]]) -> None:
    out, losses, params = ddp_run
    assert [[r["step"] for r in rank] for rank in losses] == [[0, 1], [0, 1]]
    assert losses[0][0]["videos"] != losses[1][0]["videos"]  # each rank trains on its own samples
    # gradients are averaged across ranks: both replicas end with the same weights (strict DDP: no unused parameter)
    assert params[0]["sum"] == pytest.approx(params[1]["sum"], rel=1e-9) and params[0]["sharded"] == 0
    ckpt = load_checkpoint(next((out / "runs").rglob("last.ckpt")))
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["config"]["trainer"]["strategy"] == "ddp"
    # the ranks measured different videos (3 over 2 ranks), gathered them and fitted one and the same scorer
    ranks = scorers(out)
    assert all(r["refined"] for r in ranks) and ranks[0]["sum"] == pytest.approx(ranks[1]["sum"], rel=1e-12)
    assert bool(ckpt["state_dict"]["frame_scorer.refined"])
    # no warning a user cannot act on: to sync_dist scores gathered over ranks already, Lightning's deprecated all_gather
    stderr = (out / "stderr.txt").read_text()
    assert "sync_dist" not in stderr and "deprecated" not in stderr


def test_fsdp2_two_processes_shard_and_match_ddp(uneven_root: tuple[Path, int], tmp_path: Path,
                                                  ddp_run: tuple[Path, list[list[dict]], list[dict]]) -> None:
    data_root, val_expressions = uneven_root
    losses, params = two_process_run(data_root, tmp_path, "fsdp")
    ddp_out, ddp_losses, ddp_params = ddp_run
    assert params[0]["sharded"] > 0  # trainable parameters are DTensor shards
    assert params[0]["sum"] == pytest.approx(params[1]["sum"], rel=1e-9)
    # same data, same math: FSDP2 reaches the weights DDP reaches
    for rank in range(2):
        assert [r["loss"] for r in losses[rank]] == pytest.approx([r["loss"] for r in ddp_losses[rank]], rel=1e-4)
    assert params[0]["sum"] == pytest.approx(ddp_params[0]["sum"], rel=1e-5)
    # the frame scorer is its own FSDP2 unit, fitted by all ranks together to what DDP's replicas reach
    ranks = scorers(tmp_path)
    assert all(r["refined"] and r["sharded"] > 0 for r in ranks)
    assert ranks[0]["sum"] == pytest.approx(ranks[1]["sum"], rel=1e-9)
    assert ranks[0]["sum"] == pytest.approx(scorers(ddp_out)[0]["sum"], rel=1e-4)
    # keyframe validation of 2 videos on one rank and 1 on the other: every expression scored once, as under DDP
    val, ddp_val = validations(tmp_path), validations(ddp_out)
    assert len(val[0]["expressions"]) == val_expressions and val[0] == val[1]
    assert val[0]["expressions"] == ddp_val[0]["expressions"]
    assert val[0]["J&F"] == pytest.approx(ddp_val[0]["J&F"], rel=1e-4)
    ckpt = load_checkpoint(next((tmp_path / "runs").rglob("last.ckpt")))  # one file, gathered on rank 0
    model_keys = {n for n, p in GLUSModule(compose(tiny_overrides(data_root, tmp_path))).named_parameters() if p.requires_grad}
    assert model_keys <= set(ckpt["state_dict"])


def test_qlora_tiny_model_trains_adapters_over_frozen_4bit_weights(data_root: Path) -> None:
    cfg = compose([*tiny_overrides(data_root, Path("unused")), "backbone.quantization.load_in_4bit=true"])
    L.seed_everything(0)
    model = GLUSModule(cfg)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.dtype == torch.uint8 and not m.weight.requires_grad for m in quantized)
    assert all("language_model" in n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    base_before = quantized[0].weight.detach().clone()
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    batch = next(iter(RefVOSDataModule(cfg.data).train_dataloader()))
    losses = train_steps(model, batch, 2)
    assert losses[-1] < losses[0]
    assert torch.equal(quantized[0].weight, base_before)
    assert all(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if n in lora)


BF16_MIXED = ("backbone.dtype=bfloat16", "segmenter.dtype=bfloat16", "trainer.precision=bf16-mixed")


def bf16_run(data_root: Path, out: Path, strategy: str, *extra: str) -> tuple[list[list[dict]], list[dict]]:
    """Two ranks train 2 steps of the tiny model with bf16 frozen weights under bf16-mixed."""
    run_worker(out, [*tiny_overrides(data_root, out / "runs"), f"trainer={strategy}", "trainer.accelerator=cpu",
                     "trainer.devices=2", *BF16_MIXED, *extra])
    return read_run(out, 2)


def test_bf16_mixed_ddp_and_fsdp2_train_fp32_masters_over_bf16_weights(data_root: Path, tmp_path: Path) -> None:
    ddp_losses, ddp_params = bf16_run(data_root, tmp_path / "ddp", "ddp")
    fsdp_losses, fsdp_params = bf16_run(data_root, tmp_path / "fsdp", "fsdp")
    for params in (*ddp_params, *fsdp_params):  # trainable parameters and Adam moments fp32, frozen weights bf16
        assert params["trainable_dtypes"] == ["torch.float32"] and params["adam_dtypes"] == ["torch.float32"]
        assert "torch.bfloat16" in params["frozen_dtypes"]
    assert fsdp_params[0]["sharded"] > 0 and fsdp_params[0]["sum"] == pytest.approx(fsdp_params[1]["sum"], rel=1e-9)
    assert ddp_params[0]["sum"] == pytest.approx(ddp_params[1]["sum"], rel=1e-9)
    # FSDP2 gathers weights in bf16 and reduces gradients in fp32; DDP autocasts fp32 weights: the same run up to bf16
    for rank in range(2):
        assert [r["loss"] for r in fsdp_losses[rank]] == pytest.approx([r["loss"] for r in ddp_losses[rank]], rel=2e-2)
    assert fsdp_params[0]["sum"] == pytest.approx(ddp_params[0]["sum"], rel=1e-3)
    for run in ("ddp", "fsdp"):
        assert load_checkpoint(next((tmp_path / run / "runs").rglob("last.ckpt")))["global_step"] == 2


def test_qlora_trains_under_two_process_ddp(data_root: Path, tmp_path: Path) -> None:
    losses, params = bf16_run(data_root, tmp_path, "ddp", "backbone.quantization.load_in_4bit=true",
                              "backbone.quantization.compute_dtype=bfloat16")
    assert [[r["step"] for r in rank] for rank in losses] == [[0, 1], [0, 1]]
    assert params[0]["sum"] == pytest.approx(params[1]["sum"], rel=1e-9)  # one model: gradients averaged over ranks
    assert all("torch.uint8" in p["frozen_dtypes"] and p["adam_dtypes"] == ["torch.float32"] for p in params)  # NF4 base
    assert load_checkpoint(next((tmp_path / "runs").rglob("last.ckpt")))["global_step"] == 2
