"""Speed of the CPU harness for Metal kernels (mlx_dsv4/kernels/sim): compile time per kernel,
cost of one fiber switch, and run times of the shipped kernels at test-sized shapes.

    python benchmarks/bench_metal_sim.py [--workers 1 2]

Prints the machine and compiler first. Compile times are cold (a fresh cache directory), with
the precompiled metal_sim.h built once before them.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_metal_sim_") as cache:
        os.environ["MLX_DSV4_SIM_CACHE"] = cache
        run(args.workers)


def run(workers: list[int]) -> None:
    from mlx_dsv4.kernels.registry import parse_spec
    from mlx_dsv4.kernels.sim import compiler, run_metal_kernel_on_cpu

    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout.splitlines()[0]
    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores; compiler: {version}")

    def timed(fn, repeat=3):
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    rounds = 200
    switch = parse_spec(f"""// @kernel switch_cost
// @inputs x: float
// @outputs y: float
// @source
float a = x[0];
for (int i = 0; i < {rounds}; ++i) {{
  a = simd_sum(a) * 0.5f;
}}
y[thread_position_in_grid.x] = a;
""", name="switch_cost")
    one = np.ones(8, np.float32)

    def run_switch(w):
        return run_metal_kernel_on_cpu(switch, [one], None, (4096, 1, 1), (1024, 1, 1), [(4096,)], [np.float32],
                                       schedules=["forward"], workers=w)

    t = time.perf_counter()
    run_switch(1)
    print(f"first compile (precompiled header + kernel): {time.perf_counter() - t:.2f} s")
    for w in workers:
        dt = timed(lambda w=w: run_switch(w))
        print(f"fiber switch, {w} worker(s): {dt / (4096 * rounds * 2) * 1e9:.0f} ns "
              f"(4096 threads x {rounds} simd_sum, {dt * 1e3:.0f} ms)")

    rng = np.random.default_rng(0)
    for n in (1, 256, 4096):
        m = rng.standard_normal((n, 24)).astype(np.float32)
        ins = [m, np.ones(3, np.float32), np.zeros(24, np.float32), np.float32(1e-6)]
        call = lambda ins=ins, n=n: run_metal_kernel_on_cpu(  # noqa: E731
            "sinkhorn_split", ins, {"ITERS": 20}, (16 * n, 1, 1), (min(16 * n, 256), 1, 1),
            [(n, 4), (n, 4), (n, 4, 4)], [np.float32] * 3)
        t = time.perf_counter()
        call()
        first = time.perf_counter() - t
        print(f"sinkhorn_split N={n}: first call {first:.2f} s, then {timed(call) * 1e3:.1f} ms (2 schedules)")
    for B, L, N in ((1, 1, 1024), (2, 16, 256)):
        q = rng.standard_normal((B, L, 64, 128)).astype(np.float32)
        k = rng.standard_normal((B, N, 128)).astype(np.float32)
        w = rng.standard_normal((B, L, 64)).astype(np.float32)
        off = np.full(B, 4 * N, np.int32)
        call = lambda q=q, k=k, w=w, off=off, B=B, L=L, N=N: run_metal_kernel_on_cpu(  # noqa: E731
            "indexer_score", [q, k, w, off], {"T": np.float32, "H": 64, "DQ": 128, "RATIO": 4},
            (128 * (-(-N // 32)), L, B), (128, 1, 1), [(B, L, N)], [np.float32])
        t = time.perf_counter()
        call()
        first = time.perf_counter() - t
        print(f"indexer_score B={B} L={L} N={N} H=64 D=128: first call {first:.2f} s, "
              f"then {timed(call) * 1e3:.1f} ms (2 schedules)")


if __name__ == "__main__":
    main()
