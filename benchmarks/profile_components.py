"""Where the time of a prefill and of decode steps goes, per model component.

    python benchmarks/profile_components.py [--model bench|tiny] [--context 256] [--steps 20]

Each component's result is evaluated at its boundary (that serialises MLX's lazy graph, so the
total is a little above an unprofiled run); times are wall-clock on the current device.
"""

from __future__ import annotations

import argparse
import collections
import time

import mlx.core as mx
import numpy as np

import mlx_dsv4.attention as attention
import mlx_dsv4.compressor as compressor
import mlx_dsv4.indexer as indexer
import mlx_dsv4.model as model_mod
import mlx_dsv4.moe as moe
from mlx_dsv4.bench import load_bench_model, machine

T: collections.Counter = collections.Counter()


def _timed(name, f):
    def g(*a, **k):
        t = time.perf_counter()
        y = f(*a, **k)
        mx.eval(y)
        T[name] += time.perf_counter() - t
        return y
    return g


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="bench")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    m = load_bench_model(a.model, mx.float32)
    attention.sparse_attention = _timed("attention core", attention.sparse_attention)
    indexer.select = _timed("indexer scoring + top-k", indexer.select)
    model_mod.hc_pre = _timed("mHC pre (Sinkhorn)", model_mod.hc_pre)
    model_mod.hc_post = _timed("mHC post", model_mod.hc_post)
    moe.MoE.__call__ = _timed("MoE", moe.MoE.__call__)
    compressor.Compressor.__call__ = _timed("compressors", compressor.Compressor.__call__)
    attention.Attention.__call__ = _timed("attention (all)", attention.Attention.__call__)
    toks = mx.array(np.random.default_rng(0).integers(0, m.args.vocab_size, (1, a.context)).astype(np.int32))
    cache = m.make_cache()
    print(machine())
    for phase in ("prefill", "decode"):
        T.clear()
        t = time.perf_counter()
        if phase == "prefill":
            y = m(toks, cache, last_only=True)
            mx.eval(y)
        else:
            for _ in range(a.steps):
                y = m(mx.argmax(y[:, -1], -1)[:, None], cache)
                mx.eval(y)
        total = time.perf_counter() - t
        print(f"{phase}: {total:.2f} s" + (f" ({1e3 * total / a.steps:.0f} ms/token)" if phase == "decode" else ""))
        for k, v in T.most_common():
            print(f"  {k:28s} {v:7.2f} s  {100 * v / total:5.1f}%")


if __name__ == "__main__":
    main()
