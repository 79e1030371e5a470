#!/usr/bin/env python
"""Solve time of one Gemma 3 270M-shaped block (random weights, Hessians from random correlated
inputs) with the k-th value from ``torch.kthvalue`` (before) and NumPy (now), interleaved,
medians of 5. The masks are the same either way (tests/test_masks.py).

    python scripts/bench_select.py
"""

from __future__ import annotations

import statistics
import time

import torch

import polyprune.kernels.topk_mask as tm
from polyprune.compress.obs import obs_solve
from polyprune.compress.solver import PruneConfig
from polyprune.compress.wanda import wanda_prune

# Linear groups of one Gemma 3 270M block: (rows, cols, stacked segments)
GROUPS = {
    "qkv": (1536, 640, [1024, 256, 256]),
    "o": (640, 1024, None),
    "gate/up": (4096, 640, [2048, 2048]),
    "down": (640, 2048, None),
}


def cases() -> list[tuple]:
    torch.manual_seed(0)
    out = []
    for rows, cols, seg in GROUPS.values():
        X = torch.randn(4096, cols) @ (torch.eye(cols) + 0.1 * torch.randn(cols, cols))
        out.append((torch.randn(rows, cols), 2 * X.t() @ X / 4096, seg, X.pow(2).mean(0)))
    return out


def main() -> None:
    data = cases()

    def sparsegpt():
        for W, H, seg, _ in data:
            obs_solve(W, H, sparsity=0.5, segments=seg)

    def wanda():
        for W, _, seg, colsq in data:
            for part in W.split(seg) if seg else [W]:
                wanda_prune(part, colsq, PruneConfig(0.5))

    selections = {
        "torch": lambda s, k: torch.kthvalue(s, k, dim=-1, keepdim=True).values,
        "numpy": tm.kth_smallest,
    }
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(5):
        for label, select in selections.items():
            tm.kth_smallest = select  # smallest_k_mask looks it up at call time
            for method, fn in (("sparsegpt", sparsegpt), ("wanda", wanda)):
                t0 = time.perf_counter()
                fn()
                times.setdefault((method, label), []).append(time.perf_counter() - t0)
    tm.kth_smallest = selections["numpy"]
    for method in ("sparsegpt", "wanda"):
        a = statistics.median(times[(method, "torch")])
        b = statistics.median(times[(method, "numpy")])
        print(f"{method}: one block, torch.kthvalue {a * 1000:.0f} ms, numpy {b * 1000:.0f} ms, "
              f"ratio {b / a:.2f}; x18 blocks: {a * 18:.1f} s -> {b * 18:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
