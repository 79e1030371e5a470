"""Compute kernels, one file per op: the torch path (CPU and reference) lives here; Triton
kernels and the dispatcher between them come with the kernel issue."""
