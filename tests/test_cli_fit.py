"""`glus fit` / `glus validate` end to end on a tiny built-in dataset: data, config, logs, checkpoints, resume lookup."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from glus_lightning.cli import main
from glus_lightning.config import compose


def tiny_run(tmp_path: Path) -> list[str]:
    return [
        f"data.root={tmp_path / 'data'}", f"run_dir={tmp_path / 'runs'}", "data.num_workers=0",
        "data.synthetic.num_train=4", "data.synthetic.num_val=2", "data.synthetic.frames=6", "data.synthetic.size=48",
        "data.samples_per_epoch=4", "data.batch_size=1", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
        "text_warmup.steps=5", "text_warmup.log_every_n_steps=2",  # the demo's 1000, cut: the path runs, not the learning
    ]


def test_fit_generates_data_trains_saves_config_and_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = tiny_run(tmp_path)
    assert main(["fit", *overrides]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "demo" / "version_0"
    # the built-in dataset was generated because its shards were missing
    assert (tmp_path / "data" / "train" / "manifest.json").is_file() and (tmp_path / "data" / "val" / "manifest.json").is_file()
    # the resolved config is printed and saved, and equals what compose gives
    saved = OmegaConf.load(run / "config.yaml")
    assert saved == compose(overrides)
    assert f"Logs: {run}" in out and "last.ckpt" in out
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    assert ckpt["hyper_parameters"]["config"]["data"]["root"] == str(tmp_path / "data")
    assert list(run.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    # the final model (step 3, off the demo's 500-step cadence) is validated once, inside fit: so it is also the best
    # checkpoint, whose file name carries its score
    [fit_jf] = events.Scalars("val/J&F")
    [best] = (run / "checkpoints").glob("step3-jf*.ckpt")
    assert float(best.stem.split("-jf")[1]) == pytest.approx(fit_jf.value, abs=1e-4)
    # the text warm-up ran before training: its lines in progress.log and on the terminal, its scalars in TensorBoard
    assert [e.step for e in events.Scalars("text_warmup/loss")] == [2, 4, 5]
    progress = (run / "progress.log").read_text()
    assert progress.index("text warm-up step 5/5") < progress.index("training from step 0") and "text warm-up step 5/5" in out

    # validate the trained weights found by ckpt_path=last, in the same run directory: the same model, the same score
    assert main(["validate", *overrides, "ckpt_path=last", "--csv", str(tmp_path / "val.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "val.csv").open()))
    overall = next(r for r in rows if r["level"] == "overall")
    assert float(overall["J&F"]) == pytest.approx(fit_jf.value, abs=1e-5)
    # a resumed fit takes the warmed weights from its checkpoint: no second warm-up
    assert main(["fit", *overrides, "ckpt_path=last", "trainer.max_steps=4"]) == 0
    assert "text warm-up" not in capsys.readouterr().out


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from glus_lightning.config import ConfigError
    from glus_lightning.runner import resolve_checkpoint

    cfg = compose(tiny_run(tmp_path) + ["ckpt_path=last"])
    with pytest.raises(ConfigError, match=r"ckpt_path=last: no .*version_\*/checkpoints/last.ckpt"):
        resolve_checkpoint(cfg)
    cfg = compose(tiny_run(tmp_path) + [f"ckpt_path={tmp_path / 'nope.ckpt'}"])
    with pytest.raises(ConfigError, match="nope.ckpt"):
        resolve_checkpoint(cfg)
