"""`mlx_dsv4 bench`: prompt and generation tokens/s, peak memory and cache bytes per token from 1K
tokens up to the longest context asked for, as a table, JSON and a PNG plot.

Models: "tiny-random", "bench" (random weights, the real Flash layer schedule and attention geometry:
its cache is byte for byte the size of the real Flash's) or a checkpoint path.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from .cache_size import cache_bytes, layer_bytes


def _mapped(prefixes: tuple[str, ...]) -> list[str] | None:
    """The libraries named prefix* really mapped into this process (LD_PRELOAD can name one the loader
    refused); None where there is no /proc to read."""
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        return None
    return sorted({n for line in maps.splitlines() if (n := line.rsplit("/", 1)[-1]).startswith(prefixes)})


def loaded_blas() -> str:
    """The BLAS really mapped into this process."""
    libs = _mapped(("libopenblas",))  # only a system OpenBLAS serves MLX; numpy / scipy map private copies
    if libs is None:
        return "unknown (no /proc)"
    return f"OpenBLAS ({', '.join(libs)})" if libs else "MLX bundled reference BLAS"


def loaded_allocator() -> str:
    """The malloc really mapped into this process: host time per decode step is mostly graph nodes made and
    freed, and on Linux glibc's malloc makes that ~2x slower than jemalloc (README "Host time per decode step")."""
    libs = _mapped(("libjemalloc", "libtcmalloc", "libmimalloc"))
    if libs is None:
        return "the platform's (no /proc)"
    return ", ".join(libs) if libs else "glibc malloc"


def machine() -> dict:
    blas = loaded_blas()
    dev = mx.default_device()
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "device": str(dev), "mlx": mx.__version__}
    if dev == mx.cpu:
        info["blas"] = blas
    elif mx.metal.is_available():
        info["gpu"] = mx.metal.device_info().get("device_name", "metal")
    info["malloc"] = loaded_allocator()
    return info


def load_bench_model(name: str, dtype, simulate_qat: bool = True, expert_memory_gb: float | None = None):
    from .config import from_hf_config
    from .load import build_model, load, to_model_layout
    from .tiny import bench_hf_config, random_weights, tiny_hf_config

    if name in ("tiny-random", "bench"):
        if expert_memory_gb is not None:
            raise ValueError(f"--expert-memory-gb streams experts from checkpoint files; the {name!r} model has none")
        cfg = tiny_hf_config("flash") if name == "tiny-random" else bench_hf_config()
        args = from_hf_config(cfg)
        w = {k: mx.array(v) for k, v in random_weights(args, 0).items()}
        return build_model(args, to_model_layout(w, args), dtype, simulate_qat)
    return load(name, dtype=dtype, simulate_qat=simulate_qat, expert_memory_gb=expert_memory_gb)[0]


