"""Checks of single values shared by the typed configs, the Python API and the CLI, so that all
of them accept and refuse the same values with the same message."""

from __future__ import annotations

import math
import re

from polyprune.errors import InputError, shorten

__all__ = [
    "DTYPES",
    "MAX_SEED",
    "check_device",
    "check_dtype",
    "check_finite",
    "check_int",
    "check_seed",
]

MAX_SEED = 2**32 - 1  # numpy takes any seed >= 0, but a seed must also fit SQLite and JSON
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
DTYPES = ("auto", "float32", "float16", "bfloat16")  # what models._dtype maps


def check_device(device: object, available: bool = True) -> None:
    """``cpu``, ``cuda`` or ``cuda:N`` of a GPU torch sees; before any model is loaded (torch
    itself fails only when the first tensor moves, after minutes of loading). With
    ``available=False`` only the name is checked: a matrix config may name a GPU that its Ray
    workers have and the machine reading the config (a login node, a laptop) does not."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise InputError(f"unknown device {shorten(device)}; allowed: cpu, cuda, cuda:N")
    if device == "cpu" or not available:
        return
    import torch

    if not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but torch sees no CUDA device")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise InputError(
            f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA "
            f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )


def check_dtype(dtype: object) -> None:
    """A dtype name (or a torch.dtype from Python), before anything is loaded: the loader
    would find a bad one only after the calibration windows were built."""
    if dtype is None or (isinstance(dtype, str) and dtype in DTYPES):
        return
    import torch

    if not isinstance(dtype, torch.dtype):
        raise InputError(f"unknown dtype {shorten(dtype)}; allowed: {', '.join(DTYPES)}")


def check_seed(seed: object, name: str = "seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InputError(f"{name} {shorten(seed)} must be an integer in [0, {MAX_SEED}]")


def check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {shorten(value)}")


def check_finite(name: str, value: object, positive: bool = False) -> None:
    """A real number (not nan or inf), > 0 where ``positive``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        what = "a finite number > 0" if positive else "a finite number"
        raise InputError(f"{name} must be {what}, got {shorten(value)}")
