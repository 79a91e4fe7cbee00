"""Host time per decode step, and what pipelining (building step n + 1 while step n computes) buys.

    python benchmarks/host_overhead.py [--contexts 512 2048] [--steps 8] [--rounds 3] [--as-converted]

Model: the bench model (mlx_dsv4.tiny.bench_hf_config: V4-Flash's 43-layer schedule, 2 sliding +
21 CSA + 20 HCA layers in Flash's order, 3 hash-routed layers, Flash's head and indexer geometry, at
small widths) with the trained-format simulation on, as users run it; float32 on the CPU.

Per decode step it reports
- host ms: building the step's graph in Python (model call + log-softmax + sampler), nothing evaluated;
- eval ms: mx.eval of that graph (the CPU's compute, plus MLX's own scheduling);
- wall ms per token of four loops, in alternating rounds from the same prefilled cache, so a machine
  shared with other work slows all alike (ratios are per round, then the median):
  previous: the loop before this work (PlainDecoder(ahead=False): build, evaluate, read, repeat, with
    the fused reference pieces off: MLX_DSV4_FUSE=0, kernels/fuse.py). It already has this version's
    other graph savings (shared RoPE tables, masks every query passes left out, RoPE in fewer nodes, no
    indexer scoring when the top-k covers every entry), so ratios against it understate the change;
  not pipelined: fused pieces, build / evaluate / read;
  async_eval: pipelined as mlx-lm does (the next step submitted with mx.async_eval before the read);
  now: pipelined through evaluator.Evaluator's worker thread, the default on the CPU;
  compiled: as now, each step one compiled graph over ring caches (compiled_step.py; the default where the
    kernels run, forced here);
- graph nodes of one step with the fused pieces off and on (views included: each is scheduled);
- host ms with kernel dispatch (what a Mac builds): each kernel call is a stand-in (one node), as in
  benchmarks/launch_count.py, since Metal kernels cannot run here; graph nodes counted both ways.
- the compiled step's host ms (calling it: its graph replayed, nothing evaluated) and eval ms, on the
  reference path and with kernel dispatch (stand-ins), and its graph nodes (views included) both ways.
All loops must emit the same tokens: the script checks it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchLinear

sys.path.insert(0, os.path.dirname(__file__))

from launch_count import VIEWS, _count, kernels_counted  # noqa: E402

from mlx_dsv4 import evaluator  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_dsv4.bench import load_bench_model, loaded_blas, machine  # noqa: E402
from mlx_dsv4.compiled_step import CompiledDecode  # noqa: E402
from mlx_dsv4.generate import PlainDecoder  # noqa: E402
from mlx_dsv4.kernels import fuse  # noqa: E402


def greedy(logprobs):
    return mx.argmax(logprobs, axis=-1)


def snapshot(cache):
    return [c.copy() for c in cache]


def build(model, cache, tok):
    """One decode step's graph, as PlainDecoder builds it (no processors, greedy)."""
    logits = model(tok, cache=cache, last_only=True)[:, -1, :]
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return greedy(logprobs), logprobs[0]


def split_times(model, cache, first: int, steps: int) -> tuple[list[float], list[float], list[int]]:
    """(host ms, eval ms, tokens) per step, synchronously: build, then evaluate."""
    host, ev, toks, tok = [], [], [], mx.array([[first]])
    for _ in range(steps):
        t0 = time.perf_counter()
        y, lp = build(model, cache, tok)
        t1 = time.perf_counter()
        mx.eval(y, lp, [c.state for c in cache])
        t2 = time.perf_counter()
        host.append(1e3 * (t1 - t0))
        ev.append(1e3 * (t2 - t1))
        toks.append(y.item())
        tok = mx.array([[toks[-1]]])
    return host, ev, toks


LOOPS = {  # name: (fused pieces, pipelined, evaluator thread, compiled step)
    "previous": (False, False, False, False),  # the loop before this work: build, evaluate, read, repeat
    "not pipelined": (True, False, False, False),
    "async_eval": (True, True, False, False),  # pipelined as mlx-lm does it
    "now": (True, True, True, False),  # pipelined through the evaluator thread (the default on the CPU)
    "compiled": (True, True, True, True),  # and each step one compiled graph (the default on Metal)
}


def decode(model, cache, first: int, steps: int, loop: str) -> tuple[float, list[int]]:
    """Wall ms per token and the tokens, through the generation loop's own decoder."""
    fused, ahead, thread, compiled = LOOPS[loop]
    fuse.set_enabled(fused)
    evaluator.set_enabled(thread)
    dec = PlainDecoder(model, cache, greedy, [], None, ahead=ahead, compiled=compiled)
    last, toks = first, []
    t0 = time.perf_counter()
    for n in range(steps):
        (e,) = dec.next_round(last, steps - n)
        dec.commit(1)
        last = e.token
        toks.append(last)
    dec.close()
    ms = 1e3 * (time.perf_counter() - t0) / steps
    fuse.set_enabled(True)
    evaluator.set_enabled(True)
    return ms, toks


