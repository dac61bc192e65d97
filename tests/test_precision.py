"""The precision policy: fp32 trainable parameters and Adam states over bf16 frozen weights, bf16-mixed / bf16-true
runs, FSDP units of one dtype (FSDP1 wraps them on the CPU too), and clear errors for combinations that cannot run."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist
from test_module import first_batch, tiny_config, train_steps

from datamodules.datamodule import shard_samples
from datamodules.records import VideoRecord
from glus_lightning.backbones.loading import quantized_device_map
from glus_lightning.config import ConfigError
from glus_lightning.module import GLUSModule
from glus_lightning.precision import check_run_config
from glus_lightning.runner import build_trainer
from glus_lightning.strategies import UnitPolicy, check_uniform_units, fsdp_units, unit_dtypes

BF16 = ("backbone.dtype=bfloat16", "segmenter.dtype=bfloat16")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def autocast_steps(model: GLUSModule, batch, steps: int, lr: float) -> list[float]:
    """AdamW steps with each forward under bf16 autocast, as Lightning's bf16-mixed runs them (one autocast region per
    step: autocast caches its bf16 copies of the weights until the region ends)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.training_step(batch, 0)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def float_params(model: torch.nn.Module, trainable: bool) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad == trainable and p.is_floating_point()]


def test_trainable_parameters_are_fp32_over_bf16_frozen_weights(data_root: Path) -> None:
    model = GLUSModule(tiny_config(data_root, *BF16))
    trainable, frozen = float_params(model, True), float_params(model, False)
    assert {p.dtype for _, p in trainable} == {torch.float32}
    assert any("lora_" in n for n, _ in trainable) and any("embed_tokens" in n for n, _ in trainable)
    # frozen weights keep the configured dtype (the frame scorer is fitted outside the optimiser: fp32)
    frozen_dtypes = {n.split(".")[0]: p.dtype for n, p in frozen if not n.startswith("frame_scorer")}
    assert set(frozen_dtypes.values()) == {torch.bfloat16} and {"backbone", "segmenter"} <= set(frozen_dtypes)


def test_fp32_master_weights_keep_updates_that_bf16_weights_round_away(data_root: Path) -> None:
    """What bf16-true gives up: an update much smaller than a weight's bf16 spacing is lost in bf16, kept in fp32."""
    cfg = tiny_config(data_root, *BF16)
    batch = first_batch(cfg)
    changed = {}
    for name, to_bf16 in (("fp32 masters", False), ("bf16", True)):
        torch.manual_seed(0)
        model = GLUSModule(cfg)
        if to_bf16:
            model.to(torch.bfloat16)  # what Lightning's bf16-true does
        lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
        autocast_steps(model, batch, 1, lr=1e-5)
        params = dict(model.named_parameters())
        changed[name] = sum(int((params[n] != before).sum()) for n, before in lora.items()) / sum(p.numel() for p in lora.values())
    assert changed["fp32 masters"] > 0.95
    assert changed["bf16"] < 0.5


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_fit_writes_a_checkpoint_with_the_policy_dtypes(data_root: Path, tmp_path: Path, precision: str) -> None:
    cfg = tiny_config(data_root, *BF16, f"trainer.precision={precision}", "trainer.max_steps=3", "trainer.val_every_n_steps=3",
                      "data.batch_size=1", "data.samples_per_epoch=3", "data.max_expressions=2", f"run_dir={tmp_path}")
    L.seed_everything(0)
    trainer, _ = build_trainer(cfg)
    model = GLUSModule(cfg)
    lora_before = {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_B" in n}
    from datamodules.datamodule import RefVOSDataModule

    trainer.fit(model, datamodule=RefVOSDataModule(cfg.data))
    assert trainer.global_step == 3
    # every validation video (per-object RLE targets) went through the precision plugin and was scored
    assert trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.completed == 4  # data_root: 4 val videos
    val_keys = {f"{r.dataset}/{r.video}/{e.exp_id}" for url in sorted((data_root / "val").glob("*.tar"))
                for r in map(VideoRecord.from_sample, shard_samples(str(url), handler=lambda err: False)) for e in r.expressions}
    assert set(model.expression_scores) == val_keys  # every expression, once
    mean_jf = sum(s["J&F"] for s in model.expression_scores.values()) / len(val_keys)
    assert trainer.callback_metrics["val/J&F"].item() == pytest.approx(mean_jf, abs=1e-6)
    ckpt = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert ckpt["global_step"] == 3
    states = [s for s in trainer.optimizers[0].state.values() if "exp_avg" in s]
    expected = torch.float32 if precision == "bf16-mixed" else torch.bfloat16  # bf16-true: no fp32 masters, bf16 moments
    assert states and {s["exp_avg"].dtype for s in states} == {expected} and {s["exp_avg_sq"].dtype for s in states} == {expected}
    assert {p.dtype for _, p in float_params(model, True)} == {expected}
    assert {v.dtype for k, v in ckpt["state_dict"].items() if "lora_B" in k} == {expected}
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n].float(), before) for n, before in lora_before.items())  # it learned
    assert all(torch.isfinite(p).all() for p in params.values() if p.is_floating_point())


