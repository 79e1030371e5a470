"""Calibration and held-out text per language, and calibration mixes."""

from __future__ import annotations

from polyprune.data.mix import CalibrationMix, CalibrationSet, build_calibration_set
from polyprune.data.sources import TextSource, get_source

__all__ = ["CalibrationMix", "CalibrationSet", "TextSource", "build_calibration_set", "get_source"]
