"""Data and scoring of the ``polyprune_mkqa_<lang>`` tasks; see polyprune.eval.mkqa."""

from polyprune.eval.mkqa import load_mkqa, process_results  # noqa: F401
