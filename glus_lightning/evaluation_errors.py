"""The error of ``glus evaluate``, in a module of its own so that both :mod:`glus_lightning.evaluation` and the
benchmark-specific readers it builds on (:mod:`glus_lightning.revos_scores`) raise it without an import cycle."""


class EvaluationError(ValueError):
    """Ground truth, metadata or a prediction file is malformed; the message names the file."""
