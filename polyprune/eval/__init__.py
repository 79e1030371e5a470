"""Evaluation: per-language perplexity (``perplexity``), lm-eval tasks per language
(``harness``, with our ``nextsent`` and ``mkqa`` tasks in ``tasks/``), ``polyprune eval``
(``evaluate``), evaluation matrices (``matrix``, ``store``) and their tables (``tables``)."""