def kernel_host(model, cache, first: int, steps: int) -> tuple[list[float], int, int]:
    """Host ms per step with kernel dispatch (stand-ins), and graph nodes (non-view) with / without."""
    ref = _nodes(build(model, snapshot(cache), mx.array([[first]])))
    host = []
    with kernels_counted():
        c = snapshot(cache)
        for _ in range(steps):
            t0 = time.perf_counter()
            out = build(model, c, mx.array([[first]]))
            host.append(1e3 * (time.perf_counter() - t0))
            mx.eval(out, [x.state for x in c])  # stand-ins evaluate to zeros: only the host time matters
        ker = _nodes(build(model, snapshot(cache), mx.array([[first]])))
    return host, ref, ker


def compiled_times(model, cache, first: int, steps: int, kernels: bool) -> tuple[list[float], list[float], tuple]:
    """(host ms, eval ms) per step of the compiled step (traced before timing), and its graph nodes (with views,
    without).
    kernels: with kernel dispatch (stand-ins; their eval time means nothing)."""
    with kernels_counted() if kernels else contextlib.nullcontext():
        cd = CompiledDecode(model, snapshot(cache), steps + 2)
        mx.eval(cd.arrays)
        tok = mx.array([[first]])
        for i in range(2):  # the trace, then one replay (counted)
            y = cd(tok)
            if i:
                outs = [y] + [v for a in cd.arrays for _, v in tree_flatten(a)]
                nodes = _nodes(outs, views=True), _nodes(outs)
            mx.eval(y, cd.arrays)
        host, ev = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            y = cd(tok)
            t1 = time.perf_counter()
            mx.eval(y, cd.arrays)
            host.append(1e3 * (t1 - t0))
            ev.append(1e3 * (time.perf_counter() - t1))
            tok = mx.argmax(y, axis=-1)[:, None]
    return host, ev, nodes


def _nodes(outs, views: bool = False) -> int:
    return sum(v for k, v in _count(list(outs)).items() if views or k not in VIEWS)


def step_nodes(model, cache, first: int, fused: bool) -> int:
    """Graph nodes of one decode step, views included."""
    fuse.set_enabled(fused)
    n = _nodes(build(model, snapshot(cache), mx.array([[first]])), views=True)
    fuse.set_enabled(True)
    return n


def prefilled(model, ctx: int) -> tuple[list, int]:
    """A cache holding `ctx` random tokens (chunks of 512), and the greedy token that follows."""
    toks = np.random.default_rng(0).integers(0, model.args.vocab_size, (1, ctx)).astype(np.int32)
    cache = model.make_cache()
    for s in range(0, ctx, 512):
        y = model(mx.array(toks[:, s : s + 512]), cache, last_only=True)
        mx.eval(y, [c.state for c in cache])
    return cache, int(mx.argmax(y[0, -1]).item())


