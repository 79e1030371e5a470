"""Compute kernels, one file per op: the Triton kernel beside its torch twin (the CPU path and
the reference), chosen by ``dispatch``. Kernels import only torch, triton and each other: they
sit below every other layer but the ground floor (docs/design.md)."""
