"""Speculative round loop of this tree against another tree's speculative.py, in one process, on the bench model.

    python benchmarks/speculative_ab.py --base ../other/mlx_dsv4/speculative.py [--tokens 24] [--reps 6] [--ks 2,3]

The two Speculators run in alternation (ABBA), from copies of one prefilled cache (context 512), greedy,
with their real MTP drafts; each pair must emit the same tokens. tok/s is per Speculator loop (next_round
and commit until --tokens, plus close() where there is one), without stream_generate's detokenising;
the ratio is this tree over the base, per pair, then the median. The base file is loaded as a module of
its own, so it may import only absolute packages (true of speculative.py up to this version).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_dsv4 import speculative as new  # noqa: E402
from mlx_dsv4.bench import load_bench_model, machine  # noqa: E402
from mlx_dsv4.generate import prefill  # noqa: E402


def load_base(path: str):
    spec = importlib.util.spec_from_file_location("base_speculative", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--ks", default="2,3")
    a = p.parse_args()
    base = load_base(a.base)
    print(f"machine: {machine()}", flush=True)
    model = load_bench_model("bench", mx.float32)
    ids = np.random.default_rng(0).integers(10, 1000, 512).tolist()
    cache0 = model.make_cache()
    prefill(model, ids[:-1], cache0, 512)

    def run(mod, k):
        s = mod.Speculator(model, [c.copy() for c in cache0], k, mod.Distribution(0.0, 1.0, 0.0, 0), [], None, None)
        last, toks = ids[-1], []
        t = time.perf_counter()
        while len(toks) < a.tokens:
            out = s.next_round(last, a.tokens - len(toks))
            s.commit(len(out))
            last = out[-1].token
            toks += [e.token for e in out]
        if hasattr(s, "close"):
            s.close()
        return a.tokens / (time.perf_counter() - t), toks

    res = {}
    for rep in range(a.reps):
        for k in (int(k) for k in a.ks.split(",")):
            order = [("base", base), ("this", new)]
            pair = {name: run(mod, k) for name, mod in (order if rep % 2 == 0 else order[::-1])}
            if pair["base"][1] != pair["this"][1]:
                raise SystemExit(f"K={k}: the two trees emitted different tokens")
            for name, (tps, _) in pair.items():
                res.setdefault(k, {}).setdefault(name, []).append(tps)
            res[k].setdefault("ratio", []).append(pair["this"][0] / pair["base"][0])
    for k, r in res.items():
        print(f"K={k}: " + ", ".join(f"{name} median {statistics.median(v):.3f} {[round(x, 3) for x in v]}"
                                     for name, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
