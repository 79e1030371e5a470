"""Data of the ``polyprune_nextsent_<lang>`` tasks; the logic is in polyprune.eval.localtask."""

from polyprune.eval.localtask import load_nextsent  # noqa: F401
