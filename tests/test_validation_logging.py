"""A tiny ``glus fit`` logs val/J, val/F, val/J&F and mask overlay images to TensorBoard."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules.datamodule import RefVOSDataModule, shard_samples
from datamodules.prepare import prepare_synthetic
from datamodules.records import VideoRecord
from glus_lightning import runner
from glus_lightning.config import compose
from glus_lightning.inference.writers import LEGEND_ROW, PALETTE
from glus_lightning.module import GLUSModule

FRAMES = 4


def test_fit_logs_validation_scores_and_overlays(tmp_path: Path) -> None:
    prepare_synthetic(tmp_path / "data", seed=4, num_train=1, num_val=1, frames=FRAMES, size=32)
    cfg = compose([
        f"data.root={tmp_path / 'data'}", f"run_dir={tmp_path / 'runs'}", "data.num_workers=0", "data.num_context=2",
        "data.num_query=2", "data.batch_size=1", "data.samples_per_epoch=2", "data.max_expressions=1",
        "trainer.max_steps=2", "trainer.val_every_n_steps=2", "optim.warmup_steps=1",
    ])
    trainer, logger = runner.build_trainer(cfg)  # the run's real callbacks and logger; fit without the final validate
    trainer.fit(GLUSModule(cfg), datamodule=RefVOSDataModule(cfg.data))
    results = {k: v.item() for k, v in trainer.callback_metrics.items()}
    scores = trainer.lightning_module.expression_scores  # J, F and J&F of each validation expression
    for name in ("J", "F", "J&F"):  # the logged scores are the means over expressions
        assert results[f"val/{name}"] == pytest.approx(sum(s[name] for s in scores.values()) / len(scores), abs=1e-6), name
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars, images = events.Tags()["scalars"], events.Tags()["images"]
    assert {"val/J", "val/F", "val/J&F"} <= set(scalars)
    logged = [e.value for e in events.Scalars("val/J&F")]
    assert len(logged) == 1 and logged[0] == pytest.approx(results["val/J&F"], abs=1e-6)
    # one strip per expression of the validation video, its frames side by side
    (shard,) = sorted((tmp_path / "data" / "val").glob("*.tar"))
    (record,) = [VideoRecord.from_sample(s) for s in shard_samples(str(shard), handler=lambda err: False)]
    assert set(scores) == {f"{record.dataset}/{record.video}/{x.exp_id}" for x in record.expressions}  # each scored once
    every = f"val_overlay/{record.video}/all expressions"
    assert sorted(images) == sorted([every, *(f"val_overlay/{record.video}/{e}: {x.text}" for e, x in enumerate(record.expressions))])
    strip = np.asarray(Image.open(io.BytesIO(events.Images(f"val_overlay/{record.video}/0: {record.expressions[0].text}")[-1].encoded_image_string)))
    size = cfg.segmenter.image_size
    assert strip.shape == (size, FRAMES * size, 3)
    assert (strip == (60, 255, 60)).all(-1).any()  # the ground-truth outline is drawn
    # all predictions in their colours over the frames side by side (wide enough to stay at their size), a legend below
    legend_rows = len(record.expressions)
    together = np.asarray(Image.open(io.BytesIO(events.Images(every)[-1].encoded_image_string)))
    assert together.shape == (size + LEGEND_ROW * legend_rows + 4, FRAMES * size, 3)
    for k in range(legend_rows):  # each expression's swatch in its colour, on its row
        row = together[size + 2 + k * LEGEND_ROW : size + 2 + (k + 1) * LEGEND_ROW, :LEGEND_ROW]
        assert (row == PALETTE[k].astype(np.uint8)).all(-1).sum() >= (LEGEND_ROW - 6) ** 2
