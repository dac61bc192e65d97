"""experiments/scoring.py's grounding check: the swapped-text control asks each expression with another object's text."""

import importlib.util
import sys
from pathlib import Path

import numpy as np

from datamodules.synthetic import generate_video

_EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(_EXPERIMENTS))  # scoring.py imports as the experiments run it, a plain module
_spec = importlib.util.spec_from_file_location("scoring", _EXPERIMENTS / "scoring.py")
scoring = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scoring)


def ground_truth_by_text(record):
    """A perfectly grounded model: each asked text's own target (texts are unique within a synthetic video)."""
    by_text = {e.text: e for e in record.expressions}

    def masks_of(rec, expressions):
        return [np.stack([rec.expression_mask(by_text[e.text], i) for i in range(rec.num_frames)]).astype(bool)
                for e in expressions]

    return masks_of


def every_object(rec, expressions):
    """A model that ignores the sentence: every object, whatever is asked."""
    union = np.stack([np.any([rec.object_mask(o, i) for o in rec.object_ids], axis=0) for i in range(rec.num_frames)])
    return [union.astype(bool) for _ in expressions]


def test_swapped_text_asks_another_objects_sentence_and_only_grounded_masks_lose():
    records = [generate_video(0, "val", i, 6, 48).record for i in range(6)]
    asked = []

    def spy(rec, expressions):
        asked.append([e.text for e in expressions])
        return every_object(rec, expressions)

    for record in records:
        scoring.swapped_text(spy)(record, record.expressions)
        objects_of = {e.text: set(e.obj_ids) for e in record.expressions}
        for expression, text in zip(record.expressions, asked[-1], strict=True):
            if any(set(e.obj_ids) != set(expression.obj_ids) for e in record.expressions):
                assert objects_of[text] != set(expression.obj_ids)
            else:
                assert text == expression.text

    normal = [scoring.evaluate(ground_truth_by_text(r), [r])["J&F"] for r in records]
    swapped = [scoring.evaluate(scoring.swapped_text(ground_truth_by_text(r)), [r])["J&F"] for r in records]
    assert np.allclose(normal, 1.0)
    assert max(swapped) < 0.9  # another object's mask: every video here has two object sets or more
    ignoring = scoring.evaluate(every_object, records)
    assert scoring.evaluate(scoring.swapped_text(every_object), records) == ignoring


def test_motion_late_scores_only_the_second_half_of_motion_expressions():
    """J&F motion late: perfect masks in the first half and none after score 0 there, and vice versa 1, while the
    motion column over every frame sits in between; other kinds do not enter it."""
    records = [generate_video(0, "val", i, 8, 48, twins=1.0, twin_motion="settled").record for i in range(4)]

    def half(first: bool):
        def masks_of(rec, expressions):
            masks = ground_truth_by_text(rec)(rec, expressions)
            mid = rec.num_frames // 2
            for m in masks:
                (m[mid:] if first else m[:mid])[:] = False  # the other half left empty
            return masks

        return masks_of

    early, late = scoring.evaluate(half(first=True), records), scoring.evaluate(half(first=False), records)
    assert early["J&F motion late"] == 0.0 and late["J&F motion late"] == 1.0
    assert early["picked motion late"] == 0.0 and late["picked motion late"] == 1.0 and late["confusion motion late"] == 0.0
    swapped = scoring.evaluate(scoring.swapped_text(ground_truth_by_text(records[1])), [records[1]])  # each asks another
    assert swapped["picked motion late"] == 1.0 and swapped["confusion motion late"] == 1.0  # object's text: all wrong
    assert 0.2 < early["J&F motion"] < 0.8 and 0.2 < late["J&F motion"] < 0.8


def test_bag_of_words_control_prompts_are_word_sums_and_train_only_the_words_used(data_root):
    """arms.BagOfWordsPrompts (demo_controls' bag_of_words arm): each prompt is the sum of its expression's word vectors
    ("the" left out), whatever the MLLM says; a training step moves the vectors of the batch's words only."""
    import torch
    from test_module import first_batch, tiny_config

    spec = importlib.util.spec_from_file_location("arms", _EXPERIMENTS / "arms.py")
    arms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arms)
    cfg = tiny_config(data_root)
    torch.manual_seed(0)
    module = arms.BagOfWordsPrompts(cfg)
    batch = first_batch(cfg)
    out = module(batch)
    table = module.words.weight.detach()
    for e, text in enumerate(batch.expressions):
        expected = sum(table[sorted(arms.VOCABULARY - {"the"}).index(w)] for w in text.split() if w != "the")
        torch.testing.assert_close(out.prompts[e], expected.expand(batch.num_query, -1))
    used = {w for text in batch.expressions for w in text.split()} - {"the"}
    before = table.clone()
    optimizer = torch.optim.SGD([module.words.weight], lr=1.0)
    module.criterion(module(batch), batch)[0].backward()
    optimizer.step()
    moved = {w for w, i in module.WORDS.items() if not torch.equal(module.words.weight[i].detach(), before[i])}
    assert moved == used


def test_hard_start_fades_in_the_first_frames_only():
    """scoring.hard_start (the keyframe arms' hard first frames): frame t < K keeps floor + (1 - floor) t / K of its
    contrast around its median colour, measured here on the decoded pixels; later frames and the masks are untouched."""
    import io

    from PIL import Image

    record = generate_video(0, "val", 0, 8, 64).record
    hard = scoring.hard_start(record, frames=4, floor=0.2)

    def pixels(jpeg):
        return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float64)

    for t, expected in enumerate([0.2, 0.4, 0.6, 0.8]):
        before, after = pixels(record.frames[t]), pixels(hard.frames[t])
        spread = [np.abs(x - np.median(x.reshape(-1, 3), axis=0)).mean() for x in (before, after)]
        assert abs(spread[1] / spread[0] - expected) < 0.05, (t, spread)
    assert hard.frames[4:] == record.frames[4:]
    assert hard.frames[0] != record.frames[0] and record.frames[0] == generate_video(0, "val", 0, 8, 64).record.frames[0]
    for obj in record.object_ids:
        assert all(np.array_equal(hard.object_mask(obj, i), record.object_mask(obj, i)) for i in range(record.num_frames))
