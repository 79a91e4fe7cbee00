"""Continuous batching: decode throughput by rows in flight, and the server under concurrent requests.

    python benchmarks/batching.py [--rows 1,2,4,8] [--tokens 32] [--prompt 64] [--parts rows,server] [--repeats 3]
                                  [--json out.json]

1. BatchGenerator decode steps with 1, 2, 4, 8 rows (prompts of `--prompt` tokens, prefilled first, then
   `--tokens` greedy tokens each) on the bench model (Flash's layer schedule and attention geometry)
   and the trained tiny: aggregate tok/s (all rows) and per-stream tok/s, pipelined (each step submitted
   before the previous one's tokens are read, the default) and not, alternating, and their ratio.
2. The server (tiny model, in-process uvicorn, --max-batch 8): 8 requests of `--tokens` greedy tokens
   one at a time, then all 8 at once; aggregate generation rate of each and their ratio, `--repeats`
   such pairs in the same run (each pair's ratio compares neighbouring phases; the median is reported).
3. Latency of a 4-token request alone, and submitted while a long generation runs.
Figures depend on the machine and on its load: the machine, BLAS and settings are printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_dsv4.batch import BatchGenerator  # noqa: E402
from mlx_dsv4.bench import load_bench_model, machine  # noqa: E402
from mlx_dsv4.load import load  # noqa: E402


def rows_rate(model, tok, rows: int, prompt: int, tokens: int, ahead: bool = True) -> dict:
    rng = np.random.default_rng(rows)
    gen = BatchGenerator(model, tok, max_batch=rows, prefill_step=512, ahead=ahead)
    for _ in range(rows):
        gen.insert(rng.integers(0, model.args.vocab_size, prompt).tolist(), max_tokens=tokens, temperature=0.0)
    done = 0
    while any(r.prefilling for r in gen.running) or gen.queued:  # prefill (and each row's first token)
        done += sum(r is not None and r.token is not None for _, r in gen.step())
    tic = time.perf_counter()
    while len(gen):
        done += sum(r is not None and r.token is not None for _, r in gen.step())
    dt = time.perf_counter() - tic
    steady = rows * tokens - rows  # tokens after every row's first
    return {"rows": rows, "aggregate_tps": steady / dt, "per_stream_tps": steady / rows / dt}


def serve(model, tok, max_batch: int):
    """A uvicorn server on a free loopback port, in this process (the tests' helper, inlined)."""
    import socket

    import uvicorn

    from mlx_dsv4.server.app import create_app

    app = create_app(model, tok, model_name="tiny", max_batch=max_batch)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)

    def stop():
        server.should_exit = True
        thread.join(30)
        app.state.server.engine.close()

    return f"http://127.0.0.1:{port}", stop


def completion(url: str, prompt: str, n: int) -> tuple[int, float]:
    import httpx

    tic = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0},
                   timeout=600).json()
    return r["usage"]["completion_tokens"], time.perf_counter() - tic


def server_bench(model, tok, tokens: int, repeats: int = 1) -> dict:
    """`repeats` pairs of phases, each 8 requests one at a time then all 8 at once: the machine's load
    drifts, so each pair's ratio compares neighbouring phases; the median pair is reported."""
    url, stop = serve(model, tok, 8)
    try:
        prompts = [f"def function_number_{i}(x):\n    return" for i in range(8)]
        completion(url, prompts[0], 2)  # warm-up
        pairs = []
        for _ in range(repeats):
            tic = time.perf_counter()
            seq = sum(completion(url, p, tokens)[0] for p in prompts)
            t_seq = time.perf_counter() - tic
            tic = time.perf_counter()
            with ThreadPoolExecutor(8) as ex:
                con = sum(n for n, _ in ex.map(lambda p: completion(url, p, tokens), prompts))
            t_con = time.perf_counter() - tic
            pairs.append({"sequential_tps": seq / t_seq, "concurrent_tps": con / t_con,
                          "ratio": (con / t_con) / (seq / t_seq)})
        short = [completion(url, "import os\n", 4)[1] for _ in range(3)]
        with ThreadPoolExecutor(1) as ex:
            long = ex.submit(completion, url, "class LongStory:\n", 10 * tokens)
            time.sleep(1.0)  # the long generation is decoding
            busy = [completion(url, "import os\n", 4)[1] for _ in range(3)]
            long.result()
    finally:
        stop()
    mid = sorted(pairs, key=lambda p: p["ratio"])[len(pairs) // 2]
    return {**mid, "pairs": pairs, "tokens_per_request": tokens, "short_solo_s": min(short),
            "short_busy_s": max(busy), "short_latency_ratio": max(busy) / min(short)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--parts", default="rows,server", help="which parts to run: rows, server")
    ap.add_argument("--repeats", type=int, default=3, help="server: pairs of phases (one at a time, 8 at once)")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    out = {"machine": machine(), "settings": vars(a), "rows": {}}
    print(json.dumps(out["machine"]))
    tiny_model, tok = load("tiny")
    models = {"bench": load_bench_model("bench", mx.bfloat16), "tiny": tiny_model} if "rows" in a.parts else {}
    for name, m in models.items() if "rows" in a.parts else ():
        out["rows"][name] = []
        for b in rows:
            old, r = (rows_rate(m, tok, b, a.prompt, a.tokens, ahead) for ahead in (False, True))
            r["not_pipelined_tps"] = old["aggregate_tps"]
            out["rows"][name].append(r)
            print(f"{name:6s} rows {b}: aggregate {r['aggregate_tps']:7.1f} tok/s, per stream "
                  f"{r['per_stream_tps']:6.1f} tok/s; not pipelined {old['aggregate_tps']:7.1f} tok/s "
                  f"({r['aggregate_tps'] / old['aggregate_tps']:.2f}x)", flush=True)
    if "server" not in a.parts:
        return finish(out, a.json)
    s = out["server"] = server_bench(tiny_model, tok, a.tokens, a.repeats)
    for i, p in enumerate(s["pairs"]):
        print(f"server (tiny, --max-batch 8, {a.tokens} tokens per request), pair {i + 1}: one at a time "
              f"{p['sequential_tps']:.1f} tok/s, 8 at once {p['concurrent_tps']:.1f} tok/s, ratio {p['ratio']:.2f}x")
    print(f"server: median pair ratio {s['ratio']:.2f}x ({s['concurrent_tps']:.1f} against "
          f"{s['sequential_tps']:.1f} tok/s)")
    print(f"4-token request: alone {s['short_solo_s']:.3f} s, during a long generation {s['short_busy_s']:.3f} s "
          f"({s['short_latency_ratio']:.2f}x)")
    finish(out, a.json)


def finish(out: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    # as `mlx_dsv4 serve` does: skip interpreter teardown, where MLX's thread-local state of the
    # finished server threads aborted the process ("terminate called without an active exception")
    os._exit(0)
