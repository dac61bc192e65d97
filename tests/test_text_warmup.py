"""The text warm-up (glus_lightning/text_warmup.py): the tiny MLLM learns to put each sentence into its [SEG] prompts."""

from __future__ import annotations

from itertools import cycle, islice
from pathlib import Path

import torch
import torch.nn.functional as F

from datamodules.datamodule import RefVOSDataModule
from glus_lightning.config import compose
from glus_lightning.module import GLUSModule
from glus_lightning.text_warmup import token_sets, warm_up_text


def window_prompts(model: GLUSModule, batch, frames: int = 3) -> torch.Tensor:
    """The prompts ``[E, frames, P]`` of one window of the video's first query frames."""
    with torch.no_grad():
        out = model.backbone.encode(batch.context_frames, batch.query_frames[:, :frames], batch.expressions, ce_only_seg=True,
                                    sizes=batch.video_sizes, rows=batch.expression_video, with_loss=False)
        return model._project(out.seg_hidden).float()  # [E, Q, P]


def similarities(prompts: torch.Tensor, expressions: list[str]) -> tuple[float, float]:
    """Mean cosine between the prompts of one sentence at different query frames, and between different sentences."""
    unit = F.normalize(prompts, dim=-1)
    same = [float(unit[e, i] @ unit[e, j]) for e in range(len(unit)) for i in range(unit.shape[1]) for j in range(i)]
    other = [float(unit[a, 0] @ unit[b, 0]) for a in range(len(unit)) for b in range(a) if expressions[a] != expressions[b]]
    return sum(same) / len(same), sum(other) / len(other)


def test_token_sets_mark_each_expressions_own_tokens() -> None:
    vocab = {"the": 0, "red": 1, "circle": 2, "blue": 3}

    def split(text, add_special_tokens):  # a tokenizer that splits on spaces over a fixed vocabulary
        return {"input_ids": [vocab[w] for w in text.split()]}

    sets = token_sets(split, ["the red circle", "the blue the circle"], vocab_size=5)
    assert sets.tolist() == [[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]]


def test_warm_up_makes_different_sentences_give_different_prompts_and_leaves_sam2_alone(data_root: Path) -> None:
    cfg = compose([f"data.root={data_root}", "data.num_workers=0", "data.batch_size=2", "data.max_expressions=3",
                   "text_warmup.steps=300", "text_warmup.lr=3e-3", "text_warmup.log_every_n_steps=100"])
    torch.manual_seed(0)
    model = GLUSModule(cfg)
    batches = list(islice(RefVOSDataModule(cfg.data).train_dataloader(), 8))
    probe = next(b for b in RefVOSDataModule(cfg.data).val_dataloader() if len(set(b.expressions)) > 1)
    _, other_before = similarities(window_prompts(model, probe), probe.expressions)
    sam2 = {k: v.clone() for k, v in model.segmenter.state_dict().items()}

    lines = []
    report = warm_up_text(model, cycle(batches), cfg, lambda line, scalars, step: lines.append((step, scalars)))

    same_after, other_after = similarities(window_prompts(model, probe), probe.expressions)
    # at initialisation every prompt is about the same vector; after, a sentence's prompts stay together across
    # frames while different sentences' prompts part (on a validation video it never trained on)
    assert other_before > 0.99
    assert other_after < 0.9 and same_after > other_after + 0.1
    assert [step for step, _ in lines] == [100, 200, 300] and report.steps == 300
    assert lines[-1][1]["loss"] < lines[0][1]["loss"]
    assert all(torch.equal(v, sam2[k]) for k, v in model.segmenter.state_dict().items())  # SAM2 not run, not changed
