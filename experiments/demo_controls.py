"""Does the demo model really learn to follow the expression? Mask quality on the synthetic validation split of:

1. the untrained model (random init, the demo seed);
2. the model after the default run (`glus fit`);
3. a control trained the same way but with every expression replaced by one from another, earlier video, so the
   text carries no information about the target: it can only learn a prior such as "segment some shape".

    python experiments/demo_controls.py [key=value ...]      # the same overrides as `glus fit`
    python experiments/demo_controls.py [key=value ...] --runs untrained shuffled
"""

from __future__ import annotations

import argparse
import random

import lightning as L

from datamodules.batch import RefVOSBatch
from glus_lightning import runner
from glus_lightning.config import compose


class ShuffledExpressions(L.Callback):
    """Replaces each training expression by a random one from a pool of earlier batches' other videos."""

    def __init__(self, seed: int, pool_size: int = 256) -> None:
        self.rng = random.Random(seed)
        self.pool: list[tuple[str, str]] = []  # (video id, expression)
        self.pool_size = pool_size

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: RefVOSBatch, batch_idx: int) -> None:
        own = [(batch.video_ids[v], text) for v, text in zip(batch.expression_video.tolist(), batch.expressions)]
        shuffled = []
        for video, text in own:
            others = [t for v, t in self.pool if v != video]
            shuffled.append(self.rng.choice(others) if others else text)
        self.pool = (self.pool + own)[-self.pool_size :]
        batch.expressions = shuffled


RUNS = {
    "untrained": lambda o: runner.validate(compose([*o, "name=demo_untrained"])),
    "trained": lambda o: runner.fit(compose([*o, "name=demo_trained"])),
    "shuffled": lambda o: runner.fit(compose([*o, "name=demo_shuffled"]), [ShuffledExpressions(compose(o).seed)]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    rows = [(name, RUNS[name](args.overrides)) for name in args.runs]
    print(f"\n{'model':12s} {'J (IoU)':>8s} {'F':>8s} {'J&F':>8s}")
    for name, res in rows:
        print(f"{name:12s} {res['val/J']:8.4f} {res['val/F']:8.4f} {res['val/J&F']:8.4f}")


if __name__ == "__main__":
    main()
