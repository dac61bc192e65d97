"""GLUSModule: shapes, gradient flow, whole-video prediction, schedule, and learning on synthetic data."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig

from datamodules.batch import RefVOSBatch
from datamodules.datamodule import RefVOSDataModule
from glus_lightning.config import compose
from glus_lightning.metrics import mask_iou
from glus_lightning.module import GLUSModule
from glus_lightning.segmentation import SegmenterConfigError


def tiny_config(data_root: Path, *overrides: str) -> DictConfig:
    return compose([
        f"data.root={data_root}", "data.num_workers=0", "data.num_context=2", "data.num_query=3",
        "data.samples_per_epoch=8", "data.batch_size=2", *overrides,
    ])


def first_batch(cfg: DictConfig, split: str = "train") -> RefVOSBatch:
    dm = RefVOSDataModule(cfg.data)
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    return next(iter(loader))


def train_steps(model: GLUSModule, batch: RefVOSBatch, steps: int, lr: float = 1e-3) -> list[float]:
    """``steps`` AdamW steps of ``training_step`` on one batch; the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model.training_step(batch, 0)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_forward_shapes_and_gradient_flow(data_root: Path) -> None:
    # the reference freezing policy (the demo, with nothing pretrained, trains these parts too)
    cfg = tiny_config(data_root, "backbone.train_vision_tower=false", "segmenter.train_image_encoder=false",
                      "segmenter.train_memory=false")
    torch.manual_seed(0)
    model = GLUSModule(cfg)
    batch = first_batch(cfg)
    loss = model.training_step(batch, 0)
    out = model(batch)
    e, q = len(batch.expressions), batch.num_query
    assert len(out.mask_logits) == e and out.prompts.shape == (e, q, model.segmenter.prompt_dim)
    side = cfg.segmenter.image_size // 4
    assert all(lg.shape == (q, side, side) for lg in out.mask_logits)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert any("lora_" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert all(grads[n] is not None for n in grads if n.startswith("seg_projection."))
    assert any(n.startswith("segmenter.") and "mask_decoder" in n and g is not None for n, g in grads.items())
    frozen = [n for n, p in model.named_parameters() if "image_encoder" in n or "vision_tower" in n]
    assert frozen and all(grads[n] is None for n in frozen)


def test_predict_video_covers_every_frame_across_windows(data_root: Path) -> None:
    cfg = tiny_config(data_root)
    L.seed_everything(0)
    model = GLUSModule(cfg).eval()
    batch = first_batch(cfg, "val")
    logits = model.predict_video(batch)
    assert logits.shape[:2] == (len(batch.expressions), 6)  # 6 frames in windows of 3: memory carried across
    assert (logits[:, 3:] > -1000).any()  # not blanked by SAM2's object-score head, so a comparison means something
    # the memory bank matters: the second window differs when it starts from an empty bank
    second = RefVOSBatch(**{**batch.__dict__, "frames": torch.cat([batch.context_frames, batch.query_frames[:, 3:]], 1),
                            "frame_indices": batch.frame_indices[:, :5]})
    alone = model.predict_video(second)
    assert not torch.allclose(alone, logits[:, 3:])


def test_schedule_warms_up_then_decays_to_zero(data_root: Path) -> None:
    cfg = tiny_config(data_root, "optim.lr=0.01", "optim.warmup_steps=4", "trainer.max_steps=10")
    model = GLUSModule(cfg)
    model.trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    opt = model.configure_optimizers()
    sched = opt["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt["optimizer"].step()
        sched.step()
    expected = [0.01 * (s + 1) / 4 for s in range(4)] + [0.01 * (10 - s) / 6 for s in range(4, 10)]
    assert lrs == pytest.approx(expected)
    assert sched.get_last_lr()[0] == pytest.approx(0.0)


def _mean_iou(model: GLUSModule, batch: RefVOSBatch) -> float:
    with torch.no_grad():
        out = model(batch)
    ious = [mask_iou(torch.nn.functional.interpolate(lg[:, None], size=t.shape[-2:], mode="bilinear")[:, 0] > 0, t.bool())
            for lg, t in zip(out.mask_logits, batch.masks)]
    return torch.cat(ious).mean().item()


def test_short_training_run_lowers_loss_and_raises_iou(data_root: Path) -> None:
    cfg = tiny_config(data_root, "data.batch_size=1", "data.max_expressions=2")
    L.seed_everything(0)
    model = GLUSModule(cfg)
    batch = first_batch(cfg)
    model.eval()  # fixed prompt wording for the measurements
    iou_before = _mean_iou(model, batch)
    model.train()
    losses = train_steps(model, batch, 100)
    model.eval()
    iou_after = _mean_iou(model, batch)
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5
    assert iou_after > iou_before + 0.25, (iou_before, iou_after)


def test_unprompted_frames_train_from_memory_alone_and_inference_prompts_every_frame(data_root: Path) -> None:
    """With segmenter.memory.unprompted_frames=0.5, about half the query frames after each window's first are
    segmented with SAM2's not-a-point token instead of their [SEG] prompt; the first frame of a window and every frame
    at inference keep their prompts; training refuses it without the memory bank."""
    cfg = tiny_config(data_root, "data.num_query=4", "segmenter.memory.unprompted_frames=0.5")
    torch.manual_seed(0)
    model = GLUSModule(cfg)
    no_click = model.segmenter.sam.sam_prompt_encoder.not_a_point_embed.weight[0]
    given: list[torch.Tensor] = []
    track = model.segmenter.track
    model.segmenter.track = lambda features, prompts, *a, **k: given.append(prompts) or track(features, prompts, *a, **k)
    batch = first_batch(cfg)
    for _ in range(20):
        model(batch)
    withheld = torch.stack([(p == no_click).all(-1) for p in given])  # [steps, E, Q]
    assert not withheld[..., 0].any()
    assert 0.35 < withheld[..., 1:].float().mean() < 0.65, withheld[..., 1:].float().mean()
    given.clear()
    model.eval()
    model.predict_video(first_batch(cfg, "val"))
    assert given and not any((p == no_click).all(-1).any() for p in given)
    without_bank = GLUSModule(tiny_config(data_root, "segmenter.memory.unprompted_frames=0.5", "segmenter.memory.bank=false"))
    with pytest.raises(SegmenterConfigError, match="unprompted_frames=0.5 trains frames from the memory bank alone"):
        without_bank(batch)  # training; such a checkpoint still runs without its bank at inference (memory_off)


@pytest.mark.parametrize("freezing", [
    (),  # the demo: nothing pretrained, so towers and memory train too
    ("backbone.train_vision_tower=false", "segmenter.train_image_encoder=false", "segmenter.train_memory=false"),  # reference
])
def test_every_trainable_parameter_gets_a_gradient(data_root: Path, freezing: tuple[str, ...]) -> None:
    """Strict DDP (find_unused_parameters=False) needs every trainable parameter to be reached by the loss."""
    cfg = tiny_config(data_root, *freezing)
    model = GLUSModule(cfg)
    model.training_step(first_batch(cfg), 0).backward()
    idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not idle


def test_the_whole_model_trains_in_train_mode_and_the_lm_checkpoints_its_layers(data_root: Path) -> None:
    """Hugging Face loads models in eval mode and Lightning's fit keeps modes as they are: the LM would train without
    gradient checkpointing (and LoRA dropout), which HF applies only to modules in training mode."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    module = GLUSModule(tiny_config(data_root, "backbone.gradient_checkpointing=true", "backbone.lora.dropout=0.05"))
    assert [name for name, m in module.named_modules() if not m.training] == []
    layers = [m for m in module.backbone.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and all(layer.gradient_checkpointing and layer.training for layer in layers)
    lora_dropouts = [m for name, m in module.backbone.named_modules() if "lora_dropout.default" in name]
    assert lora_dropouts and all(m.training and m.p == 0.05 for m in lora_dropouts)
