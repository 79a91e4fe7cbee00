"""Count the primitive operations in one decode step's graph, per layer type, before and after
mx.compile fusion. On Metal each primitive that computes is (about) one kernel launch, and
single-stream decode of this model is bound by launches, not bytes.

    python benchmarks/launch_count.py [--context 600]

The step is traced layer by layer (the cache's Python-side state is a trace-time constant), on
the tiny Flash-shaped model: counts depend on the layer type, not on widths. View-only primitives
(reshape, slice, broadcast, transpose, ...) are listed apart: Metal runs no kernel for most.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from mlx_dsv4.cache import LayerCache  # noqa: E402

VIEWS = {"Reshape", "Slice", "Broadcast", "Squeeze", "ExpandDims", "Transpose", "AsStrided", "StopGradient",
         "Copy", "Depends"}


def _count(outputs) -> collections.Counter:
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *outputs)
        labels = re.findall(r'label ="([^"]+)", shape=rectangle', open(f.name).read())
    return collections.Counter(labels)


def layer_step_counts(block, cache: LayerCache, X, tok, qat) -> tuple[collections.Counter, collections.Counter]:
    state = cache.state
    flat = tree_flatten(state)
    idx = [i for i, (_, v) in enumerate(flat) if isinstance(v, mx.array)]

    def step(X, tok, *arrays):
        leaves = list(flat)
        for i, a in zip(idx, arrays):
            leaves[i] = (leaves[i][0], a)
        c = LayerCache.from_state(tree_unflatten(leaves))
        Y = block(X, tok, c, qat)
        return [Y] + [v for _, v in tree_flatten(c.state) if isinstance(v, mx.array)]

    arrays = [flat[i][1] for i in idx]
    eager = _count(step(X, tok, *arrays))
    fused = _count(mx.compile(step)(X, tok, *arrays))
    return eager, fused


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=600, help="tokens already in the cache")
    a = p.parse_args(argv)
    from tinymodels import mlx_model, tokens

    m = mlx_model("flash", simulate_qat=True)
    cache = m.make_cache()
    toks = mx.array(tokens(a.context + 1))
    X = m.hidden_streams(toks[:, : a.context], cache)
    mx.eval(X, [c.state for c in cache])
    e = m.embed(toks[:, a.context :])
    X = mx.broadcast_to(e[:, :, None, :], (1, 1, m.args.hc_mult, e.shape[-1]))
    names = {0: "sliding (ratio 0)", 4: "CSA (ratio 4)", 128: "HCA (ratio 128)"}
    seen = {}
    for i, (layer, c) in enumerate(zip(m.layers, cache)):
        r = m.args.ratio(i)
        if r in seen:
            continue
        eager, fused = layer_step_counts(layer, c, X, toks[:, a.context :], m.qat)
        seen[r] = (eager, fused)
    print(f"decode step at context {a.context}, device {mx.default_device()}, MLX {mx.__version__}")
    print("| layer type | primitives | of which views | after mx.compile | of which views |")
    print("|---|---:|---:|---:|---:|")
    flash = {0: 2, 4: 21, 128: 20}
    total_e = total_f = 0
    for r, (eager, fused) in sorted(seen.items()):
        ev = sum(v for k, v in eager.items() if k in VIEWS)
        fv = sum(v for k, v in fused.items() if k in VIEWS)
        print(f"| {names[r]} | {sum(eager.values())} | {ev} | {sum(fused.values())} | {fv} |")
        total_e += flash[r] * (sum(eager.values()) - ev)
        total_f += flash[r] * (sum(fused.values()) - fv)
    print(f"Flash schedule (2 sliding + 21 CSA + 20 HCA), non-view primitives per token: "
          f"{total_e} eager, {total_f} after mx.compile")
    if "-v" in sys.argv or os.environ.get("VERBOSE"):
        for r, (eager, fused) in sorted(seen.items()):
            print(names[r], "compiled:", dict(fused.most_common(12)))
    return seen


if __name__ == "__main__":
    main()
