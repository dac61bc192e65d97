"""What does training with the GLUS reference's memory treatment change on the demo?

Trains the demo per seed (``seed`` and ``data.seed``) in three arms that differ only in ``segmenter.memory`` /
``segmenter.train_memory``, and prints each arm's final validation J&F per seed, the mean and the spread:

- ``ours``: the default, gradients through the memory bank (``backprop=full``), memory attention / encoder trained
  (the demo's SAM2 is random, so they must learn);
- ``frozen``: the same gradient path, memory modules frozen (separates the two changes below);
- ``reference``: memories detached and memory attention without gradients (``backprop=none``, which needs frozen
  memory modules), as the reference trains.

    python experiments/memory_treatment.py [key=value ...] [--seeds 0 1 2] [--arms ours reference]  # overrides as `glus fit`
"""

from __future__ import annotations

import argparse
import statistics

from glus_lightning import runner
from glus_lightning.config import compose

ARMS = {
    "ours": [],
    "frozen": ["segmenter.train_memory=false"],
    "reference": ["segmenter.train_memory=false", "segmenter.memory.backprop=none"],
}
DEFAULTS = ["trainer.max_steps=600"]  # before the user's overrides: theirs win


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    scores: dict[str, list[float]] = {arm: [] for arm in args.arms}
    for seed in args.seeds:
        for arm in args.arms:
            cfg = compose([*DEFAULTS, *args.overrides, *ARMS[arm], f"seed={seed}", f"data.seed={seed}",
                           f"name=memory_{arm}_seed{seed}"])
            scores[arm].append(runner.fit(cfg)["val/J&F"])
            print(f"[memory_treatment] {arm} seed {seed}: val J&F {scores[arm][-1]:.4f}", flush=True)
    print(f"\n{'arm':10s} " + " ".join(f"{'seed ' + str(s):>8s}" for s in args.seeds) + f" {'mean':>8s} {'spread':>8s}")
    for arm, values in scores.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{arm:10s} " + " ".join(f"{v:8.4f}" for v in values) + f" {statistics.mean(values):8.4f} {spread:8.4f}")


if __name__ == "__main__":
    main()