def test_bf16_mixed_learns_a_batch_as_fp32_does(data_root: Path) -> None:
    batch = first_batch(tiny_config(data_root))
    runs = {}
    for name, overrides, steps in (("fp32", (), train_steps), ("bf16-mixed", BF16, autocast_steps)):
        torch.manual_seed(0)
        # 3e-3: the loss falls steadily (at 1e-2 it oscillates, and rounding moves the two paths apart by 25%)
        runs[name] = steps(GLUSModule(tiny_config(data_root, *overrides)), batch, 8, lr=3e-3)
    assert runs["bf16-mixed"][-1] < 0.3 * runs["bf16-mixed"][0]
    assert runs["bf16-mixed"] == pytest.approx(runs["fp32"], rel=0.05)


def test_run_config_errors_name_the_key(data_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"backbone.dtype=bfloat16 .*trainer.precision=32-true"):
        check_run_config(tiny_config(data_root, "backbone.dtype=bfloat16"))
    with pytest.raises(ConfigError, match=r"segmenter.dtype=bfloat16"):
        check_run_config(tiny_config(data_root, "segmenter.dtype=bfloat16"))
    with pytest.raises(ConfigError, match=r"QLoRA.*'fsdp'"):
        check_run_config(tiny_config(data_root, "backbone.quantization.load_in_4bit=true", "trainer=fsdp"))
    check_run_config(tiny_config(data_root, "backbone.quantization.load_in_4bit=true", "trainer=ddp"))
    check_run_config(tiny_config(data_root, *BF16, "trainer.precision=bf16-mixed"))


def test_qlora_weights_load_on_this_ranks_device() -> None:
    # the strategy's root device (rank 3's GPU), not the current CUDA device, which is GPU 0 on every rank at build time
    assert quantized_device_map(torch.device("cuda", 3)) == {"": 3}
    assert quantized_device_map(torch.device("cpu")) is None


def test_fsdp_units_hold_one_dtype_each(data_root: Path) -> None:
    model = GLUSModule(tiny_config(data_root, *BF16))
    units = fsdp_units(model)
    names = {id(m): n for n, m in model.named_modules()}
    unit_names = [names[id(u)] for u in units]
    # LoRA adapters are units inside the (frozen, bf16) decoder layers; deeper units come first
    assert any(n.endswith("lora_A.default") for n in unit_names) and any(n.endswith("layers.0") for n in unit_names)
    depths = [n.count(".") for n in unit_names]
    assert depths == sorted(depths, reverse=True)
    dtypes = unit_dtypes(model, units)
    assert all(len(d) == 1 for name, d in dtypes.items() if name != "<root>")
    assert dtypes["<root>"] == {torch.float32, torch.bfloat16}  # fp32 heads + bf16 frozen leftovers: FSDP1 upcasts them
    # a block mixing dtypes is refused by name
    layer = next(u for u, n in zip(units, unit_names) if n.endswith("language_model.layers.0"))
    next(p for p in layer.parameters() if not p.requires_grad).data = next(p for p in layer.parameters() if not p.requires_grad).data.half()
    with pytest.raises(ConfigError, match=r"language_model.layers.0"):
        check_uniform_units(model, units)


class _LightningLike(torch.nn.Module):
    """What Lightning's strategies wrap: a module whose forward is the training step."""

    def __init__(self, model: GLUSModule) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.training_step(batch, 0)


def test_fsdp1_trains_the_units_on_cpu(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP1 (Lightning's FSDPStrategy needs GPUs, torch's FSDP does not): our units flatten, bf16 compute, fp32 grads."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision

    cfg = tiny_config(data_root, *BF16, "data.batch_size=1")
    batch = first_batch(cfg)
    torch.manual_seed(0)
    reference = GLUSModule(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference.training_step(batch, 0).item()
    # a one-process group whose address does not leak to later tests (their subprocesses start their own)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = GLUSModule(cfg)
        wrapped = FSDP(_LightningLike(model), auto_wrap_policy=UnitPolicy(), use_orig_params=True, device_id=torch.device("cpu"),
                       mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        assert sum(isinstance(m, FSDP) for m in wrapped.modules()) == len(fsdp_units(model)) + 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = wrapped(batch)
        loss.backward()
        lora = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert lora and all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in lora)
        assert loss.item() == pytest.approx(expected, rel=2e-2)
        # trainer.gradient_clip_val under FSDP1: Lightning's FSDP precision refuses norm clipping, the module's hook
        # clips through the FSDP root to the global norm (measured here over every gradient)
        norm = lambda: torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in wrapped.parameters()
                                                             if p.grad is not None]))
        before = norm().item()
        model.trainer = SimpleNamespace(strategy=SimpleNamespace(model=wrapped))
        model.configure_gradient_clipping(None, gradient_clip_val=before / 4, gradient_clip_algorithm="norm")
        assert norm().item() == pytest.approx(before / 4, rel=1e-3)
    finally:
        dist.destroy_process_group()
