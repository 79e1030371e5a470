"""polyprune: post-training compression of multilingual LLMs with calibration-language control."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = ["CalibrationMix", "__version__", "load_model", "prune"]

# Imported on first use (PEP 562): they pull in torch, which `polyprune --help`, config checks
# and the torch-free method registry (polyprune.compress.methods) do not need.
_LAZY = {
    "prune": "polyprune.api",
    "CalibrationMix": "polyprune.data.mix",
    "load_model": "polyprune.models",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'polyprune' has no attribute {name!r}")
