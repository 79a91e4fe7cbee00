"""Hadamard variants and block round trips of mlx_dsv4.formats: median wall time per call.

Usage (repo root): python -m benchmarks.bench_formats [--rows 4096] [--device cpu|gpu]
"""

from __future__ import annotations

import argparse
import platform
import time

import mlx.core as mx
import numpy as np

from mlx_dsv4 import formats as F


def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def butterfly(x: mx.array) -> mx.array:
    n, h = x.shape[-1], 1
    lead = x.shape[:-1]
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        u, v = y[..., 0, :], y[..., 1, :]
        x = mx.stack([u + v, u - v], axis=-2).reshape(*lead, n)
        h *= 2
    return x * (n**-0.5)


def bench(name: str, fn, x: mx.array, iters: int = 50) -> None:
    f = mx.compile(fn)
    mx.eval(f(x))
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        mx.eval(f(x))
        ts.append(time.perf_counter() - t)
    print(f"{name:<28} {1e6 * float(np.median(ts)):9.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    a = ap.parse_args()
    mx.set_default_device(mx.cpu if a.device == "cpu" else mx.gpu)
    print(f"machine: {platform.machine()} {platform.processor()} | mlx {mx.__version__} | "
          f"device {a.device} | rows {a.rows}")
    x = mx.random.normal((a.rows, 128))
    H = mx.array(sylvester(128))
    bench("hadamard (mx primitive)", F.hadamard, x)
    bench("hadamard (butterfly)", butterfly, x)
    bench("hadamard (matmul, scale after)", lambda v: (v @ H) * (128**-0.5), x)
    bench("indexer_roundtrip [*,128]", F.indexer_roundtrip, x)
    kv = mx.random.normal((a.rows, 512)).astype(mx.bfloat16)
    bench("fp8_block_roundtrip [*,512]", lambda v: F.fp8_block_roundtrip(v, 64, 448), kv)


if __name__ == "__main__":
    main()
