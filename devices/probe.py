"""Measure the live machine (numpy only): what the planner scales measured costs by.

    python -m devices.probe          # prints {"peak_fp32_gflops": ..., "gemm_gflops": ..., "cores": ...}

`peak_gflops()` estimates this CPU's fp32 peak the way the device profiles state theirs (cores x
clock x FLOP per cycle from the vector extensions); it is what the planner divides by, because a
GEMM measured on a machine shared with other work varies several-fold from run to run.
"""
import json
import os
import time

import numpy as np


def gemm_gflops(n: int = 512, seconds: float = 0.2, trials: int = 3) -> float:
    """Float32 GEMM rate of this machine (numpy's BLAS, its default threads): the best of
    `trials` windows, so a machine shared with other work reports what it can reach."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    a @ b
    best = 0.0
    for _ in range(trials):
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            runs += 1
        best = max(best, 2 * n ** 3 * runs / (time.perf_counter() - start) / 1e9)
    return best


def _cpuinfo() -> tuple[float, set]:
    ghz, flags = 0.0, set()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return ghz, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "cpu mhz" and not ghz:
            ghz = float(value) / 1e3
        elif key == "bogomips" and not ghz:
            ghz = float(value) / 2e3                     # x86 BogoMIPS = 2 x clock
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return ghz, flags


def peak_gflops() -> float:
    """fp32 peak estimate: cores x GHz x FLOP/cycle (64 with AVX-512, 32 with AVX2+FMA, 16 with AVX
    or ARM ASIMD, else 8); 2.0 GHz when the clock is not reported."""
    ghz, flags = _cpuinfo()
    if "avx512f" in flags:
        per_cycle = 64
    elif {"avx2", "fma"} <= flags:
        per_cycle = 32
    elif "avx" in flags or "asimd" in flags:
        per_cycle = 16
    else:
        per_cycle = 8
    return (os.cpu_count() or 1) * (ghz or 2.0) * per_cycle


if __name__ == "__main__":
    print(json.dumps({"peak_fp32_gflops": round(peak_gflops(), 1), "gemm_gflops": round(gemm_gflops(), 2),
                      "cores": os.cpu_count()}))
