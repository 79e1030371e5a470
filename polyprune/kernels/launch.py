"""Checks shared by the kernels' launchers (Liger-Kernel's ``ops/utils.py`` in spirit): shapes,
dtypes, devices, contiguity and Triton's presence, each said once with one wording.

The torch twins run the same shape and dtype checks, so both paths refuse the same input with
the same message. Inputs a kernel only reads are made contiguous (a copy where needed);
outputs it writes in place cannot be copied, so they must already be contiguous.
"""

from __future__ import annotations

import torch

from polyprune.kernels.dispatch import triton_available

__all__ = [
    "FLOAT_INPUTS",
    "check_contiguous",
    "check_dtype",
    "check_same_device",
    "check_shapes",
    "ensure_contiguous",
    "require_triton",
]

# Activations as the forward passes give them; the kernels accumulate them in fp32.
FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_shapes(ok: bool, expected: str, *tensors: torch.Tensor) -> None:
    """ValueError ``expected <expected>, got <shapes>`` unless ``ok``."""
    if not ok:
        got = ", ".join(str(tuple(t.shape)) for t in tensors)
        raise ValueError(f"expected {expected}, got {got}")


def check_dtype(name: str, t: torch.Tensor, *allowed: torch.dtype) -> None:
    if t.dtype not in allowed:
        raise ValueError(f"{name} must be {_dtype_names(allowed)}, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    """All on the first one's device (a kernel reads them through raw pointers)."""
    (first, t0), *rest = tensors.items()
    for name, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{first} on {t0.device} but {name} on {t.device}")


def check_contiguous(names: str, *tensors: torch.Tensor) -> None:
    """Outputs updated in place: a contiguous copy would leave the caller's tensor unchanged."""
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError(f"{names} must be contiguous")


def ensure_contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Inputs the kernel only reads, contiguous (row stride = columns, unit column stride)."""
    return tuple(t.contiguous() for t in tensors)


def require_triton() -> None:
    """RuntimeError when a Triton path is called without Triton (the dispatchers never do)."""
    if not triton_available():
        raise RuntimeError("Triton is not importable")
