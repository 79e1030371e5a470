"""Which implementation runs: the Triton kernel when the tensor is on CUDA and Triton is
importable, otherwise the torch reference. ``POLYPRUNE_KERNELS=torch|triton`` forces one;
forcing ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` (how the tests exercise the
kernel code without a GPU)."""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["interpreting", "triton_available", "use_triton"]


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install on an unsupported platform
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    choice = os.environ.get("POLYPRUNE_KERNELS", "auto")
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"POLYPRUNE_KERNELS={choice!r}; allowed: torch, triton")
    if choice == "torch" or not triton_available():
        return False
    if choice == "triton":
        return t.is_cuda or interpreting()
    return t.is_cuda
