#!/usr/bin/env python
"""Triton kernels against their torch references at Llama-3-8B shapes, on one CUDA GPU.

    python scripts/bench_kernels.py [--tokens 16384 65536] [--dtype bfloat16]

Prints achieved TFLOP/s (Hessian) or GB/s (the rest) and the speed ratio to the torch path,
each pair measured in the same run. Targets on an H100: Hessian >= 1.5x torch.addmm(H, X.T, X)
in the same precision; Wanda mask >= 3x the sort-based reference; LAPE counting and error sums
at >= 70% of the card's memory bandwidth (3.35 TB/s on an H100 SXM).
"""

from __future__ import annotations

import argparse
import sys

import torch


def bench(fn, reps: int = 10) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after a warm-up, with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; run it on a GPU machine", file=sys.stderr)
        return 0
    from polyprune.kernels.colnorm import colsq_update_torch, colsq_update_triton
    from polyprune.kernels.errors import error_sums_torch, error_sums_triton
    from polyprune.kernels.hessian import hessian_update_triton
    from polyprune.kernels.lape_count import lape_count_torch, lape_count_triton
    from polyprune.kernels.wanda_mask import wanda_mask_torch, wanda_mask_triton

    dtype = getattr(torch, args.dtype)
    dev = "cuda"
    print(f"device: {torch.cuda.get_device_name()}, dtype {args.dtype}")
    print("| op | shape | triton | torch | speed-up |")
    print("|---|---|---:|---:|---:|")
    for T in args.tokens:
        for d in (4096, 14336):
            X = torch.randn(T, d, device=dev, dtype=dtype)
            H = torch.zeros(d, d, device=dev)
            flops = 2 * T * d * d  # of the full product; the kernel does about half
            t_tri = bench(lambda: hessian_update_triton(H, 1, X))
            Xf = X.float() if dtype == torch.float32 else X
            Hd = torch.zeros(d, d, device=dev, dtype=Xf.dtype)
            t_ref = bench(lambda: torch.addmm(Hd, Xf.t(), Xf))
            print(f"| hessian | {T}x{d} | {flops / t_tri / 1e12:.0f} TFLOP/s-equiv | "
                  f"{flops / t_ref / 1e12:.0f} TFLOP/s | {t_ref / t_tri:.2f}x |")  # fmt: skip
            s = torch.zeros(d, device=dev)
            gb = X.numel() * X.element_size() / 1e9
            t_tri = bench(lambda: colsq_update_triton(s, 1, X))
            t_ref = bench(lambda: colsq_update_torch(s, 1, X))
            print(f"| colnorm | {T}x{d} | {gb / t_tri:.0f} GB/s | {gb / t_ref:.0f} GB/s | "
                  f"{t_ref / t_tri:.2f}x |")  # fmt: skip
            h2 = X + 0.01
            t_tri = bench(lambda: error_sums_triton(X, h2))
            t_ref = bench(lambda: error_sums_torch(X, h2))
            print(f"| error sums | {T}x{d} | {2 * gb / t_tri:.0f} GB/s | {2 * gb / t_ref:.0f} GB/s "
                  f"| {t_ref / t_tri:.2f}x |")  # fmt: skip
        A = torch.randn(T, 14336, device=dev, dtype=dtype)
        counts = torch.zeros(7, 14336, dtype=torch.int64, device=dev)
        sums = torch.zeros(7, 14336, device=dev)
        gb = A.numel() * A.element_size() / 1e9
        t_tri = bench(lambda: lape_count_triton(A, counts, sums, 2))
        t_ref = bench(lambda: lape_count_torch(A, counts, sums, 2))
        print(f"| lape count | {T}x14336 | {gb / t_tri:.0f} GB/s | {gb / t_ref:.0f} GB/s | "
              f"{t_ref / t_tri:.2f}x |")  # fmt: skip
    for rows, cols in ((4096, 4096), (14336, 4096), (4096, 14336)):
        W = torch.randn(rows, cols, device=dev, dtype=dtype)
        colsq = torch.rand(cols, device=dev)
        k = cols // 2
        t_tri = bench(lambda: wanda_mask_triton(W, colsq, k=k))
        score = W.float().abs() * colsq.sqrt()

        def sort_ref():
            idx = torch.sort(score, dim=1, stable=True)[1][:, :k]
            return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)

        t_ref = bench(sort_ref)
        t_kth = bench(lambda: wanda_mask_torch(W, colsq, k=k))
        print(f"| wanda mask | {rows}x{cols} | {t_tri * 1e3:.2f} ms | sort {t_ref * 1e3:.2f} ms, "
              f"kthvalue {t_kth * 1e3:.2f} ms | {t_ref / t_tri:.2f}x vs sort |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
