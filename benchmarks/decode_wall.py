"""Decode wall time per token of this checkout against another one (e.g. an earlier commit), same run.

    git worktree add /tmp/old <commit>
    python benchmarks/decode_wall.py --tree /tmp/old [--contexts 512 2048] [--pairs 2]

Each measurement is its own process (bench model: Flash's 43-layer schedule, float32, trained-format
simulation on; the prompt prefilled, then 12 greedy tokens through generate.PlainDecoder, four rounds, the
median of the last three). Old and new alternate, so a machine shared with other work slows both alike.
The other tree runs its own default decode loop; both must emit the same tokens (checked).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import statistics, sys, time
import mlx.core as mx, numpy as np
from mlx_dsv4.bench import load_bench_model, loaded_blas
from mlx_dsv4.generate import PlainDecoder
ctx, steps = int(sys.argv[1]), 12
model = load_bench_model("bench", mx.float32, simulate_qat=True)
toks = np.random.default_rng(0).integers(0, model.args.vocab_size, (1, ctx)).astype(np.int32)
cache = model.make_cache()
for s in range(0, ctx, 512):
    y = model(mx.array(toks[:, s : s + 512]), cache, last_only=True)
    mx.eval(y, [c.state for c in cache])
first, res = int(mx.argmax(y[0, -1]).item()), []
for _ in range(4):
    dec = PlainDecoder(model, [c.copy() for c in cache], lambda lp: mx.argmax(lp, axis=-1), [], None)
    last, out, t0 = first, [], time.perf_counter()
    for n in range(steps):
        (e,) = dec.next_round(last, steps - n)
        dec.commit(1)
        last = e.token
        out.append(last)
    dec.close()
    res.append(1e3 * (time.perf_counter() - t0) / steps)
print("RESULT", round(statistics.median(res[1:]), 1), loaded_blas(), out)
"""


def measure(tree: Path, ctx: int) -> tuple[float, str, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    p = subprocess.run([sys.executable, "-c", CHILD, str(ctx)], env=env, cwd=tree, capture_output=True, text=True,
                       timeout=1800)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")), None)
    if line is None:
        raise SystemExit(f"error: the run in {tree} failed: {p.stderr.strip()[-300:]}")
    _, ms, rest = line.split(" ", 2)
    blas, toks = rest.rsplit(" [", 1)
    return float(ms), blas, "[" + toks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", type=Path, required=True, help="the other checkout (a git worktree)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--pairs", type=int, default=2)
    a = ap.parse_args(argv)
    print("| context | other tree ms/token | this tree ms/token | speed-up | same tokens | BLAS |")
    print("|---:|---:|---:|---:|---|---|")
    for ctx in a.contexts:
        for _ in range(a.pairs):
            old, blas, t_old = measure(a.tree.resolve(), ctx)
            new, _, t_new = measure(ROOT, ctx)
            print(f"| {ctx:,} | {old:.1f} | {new:.1f} | {old / new:.2f}x | {t_old == t_new} | {blas} |", flush=True)


if __name__ == "__main__":
    main()
