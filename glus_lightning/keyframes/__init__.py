"""Keyframe self-refinement, all of it: GLUS starts tracking at the frame the model segments best, not at frame 0.

- ``evidence``: what the model sees of every frame before tracking (prompts, memoryless scores; features and masks on request);
- ``scorer``: the frame scorer that rates each frame from that evidence;
- ``propagation``: pick each expression's keyframe and track from it forward and backward;
- ``refinement``: measure the model's own per-frame IoU on training videos and fit the scorer to it;
- ``callback``: refit the scorer before each validation of ``glus fit``; ``command``: ``glus refine-scores``.

Imports flow one way: ``module.py`` uses evidence, scorer and propagation; refinement, callback and command use
the module.
"""
