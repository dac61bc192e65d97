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