def converted_host(contexts: list[int], steps: int) -> list[tuple]:
    """Host ms per step with kernel dispatch, eager and compiled, in the formats a converted checkpoint has."""
    model = load_bench_model("bench", mx.bfloat16, simulate_qat=True)
    nn.quantize(model, class_predicate=lambda _p, m: isinstance(m, SwitchLinear), group_size=32, bits=4, mode="mxfp4")
    nn.quantize(model, group_size=32, bits=8, mode="mxfp8",
                class_predicate=lambda p, m: (isinstance(m, nn.Linear) or p.endswith(".wo_a")) and p != "head"
                and m.weight.shape[-1] % 32 == 0)
    print(f"machine: {machine()}\nBLAS really loaded: {loaded_blas()}\nbench model as converted (bf16, routed experts "
          f"mxfp4, other projections mxfp8, head bf16), simulation on; medians of {steps} steps")
    rows = []
    for ctx in contexts:
        cache, first = prefilled(model, ctx)
        khost, _, nker = kernel_host(model, cache, first, steps)
        chost, _, cnodes = compiled_times(model, cache, first, steps, True)
        rows.append((ctx, statistics.median(khost), statistics.median(chost), nker, cnodes))
        print(f"context {ctx}: host ms with kernel dispatch, eager {rows[-1][1]:.1f} -> compiled {rows[-1][2]:.1f}; "
              f"nodes without views {nker} eager, {cnodes[1]} compiled ({cnodes[0]} with views)", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--steps", type=int, default=8, help="decode steps per loop per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating old / pipelined rounds per context")
    p.add_argument("--as-converted", action="store_true",
                   help="only the host ms with kernel dispatch, eager and compiled, of the bench model in bf16 with "
                        "the converter's formats (routed experts mxfp4, the other projections mxfp8)")
    a = p.parse_args(argv)
    if a.as_converted:
        return converted_host(a.contexts, a.steps)
    model = load_bench_model("bench", mx.float32, simulate_qat=True)
    print(f"machine: {machine()}")
    print(f"BLAS really loaded: {loaded_blas()}")
    print(f"bench model (Flash schedule, {model.args.n_layers} layers), float32, trained-format simulation on; "
          f"{a.steps} steps x {a.rounds} alternating rounds per loop")
    rows = []
    for ctx in a.contexts:
        cache, first = prefilled(model, ctx)
        split_times(model, snapshot(cache), first, 2)  # warm-up (allocations, compiled pieces)
        fuse.set_enabled(False)
        host_old, ev_old, _ = split_times(model, snapshot(cache), first, a.steps)
        fuse.set_enabled(True)
        host, ev, ref_toks = split_times(model, snapshot(cache), first, a.steps)
        decode(model, snapshot(cache), first, 2, "compiled")  # its trace (one per capacity), not timed
        wall, same = {k: [] for k in LOOPS}, True
        for _ in range(a.rounds):
            for k in LOOPS:
                ms, t = decode(model, snapshot(cache), first, a.steps, k)
                wall[k].append(ms)
                same &= t == ref_toks
        khost, nref, nker = kernel_host(model, cache, first, a.steps)
        n_old, n_new = step_nodes(model, cache, first, False), step_nodes(model, cache, first, True)
        chost, cev, cnodes = compiled_times(model, cache, first, a.steps, False)
        ckhost, _, cknodes = compiled_times(model, cache, first, a.steps, True)
        ratio = lambda a, b: statistics.median(x / y for x, y in zip(wall[a], wall[b]))  # noqa: E731
        r = dict(ctx=ctx, n_old=n_old, n_new=n_new, host_old=statistics.median(host_old),
                 eval_old=statistics.median(ev_old), host=statistics.median(host), eval=statistics.median(ev),
                 wall={k: statistics.median(v) for k, v in wall.items()}, speedup=ratio("previous", "now"),
                 overlap=ratio("async_eval", "now"), khost=statistics.median(khost), nref=nref, nker=nker, same=same,
                 chost=statistics.median(chost), cev=statistics.median(cev), ckhost=statistics.median(ckhost),
                 cnodes=cnodes, cknodes=cknodes, compiled=ratio("now", "compiled"))
        rows.append(r)
        print(f"context {ctx}: host {r['host_old']:.1f} -> {r['host']:.1f} ms, eval {r['eval_old']:.1f} -> "
              f"{r['eval']:.1f} ms (unfused -> fused), nodes {n_old} unfused / {n_new} fused; wall ms per token "
              f"per round: {({k: [round(x, 1) for x in v] for k, v in wall.items()})}; same tokens: {same}; compiled "
              f"step: host {r['chost']:.1f} ms (kernel dispatch {r['ckhost']:.1f}), eval {r['cev']:.1f} ms, nodes "
              f"{cnodes} ({cknodes} with kernels) with / without views", flush=True)
    print("\n| context | host build ms, unfused -> fused (reference) | host build ms (kernel dispatch) "
          "| graph nodes ref / kernels | step nodes unfused / fused | eval ms, unfused -> fused "
          + "".join(f"| wall ms/token, {k} " for k in LOOPS)
          + "| speed-up, now / previous | now / async_eval | same tokens |")
    print("|---:|---:|---:|---:|---:|---:|" + "---:|" * len(LOOPS) + "---:|---:|---|")
    rows_c = []
    for r in rows:
        print(f"| {r['ctx']:,} | {r['host_old']:.1f} -> {r['host']:.1f} | {r['khost']:.1f} | {r['nref']} / {r['nker']} "
              f"| {r['n_old']:,} / {r['n_new']:,} | {r['eval_old']:.1f} -> {r['eval']:.1f} "
              + "".join(f"| {r['wall'][k]:.1f} " for k in LOOPS)
              + f"| {r['speedup']:.2f}x | {r['overlap']:.2f}x | {r['same']} |")
        rows_c.append(f"| {r['ctx']:,} | {r['host']:.1f} -> {r['chost']:.1f} | {r['khost']:.1f} -> {r['ckhost']:.1f} "
                      f"| {r['n_new']:,} -> {r['cnodes'][0]:,} | {r['nker']:,} -> {r['cknodes'][1]:,} "
                      f"| {r['eval']:.1f} -> {r['cev']:.1f} | {r['wall']['now']:.1f} -> {r['wall']['compiled']:.1f} "
                      f"| {r['compiled']:.2f}x |")
    print("\n| context | host ms, reference: eager -> compiled | host ms, kernel dispatch: eager -> compiled "
          "| nodes, reference, views included | nodes, kernels, views excluded | eval ms, reference "
          "| wall ms/token, now -> compiled | compiled / now |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows_c))
    return rows


if __name__ == "__main__":
    main()
