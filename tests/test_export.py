"""``glus export``: LoRA merged into a Hugging Face model + SAM2/heads safetensors, reloaded with identical masks."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from test_module import train_steps
from test_scale import FROZEN
from transformers import LlavaForConditionalGeneration

from datamodules.datamodule import RefVOSDataModule
from glus_lightning.checkpoints.checkpoint_io import atomic_torch_save
from glus_lightning.checkpoints.export import export_model, load_export, model_from_checkpoint
from glus_lightning.cli import main
from glus_lightning.config import compose
from glus_lightning.module import GLUSModule


def trained_checkpoint(data_root: Path, path: Path, *overrides: str, steps: int = 8) -> GLUSModule:
    """A few optimiser steps (LoRA B starts at zero: the merge must carry a real update), saved as fit saves it.

    The demo config (everything trains) reaches non-empty masks in 8 steps; ``FROZEN`` makes it faster."""
    cfg = compose([f"data.root={data_root}", "data.num_workers=0", "data.num_context=2", "data.num_query=3",
                   "data.batch_size=1", "data.max_expressions=2", *overrides])
    L.seed_everything(cfg.seed)
    model = GLUSModule(cfg)
    batch = next(iter(RefVOSDataModule(cfg.data).train_dataloader()))
    train_steps(model, batch, steps, lr=1e-2)
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    atomic_torch_save(checkpoint, path)
    return model.eval()


def test_export_round_trip_predicts_the_same_masks(data_root: Path, tmp_path: Path) -> None:
    trained = trained_checkpoint(data_root, tmp_path / "run.ckpt")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in trained.named_parameters())
    assert main(["export", str(tmp_path / "run.ckpt"), "--out", str(tmp_path / "export")]) == 0
    out = tmp_path / "export"
    hf = LlavaForConditionalGeneration.from_pretrained(out / "backbone")  # a plain HF model: LoRA merged, no adapters
    assert not any("lora_" in n for n, _ in hf.named_parameters())
    reloaded = load_export(out)
    assert not any("lora_" in n for n, _ in reloaded.named_parameters())

    batch = next(iter(RefVOSDataModule(trained.cfg.data).val_dataloader()))
    want, got = trained.predict_video(batch), reloaded.predict_video(batch)
    threshold = trained.cfg.mask_threshold
    assert got.shape == want.shape and (want > threshold).any()  # non-empty masks, so that equal masks mean something
    assert torch.equal(got > threshold, want > threshold)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # merged W + BA vs W x + B A x: rounding only


def test_qlora_checkpoint_exports_through_full_precision_base(data_root: Path, tmp_path: Path) -> None:
    trained = trained_checkpoint(data_root, tmp_path / "run.ckpt", "backbone.quantization.load_in_4bit=true", *FROZEN, steps=1)
    unquantised = model_from_checkpoint(tmp_path / "run.ckpt")
    assert not unquantised.backbone.quantized
    lora = {n: p for n, p in trained.named_parameters() if "lora_" in n}
    assert lora and all(torch.equal(p, lora[n]) for n, p in unquantised.named_parameters() if n in lora)
    reloaded = load_export(export_model(unquantised, tmp_path / "export"))
    batch = next(iter(RefVOSDataModule(trained.cfg.data).val_dataloader()))
    torch.testing.assert_close(reloaded.predict_video(batch), unquantised.predict_video(batch), rtol=1e-4, atol=1e-4)


def test_load_export_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a glus export: config.yaml is missing"):
        load_export(tmp_path)


def test_a_checkpoint_saved_before_the_prompt_group_and_memory_switches_still_exports(data_root: Path, tmp_path: Path) -> None:
    """The config layout of checkpoints written before 2026-12 (prompt under backbone, integer token pool, none of the
    memory / token-row / contrastive-rule keys) loads as today's and computes the same masks."""
    trained = trained_checkpoint(data_root, tmp_path / "run.ckpt", *FROZEN, steps=1)
    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=False)
    old = checkpoint["hyper_parameters"]["config"]
    old["backbone"]["prompt"] = {k: old["prompt"][k] for k in ("context_instruction", "query_templates", "answer_templates")}
    del old["prompt"]
    assert old["backbone"]["image_token_pool"] == "2x2"
    old["backbone"]["image_token_pool"] = 2
    for key in ("objects", "lookalike", "twin_motion"):  # the synthetic generator's options of 2026-12-04
        del old["data"]["synthetic"][key]
    for section, key in (("backbone", "train_token_rows"), ("backbone", "image_resize"), ("segmenter", "memory"),
                         *(("loss", k) for k in list(old["loss"]) if k.startswith("contrastive_") and k not in (
                             "contrastive_weight", "contrastive_temperature", "contrastive_negatives", "contrastive_bank_size"))):
        del old[section][key]
    atomic_torch_save(checkpoint, tmp_path / "old.ckpt")

    rebuilt = model_from_checkpoint(tmp_path / "old.ckpt")
    assert rebuilt.cfg.prompt == trained.cfg.prompt and rebuilt.cfg.segmenter.memory == trained.cfg.segmenter.memory
    batch = next(iter(RefVOSDataModule(trained.cfg.data).val_dataloader()))
    torch.testing.assert_close(rebuilt.predict_video(batch), trained.predict_video(batch))
