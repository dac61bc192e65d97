"""Does the demo model follow the expression? Mask quality on the synthetic validation split, per seed, of:

1. ``untrained``: the model at initialisation;
2. ``glus``: the model after the default run (`glus fit`, with ``seed`` and ``data.seed`` set);
3. ``shuffled``: a control trained the same way but with every expression replaced by one from another, earlier
   video, so the text carries no information about the target: it can only learn a prior such as "segment some shape".

Prints J&F per expression kind, the confusion rate and the trained - shuffled gap (mean +- std over seeds). Each
(arm, seed) is kept in ``--out`` as it finishes (``arms.py``): a rerun resumes.

    python experiments/demo_controls.py [--seeds 0 1 2] [key=value ...]      # the same overrides as `glus fit`
"""

from __future__ import annotations

import argparse
from pathlib import Path

from arms import UNTRAINED, print_table, run_seed
from scoring import mean_spread

CONTROLS = [UNTRAINED, "glus", "shuffled"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=CONTROLS, default=CONTROLS)
    parser.add_argument("--videos", type=int, default=None, help="score only the first N validation videos")
    parser.add_argument("--out", type=Path, default=Path("runs/demo_controls"), help="one JSON per (arm, seed)")
    parser.add_argument("--table-only", action="store_true", help="print the table of what --out holds")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for seed in args.seeds:
            run_seed(args.arms, seed, args.overrides, args.out, args.videos)
    results = print_table(args.out, CONTROLS)
    trained = {r["seed"]: r["J&F"] for r in results.get("glus", [])}
    shuffled = {r["seed"]: r["J&F"] for r in results.get("shuffled", [])}
    gaps = [trained[s] - shuffled[s] for s in sorted(trained.keys() & shuffled.keys())]
    if gaps:
        print(f"\ntrained - shuffled J&F over {len(gaps)} seeds: {mean_spread(gaps)} (per seed: "
              + ", ".join(f"{g:+.3f}" for g in gaps) + ")")


if __name__ == "__main__":
    main()
