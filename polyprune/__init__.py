"""polyprune: post-training compression of multilingual LLMs with calibration-language control."""

from __future__ import annotations

__version__ = "0.1.0"

from polyprune.api import prune  # noqa: E402
from polyprune.data.mix import CalibrationMix  # noqa: E402
from polyprune.models import load_model  # noqa: E402

__all__ = ["CalibrationMix", "__version__", "load_model", "prune"]
