"""The model across ranks, both modes: per-Mac memory for the official models, collective traffic
per step, and localhost ring timings.

    python benchmarks/distributed.py [--ranks 1 2 3] [--steps 16]

1. Per-Mac GB for V4-Pro and V4-Flash on 2, 3 and 4 Macs, from the official configs' tensor
   inventory (tests/data/configs, bytes as stored: FP8 / FP4 experts): pipeline with the stage
   plan the loader uses, tensor with the split TensorShard makes (distributed.shard_bytes).
2. Collectives per decode step and per prefill token (batch 1), counted from each mode's protocol.
   Pipeline (model.py / distributed.Stage.finish): N-1 sends of the mHC streams [B, L, 4, d]
   (the embedding's dtype, bf16 for the real models) and one all_sum of the float32 logits
   ([B, 1, vocab] per decode step or prefill chunk). Tensor (attention.py / moe.py): per layer one
   all_sum of the attention output [B, L, d] (model dtype, bf16) and one of the MoE output
   (float32). Payload bytes; a ring all_sum moves about 2 (N-1) / N of its payload per rank.
3. Decode step time over the ring backend on 127.0.0.1 (mlx.launch), 1, 2, 3 ranks, both modes,
   on a random tiny Flash-schedule checkpoint with 4 output groups (so 3 ranks can split it by
   tensor): the cost of the transport, as the tiny model computes almost nothing. Tensor mode's
   all_sums per step are counted at run time (TensorShard.calls) and printed beside.
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
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIMED = r"""
import sys, time, mlx.core as mx
from mlx_dsv4.distributed import world_group
from mlx_dsv4.load import load
g = world_group()
model, _ = load({ckpt!r}, group=g, sharding={sharding!r})
cache = model.make_cache()
tok = mx.array([[5]])
model(mx.array([[0] * 32]), cache, last_only=True)
for _ in range(3):
    tok = model(tok, cache).argmax(-1).astype(mx.int32); mx.eval(tok)
calls = model.shard.calls if model.shard else 0
t = time.perf_counter()
for _ in range({steps}):
    tok = model(tok, cache).argmax(-1).astype(mx.int32); mx.eval(tok)
ms = (time.perf_counter() - t) / {steps} * 1e3
calls = (model.shard.calls - calls) / {steps} if model.shard else float("nan")
if g is None or g.rank() == 0:
    print(f"STEP_MS {{ms:.2f}} {{calls:.0f}}")
"""


class _Rank:
    """Stands in for an mx.distributed group when planning (size and rank only)."""

    def __init__(self, n: int, r: int):
        self._n, self._r = n, r

    def size(self) -> int:
        return self._n

    def rank(self) -> int:
        return self._r


def _official(name: str) -> dict:
    return json.loads((ROOT / "tests/data/configs" / f"{name}.config.json").read_text())


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
    from mlx_dsv4.distributed import plan_stages, plan_tensor, shard_bytes, stage_bytes, tensor_bytes

    print("| model | checkpoint GB | Macs | per-Mac GB, pipeline (rank 0 .. N-1) | layers per Mac | "
          "per-Mac GB, tensor (rank 0 .. N-1) |")
    print("|---|---|---|---|---|---|")
    for name in ("DeepSeek-V4-Pro", "DeepSeek-V4-Flash"):
        cfg = _official(name)
        args = from_hf_config(cfg)
        sizes = {k: nbytes(dt, s) for k, (dt, s) in expected_tensors(cfg).items()}
        parts = tensor_bytes(sizes, args.n_layers)
        # the converted / lossless-on-the-fly shared expert is mxfp8: cut in groups of 32
        quant = {"layers.0.ffn.shared_experts.w2": {"group_size": 32}}
        for n in (2, 3, 4):
            plan = plan_stages(*parts, n)
            per = " / ".join(f"{b / 1e9:.1f}" for b in stage_bytes(*parts, plan))
            tp = " / ".join(f"{shard_bytes(sizes, plan_tensor(_Rank(n, r), args, quant, 1.0)) / 1e9:.1f}"
                            for r in range(n))
            print(f"| {name} | {sum(sizes.values()) / 1e9:.1f} | {n} | {per} | {[len(r) for r in plan]} | {tp} |")


def traffic():
    from mlx_dsv4.config import from_hf_config

    print("\n| model | mode | ranks | decode step: collectives | decode step: payload bytes | "
          "prefill: payload bytes per token |")
    print("|---|---|---|---|---|---|")
    for name in ("DeepSeek-V4-Pro", "DeepSeek-V4-Flash"):
        a = from_hf_config(_official(name))
        stream, logits = a.hc_mult * a.dim * 2, a.vocab_size * 4  # bf16 streams, float32 logits
        tp = a.n_layers * (a.dim * 2 + a.dim * 4)  # bf16 attention + float32 MoE partials per token
        for n in (2, 3, 4):
            print(f"| {name} | pipeline | {n} | {n - 1} send + 1 all_sum | {(n - 1) * stream + logits:,} "
                  f"({stream:,} per hop + {logits:,} logits) | {(n - 1) * stream:,} (+ {logits:,} per chunk) |")
            print(f"| {name} | tensor | {n} | {2 * a.n_layers} all_sum | {tp:,} ({a.dim * 2:,} + {a.dim * 4:,} "
                  f"per layer) | {tp:,} |")


def _checkpoint(root: Path) -> str:
    import numpy as np
    from safetensors.numpy import save_file

    from mlx_dsv4.config import from_hf_config
    from mlx_dsv4.tiny import random_weights, tiny_hf_config

    cfg = tiny_hf_config("flash", o_groups=4)
    (root / "config.json").write_text(json.dumps(cfg))
    w = random_weights(from_hf_config(cfg), seed=0)
    save_file({k: np.ascontiguousarray(v) for k, v in w.items()}, str(root / "model.safetensors"))
    return str(root)


def timings(ranks, steps):
    sys.path.insert(0, str(ROOT / "tests"))
    from dist_util import env, launch_cmd

    print(f"\n| ranks | mode | decode step ms (random tiny Flash schedule, 4 output groups, ring on 127.0.0.1, "
          f"{steps} steps) | all_sums per step (counted) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _checkpoint(Path(tmp))
        for n in ranks:
            for mode in ("pipeline", "tensor") if n > 1 else ("single",):
                code = TIMED.format(ckpt=ckpt, sharding="pipeline" if n == 1 else mode, steps=steps)
                cmd = [sys.executable, "-c", code] if n == 1 else launch_cmd(n, [sys.executable, "-c", code])
                p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
                out = [line.split()[1:] for line in p.stdout.splitlines() if line.startswith("STEP_MS")]
                ms, calls = out[0] if out else ("failed: " + p.stderr[-200:], "")
                print(f"| {n} | {mode} | {ms} | {calls if mode == 'tensor' else '-'} |")


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
