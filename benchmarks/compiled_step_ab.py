"""Host time of the compiled decode step, this tree against another checkout, runs interleaved.

    python benchmarks/compiled_step_ab.py --base /path/to/other/checkout [--rounds 3] [--steps 300] [--context 64]

This VM's timings swing by a third from day to day, more than a change to the step's graph moves them, so
two trees are compared in one session: each round runs the base, then this tree, each in a fresh process
(the bench model as a converted checkpoint has it: bf16, routed experts mxfp4, other projections mxfp8;
kernel dispatch through launch_count's stand-ins, as a Mac builds the step). A process times `steps`
calls of the compiled step (the first 20 dropped), each evaluated before the next, and prints the median
and lower quartile of its host ms (building only) and the step's node count. Each process reads its own
tree's package and Metal sources.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def child(root: Path, steps: int, context: int) -> None:
    sys.path[:0] = [str(root), str(root / "benchmarks")]
    kernels = types.ModuleType("mlx_dsv4.metal_kernels")  # this tree's Metal sources, whatever is installed
    kernels.__file__ = str(root / "metal_kernels" / "__init__.py")
    sys.modules["mlx_dsv4.metal_kernels"] = kernels
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models.switch_layers import SwitchLinear

    import mlx_dsv4
    from host_overhead import prefilled, snapshot
    from launch_count import _count, kernels_counted
    from mlx_dsv4.bench import load_bench_model
    from mlx_dsv4.compiled_step import CompiledDecode

    if not mlx_dsv4.__file__.startswith(str(root)):
        raise SystemExit(f"{root}: imported mlx_dsv4 from {mlx_dsv4.__file__}")
    model = load_bench_model("bench", mx.bfloat16, simulate_qat=True)
    nn.quantize(model, class_predicate=lambda _p, m: isinstance(m, SwitchLinear), group_size=32, bits=4, mode="mxfp4")
    nn.quantize(model, group_size=32, bits=8, mode="mxfp8", class_predicate=lambda p, m:
                (isinstance(m, nn.Linear) or p.endswith(".wo_a")) and p != "head" and m.weight.shape[-1] % 32 == 0)
    cache, first = prefilled(model, context)
    with kernels_counted():
        cd = CompiledDecode(model, snapshot(cache), steps + 8)
        tok = mx.array([[first]], mx.int32)
        ms = []
        for _ in range(steps):
            t0 = time.perf_counter()
            y = cd(tok)
            ms.append(1e3 * (time.perf_counter() - t0))
            mx.eval(y, cd.arrays)
        nodes = sum(_count([cd(tok)] + [v for a in cd.arrays for _, v in tree_flatten(a)]).values())
    ms = sorted(ms[20:])
    print(f"{statistics.median(ms):.3f} {ms[len(ms) // 4]:.3f} {nodes}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the other checkout (its root folder)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(Path(a.child), a.steps, a.context)
    base = Path(a.base).resolve()
    if not (base / "mlx_dsv4").is_dir():
        raise SystemExit(f"--base {base}: no mlx_dsv4 package there")
    sys.path.insert(0, str(HERE))
    from mlx_dsv4.bench import loaded_blas, machine

    print(f"machine: {machine()}\nBLAS really loaded: {loaded_blas()}\n"
          f"compiled step, kernel stand-ins, context {a.context}, {a.steps} steps per run, {a.rounds} rounds")
    got = {"base": [], "this": []}
    for r in range(a.rounds):
        for name, root in (("base", base), ("this", HERE)):
            out = subprocess.run([sys.executable, __file__, "--base", str(base), "--child", str(root),
                                  "--steps", str(a.steps), "--context", str(a.context)],
                                 capture_output=True, text=True, env=os.environ)
            if out.returncode:
                raise SystemExit(f"{name} run failed:\n{out.stderr[-2000:]}")
            median, q1, nodes = out.stdout.split()[-3:]
            got[name].append(float(median))
            print(f"round {r + 1} {name}: host ms median {median}, lower quartile {q1}, {nodes} nodes", flush=True)
    ratios = [t / b for b, t in zip(got["base"], got["this"])]
    print(f"this / base, per round: {', '.join(f'{x:.3f}' for x in ratios)}; median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
