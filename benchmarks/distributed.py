"""Pipeline mode across ranks: per-Mac memory for the official models, collective traffic per
step, and localhost ring timings.

    python benchmarks/distributed.py [--ranks 1 2 3] [--steps 16]

1. Per-Mac GB for V4-Pro and V4-Flash on 2, 3 and 4 Macs, from the official configs' tensor
   inventory (tests/data/configs, bytes as stored: FP8 / FP4 experts), with the stage plan the
   loader uses.
2. Collectives per decode step and per prefill token (batch 1), counted from the pipeline's
   protocol (model.py / distributed.Stage.finish): N-1 sends of the mHC streams [B, L, 4, d]
   (the embedding's dtype, bf16 for the real models) and one all_sum of the float32 logits
   ([B, 1, vocab] per decode step or prefill chunk).
3. Decode step time of the trained tiny model over the ring backend on 127.0.0.1 (mlx.launch),
   1, 2, 3 ranks: the cost of the transport, as the tiny model computes almost nothing.
4. `serve` under mlx.launch: the cost of rank 0's per-iteration message (server/lockstep.py) on
   2 ranks over 127.0.0.1, empty (one int32 all_sum, the common case while decoding) and holding
   one new request of 1,000 prompt token ids.

    python benchmarks/distributed.py --parts lockstep   (one part only)
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIMED = r"""
import sys, time, mlx.core as mx
from mlx_dsv4.distributed import world_group
from mlx_dsv4.load import load
g = world_group()
model, _ = load("tiny", group=g)
cache = model.make_cache()
tok = mx.array([[5]])
model(mx.array([[0] * 32]), cache, last_only=True)
for _ in range(3):
    tok = model(tok, cache).argmax(-1).astype(mx.int32); mx.eval(tok)
t = time.perf_counter()
for _ in range({steps}):
    tok = model(tok, cache).argmax(-1).astype(mx.int32); mx.eval(tok)
if g is None or g.rank() == 0:
    print(f"STEP_MS {{(time.perf_counter() - t) / {steps} * 1e3:.2f}}")
"""


SHARED = r"""
import sys, time
from mlx_dsv4.distributed import world_group
from mlx_dsv4.server.lockstep import Lockstep
ls = Lockstep(world_group())
job = {{"jobs": [[list(range(1000)), {{"max_tokens": 256, "temperature": 0.0}}]], "cancel": [], "close": False}}
for message, label in ((None, "EMPTY_US"), (job, "JOB_US")):
    for _ in range(20):
        ls.share(message if ls.leader else None)
    t = time.perf_counter()
    for _ in range({steps}):
        ls.share(message if ls.leader else None)
    if ls.leader:
        print(f"{{label}} {{(time.perf_counter() - t) / {steps} * 1e6:.0f}}")
"""


def memory_table():
    from mlx_dsv4.checkpoint.official import expected_tensors
    from mlx_dsv4.checkpoint.safetensors_io import nbytes
    from mlx_dsv4.config import from_hf_config
    from mlx_dsv4.distributed import plan_stages, stage_bytes, tensor_bytes

    print("| model | checkpoint GB | Macs | per-Mac GB (pipeline), rank 0 .. N-1 | layers per Mac |")
    print("|---|---|---|---|---|")
    for name in ("DeepSeek-V4-Pro", "DeepSeek-V4-Flash"):
        cfg = json.loads((ROOT / "tests/data/configs" / f"{name}.config.json").read_text())
        sizes = {k: nbytes(dt, s) for k, (dt, s) in expected_tensors(cfg).items()}
        parts = tensor_bytes(sizes, from_hf_config(cfg).n_layers)
        for n in (2, 3, 4):
            plan = plan_stages(*parts, n)
            per = " / ".join(f"{b / 1e9:.1f}" for b in stage_bytes(*parts, plan))
            print(f"| {name} | {sum(sizes.values()) / 1e9:.1f} | {n} | {per} | {[len(r) for r in plan]} |")
    return cfg


def traffic():
    from mlx_dsv4.config import from_hf_config

    print("\n| model | ranks | decode step: calls, bytes sent per rank pair | prefill: bytes per token | "
          "prefill: calls per chunk |")
    print("|---|---|---|---|---|")
    for name in ("DeepSeek-V4-Pro", "DeepSeek-V4-Flash"):
        a = from_hf_config(json.loads((ROOT / "tests/data/configs" / f"{name}.config.json").read_text()))
        stream, logits = a.hc_mult * a.dim * 2, a.vocab_size * 4  # bf16 streams, float32 logits
        for n in (2, 3, 4):
            print(f"| {name} | {n} | {n - 1} send + 1 all_sum; {stream} B streams per hop, {logits} B logits "
                  f"| {stream} B per hop (+ {logits} B per chunk) | {n - 1} send + 1 all_sum |")


def timings(ranks, steps):
    print(f"\n| ranks | decode step ms (trained tiny, ring on 127.0.0.1, {steps} steps) |")
    print("|---|---|")
    sys.path.insert(0, str(ROOT / "tests"))
    from dist_util import env, launch_cmd

    code = TIMED.format(steps=steps)
    for n in ranks:
        cmd = [sys.executable, "-c", code] if n == 1 else launch_cmd(n, [sys.executable, "-c", code])
        p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
        ms = [line.split()[1] for line in p.stdout.splitlines() if line.startswith("STEP_MS")]
        print(f"| {n} | {ms[0] if ms else 'failed: ' + p.stderr[-200:]} |")


def lockstep(steps):
    print(f"\n| serve's lockstep message (2 ranks, ring on 127.0.0.1, {steps} shares) | us per share |")
    print("|---|---|")
    sys.path.insert(0, str(ROOT / "tests"))
    from dist_util import env, launch_cmd

    p = subprocess.run(launch_cmd(2, [sys.executable, "-c", SHARED.format(steps=steps)]), env=env(),
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    got = dict(line.split() for line in p.stdout.splitlines() if line.endswith(tuple("0123456789")))
    for label, what in (("EMPTY_US", "empty (nothing new this iteration)"), ("JOB_US", "one request, 1,000 ids")):
        print(f"| {what} | {got.get(label, 'failed: ' + p.stderr[-200:])} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--parts", nargs="+", default=["memory", "traffic", "timings", "lockstep"],
                    choices=["memory", "traffic", "timings", "lockstep"])
    args = ap.parse_args()
    import mlx.core as mx

    from mlx_dsv4.bench import loaded_blas

    print(f"machine: {platform.machine()} {platform.processor() or ''}, MLX {mx.__version__}, "
          f"device {mx.default_device()}, BLAS {loaded_blas()}\n")
    if "memory" in args.parts:
        memory_table()
    if "traffic" in args.parts:
        traffic()
    if "timings" in args.parts:
        timings(args.ranks, args.steps)
    if "lockstep" in args.parts:
        lockstep(max(args.steps, 200))


if __name__ == "__main__":
    main()
