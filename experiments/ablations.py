"""What each GLUS component does on the built-in demo: one arm per component switched, 3 seeds, scored per kind.

Trained arms (``arms.py``; only the listed overrides differ from the demo, ``conf/experiment/demo.yaml``):

- ``glus``: the demo (C = 4 context frames, memory bank, no object-contrastive loss);
- ``no_context``: C = 0, no context frames: the MLLM sees only the window it segments (no global view);
- ``no_memory``: every frame segmented on its own (``segmenter.memory.bank=false``): no memory attention;
- ``contrastive``: GLUS's object-contrastive loss on, at the reference's weight (``loss.contrastive_weight=0.1
  data.expression_sampling=pairs``, so that most batches hold two expressions of one video);
- ``shuffled``: every training expression replaced by one of another video (what is learnt without the text);
- ``unprompted``: half the query frames after each window's first trained without their prompt
  (``segmenter.memory.unprompted_frames=0.5``, SAM2's way of training its memory; GLUS prompts every frame), so that
  memory attention has frames only it can segment; ``no_context_unprompted``: the same with C = 0.

Inference arms on each ``glus`` model:

- ``swapped_text``: each expression asked with the text of another expression of its video that names other objects,
  scored against its own target (equal to ``glus`` when the masks ignore the sentence);
- ``memory_off``: the same model with its memory bank switched off at inference (what the memory adds to a model
  trained with it);
- ``first_prompt_only``: each expression tracked from its first frame's prompt alone, every later frame's prompt
  withheld (SAM2's semi-supervised setting): what the memory bank carries on its own; ``oracle_keyframe_prompt_only``:
  the same from the oracle keyframe (below), forward and backward; ``hard_start_first_prompt_only`` and
  ``hard_start_oracle_keyframe_prompt_only``: both on the fading-in videos (below);
- ``keyframes``: self-refinement, the frame scorer fitted on training videos, each expression segmented from the
  frame it rates best, forward and backward; ``oracle_keyframes``: from the frame whose memoryless mask best matches
  the ground truth (the most a perfect scorer could give);
- ``hard_start``, ``hard_start_keyframes``, ``hard_start_oracle_keyframes``: the same three on copies of the
  validation videos whose first frames fade in (``scoring.hard_start``), where the first frame is the worst to start
  from: the situation keyframes exist for.

The same inference arms run on the ``no_context``, ``unprompted`` and ``no_context_unprompted`` models, named
``<model>_<arm>`` (e.g. ``unprompted_memory_off``); by default all of them on ``unprompted``, and ``memory_off`` and
``first_prompt_only`` on the C = 0 models (with no context frames, the memory of earlier windows is all that carries
what they showed: ``data.synthetic.twin_motion=settled``).

Columns (``scoring.py``): J&F overall and per expression kind, and the confusion rate (of the frames where the mask
clearly picks one object, the share where it picked another). Mean +- std over the seeds. Results are kept per
(arm, seed) in ``--out``: a rerun resumes, and processes given different ``--arms`` or ``--seeds`` share the work
(``demo_controls.py`` with the same ``--out`` shares ``glus`` and ``shuffled``).

    python experiments/ablations.py [--seeds 0 1 2] [--arms glus no_memory ...] [--videos N] [key=value ...]
    python experiments/ablations.py --table-only      # the table of what --out holds
"""

from __future__ import annotations

from arms import ARMS, INFERRED_FROM, UNTRAINED, run_cli

CHOICES = [arm for arm in ARMS if arm not in (UNTRAINED, "bag_of_words")]  # the latter: demo_controls.py
C0_DEFAULT_INFERENCES = ("memory_off", "first_prompt_only")  # the C = 0 models' inference arms run by default
DEFAULT_ARMS = [arm for arm in CHOICES if not INFERRED_FROM.get(arm, "").startswith("no_context")
                or arm.removeprefix(f"{INFERRED_FROM[arm]}_") in C0_DEFAULT_INFERENCES]


def main() -> None:
    run_cli(__doc__, CHOICES, "runs/ablations", DEFAULT_ARMS)


if __name__ == "__main__":
    main()
