"""Does the demo model follow the expression? Mask quality on the synthetic validation split, per seed, of:

1. ``untrained``: the model at initialisation;
2. ``glus``: the model after the default run (`glus fit`, with ``seed`` and ``data.seed`` set);
3. ``shuffled``: a control trained the same way but with every expression replaced by one from another, earlier
   video, so the text carries no information about the target: it can only learn a prior such as "segment some shape";
4. ``swapped_text``: the trained model asked each expression with the text of another expression of its video that
   names other objects, scored against the asked one's target (``scoring.swapped_text``): no second training, and
   equal to ``glus`` when the masks ignore the sentence;
5. ``bag_of_words``: the demo trained with each ``[SEG]`` prompt replaced by a bag-of-words text encoder (learned word
   vectors, summed: ``arms.BagOfWordsPrompts``): what the rest of the recipe makes of a text path that encodes every
   word from the first step, so the gap to ``glus`` is what the tiny MLLM's prompts lose.

Prints J&F per expression kind, the confusion rate and the trained - shuffled, - swapped and - bag-of-words gaps (mean +- std
over seeds). Each (arm, seed) is kept in ``--out`` as it finishes (``arms.py``): a rerun resumes.

    python experiments/demo_controls.py [--seeds 0 1 2] [key=value ...]      # the same overrides as `glus fit`
"""

from __future__ import annotations

from arms import UNTRAINED, run_cli
from scoring import mean_spread

CONTROLS = [UNTRAINED, "glus", "shuffled", "swapped_text", "bag_of_words"]


def main() -> None:
    results = run_cli(__doc__, CONTROLS, "runs/demo_controls")
    trained = {r["seed"]: r["J&F"] for r in results.get("glus", [])}
    print()
    for control in ("shuffled", "swapped_text", "bag_of_words"):
        other = {r["seed"]: r["J&F"] for r in results.get(control, [])}
        gaps = [trained[s] - other[s] for s in sorted(trained.keys() & other.keys())]
        if gaps:
            print(f"trained - {control} J&F over {len(gaps)} seeds: {mean_spread(gaps)} (per seed: "
                  + ", ".join(f"{g:+.3f}" for g in gaps) + ")")


if __name__ == "__main__":
    main()
