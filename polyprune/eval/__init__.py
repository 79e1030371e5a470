"""Evaluation: per-language perplexity (and, later, tasks and matrices)."""
