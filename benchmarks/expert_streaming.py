"""Routed experts streamed from disk against the resident model: greedy tokens (must be equal), decode
time ratio, hit rate, bytes read from disk per token and peak memory, for a few expert budgets.

    python benchmarks/expert_streaming.py                      # a generated checkpoint, experts ~96% of it
    python benchmarks/expert_streaming.py --model DIR --budgets 20,40,80 --prompt-tokens 64 --gen-tokens 32

Each configuration runs in a fresh process, so its peak memory (MLX's allocator; on the CPU
backend it counts every array) is its own. Budgets are in GB, or a percentage of the experts with %.
Random weights route with little locality, so hit rates here are a floor for a trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, time
import mlx.core as mx
import numpy as np
from mlx_dsv4.load import load
model, tok = load({path!r}, expert_memory_gb={gb!r})
ids = np.random.default_rng(0).integers(0, model.args.vocab_size, {prompt}).tolist()
mx.reset_peak_memory()
cache = model.make_cache()
t = time.perf_counter()
y = model(mx.array(ids)[None], cache, last_only=True)
tok = mx.argmax(y[:, -1], axis=-1)
mx.eval(tok, [c.state for c in cache])
prefill = time.perf_counter() - t
store = model.expert_store
if store is not None:
    store.reset_stats()  # decode only
out, t = [tok.item()], time.perf_counter()
for _ in range({gen} - 1):
    tok = mx.argmax(model(tok[None], cache)[:, -1], axis=-1)
    mx.eval(tok)
    out.append(tok.item())
decode = time.perf_counter() - t
print(json.dumps({{"tokens": out, "prefill_s": prefill, "decode_ms": 1e3 * decode / max({gen} - 1, 1),
                  "peak_gb": mx.get_peak_memory() / 1e9, "stats": store and store.stats()}}))
"""


def run_child(path: Path, gb: float | None, prompt: int, gen: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = CHILD.format(path=str(path), gb=gb, prompt=prompt, gen=gen)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def make_checkpoint(out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from ckpt_util import small_config

    from mlx_dsv4.checkpoint import convert, write_random_official_checkpoint

    cfg = small_config(hidden_size=1024, moe_intermediate_size=512, n_routed_experts=64, num_experts_per_tok=6,
                       compress_ratios=[0, 4, 128, 4, 0], num_hidden_layers=4)
    official = write_random_official_checkpoint(out / "official", cfg, seed=0)
    return convert(official, out / "converted", progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a converted or official checkpoint (default: generate one)")
    p.add_argument("--budgets", default="10%,25%,50%", help="GB, or N%% of all routed experts, comma-separated")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=16)
    a = p.parse_args()
    from mlx_dsv4.bench import machine
    from mlx_dsv4.checkpoint.experts import expert_files
    from mlx_dsv4.checkpoint.load import load_weights
    from mlx_dsv4.expert_store import expert_nbytes, slab_spec

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(a.model) if a.model else make_checkpoint(Path(tmp))
        cfg, _ = load_weights(path)
        import mlx.core as mx

        files = expert_files(path, cfg)
        total = expert_nbytes(slab_spec(files, mx.bfloat16)) * sum(f.n_experts for f in files.values())
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        print(f"machine: {machine()}")
        print(f"checkpoint {path}: {size / 1e9:.3f} GB, routed experts {total / 1e9:.3f} GB "
              f"({100 * total / size:.0f}%); prompt {a.prompt_tokens} tokens, {a.gen_tokens} greedy tokens, bf16")
        base = run_child(path, None, a.prompt_tokens, a.gen_tokens)
        print("| experts budget | decode ms/token | time vs resident | hit rate | MB read / token | peak GB | "
              "peak vs resident | same tokens |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        print(f"| resident | {base['decode_ms']:.1f} | 1.00 | - | 0 | {base['peak_gb']:.3f} | 1.00 | - |")
        for b in a.budgets.split(","):
            gb = float(b[:-1]) / 100 * total / 1e9 if b.endswith("%") else float(b)
            r = run_child(path, gb, a.prompt_tokens, a.gen_tokens)
            s = r["stats"] or {}
            hit = "-" if s.get("hit_rate") is None else f"{100 * s['hit_rate']:.1f}%"
            mb = (s.get("bytes_per_token") or 0) / 1e6
            print(f"| {gb:.3g} GB ({100 * gb * 1e9 / total:.0f}%) | {r['decode_ms']:.1f} | "
                  f"{r['decode_ms'] / base['decode_ms']:.2f} | {hit} | {mb:.2f} | {r['peak_gb']:.3f} | "
                  f"{r['peak_gb'] / base['peak_gb']:.2f} | {r['tokens'] == base['tokens']} |")


if __name__ == "__main__":
    main()