def measure(model, context: int, gen_tokens: int, chunk: int, seed: int = 0) -> dict:
    a = model.args
    toks = mx.array(np.random.default_rng(seed).integers(0, a.vocab_size, (1, context)).astype(np.int32))
    cache = model.make_cache()
    mx.synchronize()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for s in range(0, context, chunk):
        logits = model(toks[:, s : s + chunk], cache, last_only=True)
        mx.eval(logits, [c.state for c in cache])
    prefill = time.perf_counter() - t0
    store = model.expert_store
    if store is not None:
        store.reset_stats()  # streamed experts: report decode's hits and reads
    tok = mx.argmax(logits[:, -1], axis=-1)[:, None]
    t0 = time.perf_counter()
    for _ in range(gen_tokens):
        tok = mx.argmax(model(tok, cache)[:, -1], axis=-1)[:, None]
        mx.eval(tok)
    decode = time.perf_counter() - t0
    per_ratio: dict[str, float] = {}
    for i, c in enumerate(cache):
        r = a.ratio(i)
        if r:
            grown = c.compressed_store.nbytes + c._index.nbytes
            per_ratio[str(r)] = per_ratio.get(str(r), 0.0) + grown / (c.offset // r * r)
    fmt = "compact" if model.simulate_qat else "bf16"
    analytic = {}
    for i in range(a.n_layers):
        r = a.ratio(i)
        if r:
            analytic[str(r)] = analytic.get(str(r), 0.0) + layer_bytes(a, r, fmt, model.embed.weight.itemsize).per_token
    return {"context": context, "prompt_tps": context / prefill, "generation_tps": gen_tokens / decode,
            "decode_ms": 1e3 * decode / gen_tokens, "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "cache_bytes": sum(c.nbytes for c in cache),
            "cache_bytes_per_token_by_ratio": per_ratio, "analytic_bytes_per_token_by_ratio": analytic,
            "experts": store.stats() if store is not None else None}


def run(model: str = "bench", contexts=(1024, 4096, 16384), gen_tokens: int = 16, chunk: int = 2048,
        dtype: str | None = None, out_json: str | None = None, out_png: str | None = None, echo=print,
        expert_memory_gb: float | None = None) -> dict:
    dt = getattr(mx, dtype) if dtype else (mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16)
    m = load_bench_model(model, dt, expert_memory_gb=expert_memory_gb)
    window = max(m.args.ratio(i) for i in range(m.args.n_layers))
    if min(contexts) < window:  # bytes per token are measured over completed compression windows
        raise ValueError(f"contexts must be at least {window} tokens (one compression window), got {min(contexts)}")
    result = {"model": model, "dtype": str(dt), "chunk": chunk, "gen_tokens": gen_tokens, "machine": machine(),
              "expert_memory_gb": expert_memory_gb,
              "analytic_1m_gib": cache_bytes(m.args, 1 << 20)["total"] / 2**30, "runs": []}
    echo(f"machine: {result['machine']}")
    echo(f"model {model} ({dt}), prefill chunk {chunk}, {gen_tokens} generated tokens per context")
    echo("| context | prompt tok/s | gen tok/s | decode ms | peak GB | cache MB | B/token CSA (analytic) | B/token HCA (analytic) |")
    echo("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ctx in contexts:
        r = measure(m, ctx, gen_tokens, chunk)
        result["runs"].append(r)
        pr, an = r["cache_bytes_per_token_by_ratio"], r["analytic_bytes_per_token_by_ratio"]
        echo(f"| {ctx:,} | {r['prompt_tps']:.1f} | {r['generation_tps']:.2f} | {r['decode_ms']:.1f} | "
             f"{r['peak_memory_gb']:.2f} | {r['cache_bytes'] / 1e6:.1f} | {pr.get('4', 0):.1f} ({an.get('4', 0):.1f}) | "
             f"{pr.get('128', 0):.2f} ({an.get('128', 0):.2f}) |")
        if r["experts"]:
            from .generate import format_expert_stats

            echo(f"  decode at {ctx:,}: {format_expert_stats(r['experts'])}")
    runs = result["runs"]
    if len(runs) > 1:
        ratio = runs[-1]["generation_tps"] / runs[0]["generation_tps"]
        echo(f"decode at {runs[-1]['context']:,} runs at {100 * ratio:.0f}% of decode at {runs[0]['context']:,}")
    if out_json:
        Path(out_json).write_text(json.dumps(result, indent=2))
    if out_png:
        plot(result, out_png)
    return result


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("the PNG plot needs matplotlib (pip install matplotlib)") from e
    runs = result["runs"]
    x = [r["context"] for r in runs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(x, [r["prompt_tps"] for r in runs], "o-", label="prompt")
    a1.plot(x, [r["generation_tps"] for r in runs], "s-", label="generation")
    a1.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="tokens/s", title="Throughput")
    a1.legend()
    a2.plot(x, [r["peak_memory_gb"] for r in runs], "o-", label="peak memory")
    a2.plot(x, [r["cache_bytes"] / 1e9 for r in runs], "s-", label="KV cache")
    a2.set(xscale="log", xlabel="context (tokens)", ylabel="GB", title="Memory")
    a2.legend()
    fig.suptitle(f"mlx-dsv4 bench: {result['model']} on {result['machine']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
