"""Count the primitive operations in one decode step's graph, per layer type, before and after
mx.compile fusion. On Metal each primitive that computes is (about) one kernel launch, and
single-stream decode of this model is bound by launches, not bytes.

    python benchmarks/launch_count.py [--context 600] [-v]

The step is traced layer by layer (the cache's Python-side state is a trace-time constant), on
the tiny Flash-shaped model with mxfp4 routed and mxfp8 shared experts (as converted): counts
depend on the layer type, not on widths. View-only primitives (reshape, slice, broadcast,
transpose, ...) are not counted: Metal runs no kernel for them. A compressed layer does more work
on the step that completes one of its windows (every 4th token in CSA, every 128th in HCA), so
those steps are counted too and the per-token figure is the mean over a window cycle. Kernel
calls are counted through stand-ins, as Metal kernels cannot be traced where there is no Metal.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import sys
import tempfile

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import mlx.nn as nn  # noqa: E402
from mlx_lm.models.switch_layers import SwitchLinear  # noqa: E402
from tinymodels import mlx_model, tokens  # noqa: E402

from mlx_dsv4.cache import LayerCache  # noqa: E402
from mlx_dsv4.kernels import registry  # noqa: E402
from mlx_dsv4.kvstore import Rows  # noqa: E402

NAMES = {0: "sliding (ratio 0)", 4: "CSA (ratio 4)", 128: "HCA (ratio 128)"}
FLASH = {0: 2, 4: 21, 128: 20}  # layers of each type in V4-Flash

VIEWS = {"Reshape", "Slice", "Broadcast", "Squeeze", "ExpandDims", "Transpose", "AsStrided", "StopGradient",
         "Copy", "Depends", "Flatten", "Unflatten", "View float32", "View uint32", "View uint8", "View bfloat16",
         "View float16", "View int32"}


def _count(outputs) -> collections.Counter:
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *outputs)
        labels = re.findall(r'label ="([^"]+)", shape=rectangle', open(f.name).read())
    return collections.Counter(labels)


def layer_step_counts(block, cache: LayerCache, X, tok, qat) -> tuple[collections.Counter, collections.Counter]:
    with _full_capacity():  # row stores keep their spare capacity through the state round trip
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
    return _counted(step, X, tok, *arrays), _counted(mx.compile(step), X, tok, *arrays)


@contextlib.contextmanager
def _full_capacity():
    """Rows.arrays() trims stores to their rows; a live cache appends into spare capacity instead
    (it grows by 256 rows at a time), so the traced step must not pay a reallocation per append."""
    trim = Rows.arrays
    Rows.arrays = lambda self: {"kind": self.kind, "n": self.n, **self.parts}
    try:
        yield
    finally:
        Rows.arrays = trim


_KERNEL_CALLS = collections.Counter()


def _counted(fn, *args) -> collections.Counter:
    _KERNEL_CALLS.clear()
    c = _count(fn(*args))
    c["CustomKernel"] += sum(_KERNEL_CALLS.values())  # traced once, also under mx.compile
    return c


class _StandIn:
    """Takes a kernel's place when counting: one launch is one node, as a real kernel is (one primitive whose
    outputs are its siblings): a Depends of evaluated zeros of the declared shapes on every input, so nothing
    upstream is pruned and no other node is added."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *, inputs, output_shapes, output_dtypes, **_):
        _KERNEL_CALLS[self.name] += 1
        outs = [registry.placeholder(tuple(s), d) for s, d in zip(output_shapes, output_dtypes)]
        return mx.depends(outs, list(inputs))


@contextlib.contextmanager
def kernels_counted():
    """The dispatch takes the kernel paths (as on Metal), each launch a stand-in."""
    saved = registry.metal_available, registry.get_kernel
    registry.metal_available, registry.get_kernel = (lambda: True), _StandIn
    try:
        yield
    finally:
        registry.metal_available, registry.get_kernel = saved


def count_layers(m, context: int) -> dict:
    """{ratio: (eager, compiled)} primitive counts of the decode step at position `context`."""
    cache = m.make_cache()
    toks = mx.array(tokens(context + 1))
    X = m.hidden_streams(toks[:, :context], cache)
    mx.eval(X, [c.state for c in cache])
    e = m.embed(toks[:, context:])
    X = mx.broadcast_to(e[:, :, None, :], (1, 1, m.args.hc_mult, e.shape[-1]))
    seen = {}
    for i, (layer, c) in enumerate(zip(m.layers, cache)):
        if m.args.ratio(i) not in seen:
            seen[m.args.ratio(i)] = layer_step_counts(layer, c, X, toks[:, context:], m.simulate_qat)
    return seen


def _launches(c: collections.Counter) -> int:
    return sum(v for k, v in c.items() if k not in VIEWS)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=600, help="tokens already in the cache (rounded to 128 k + 88)")
    p.add_argument("-v", "--verbose", action="store_true", help="list the primitives left with the kernels")
    a = p.parse_args(argv)
    m = mlx_model("flash", simulate_qat=True)
    # Routed experts in the checkpoint's mxfp4 and shared experts in its mxfp8, the formats the expert kernels read.
    nn.quantize(m, class_predicate=lambda _p, mod: isinstance(mod, SwitchLinear), group_size=32, bits=4,
                mode="mxfp4")
    nn.quantize(m, class_predicate=lambda p, mod: "shared_experts" in p and isinstance(mod, nn.Linear),
                group_size=32, bits=8, mode="mxfp8")
    plain = a.context // 128 * 128 + 88  # completes no window; +3: a CSA window, +39: an HCA one too
    steps = {"plain": plain, "csa": plain + 3, "hca": plain + 39}
    before = {k: count_layers(m, c) for k, c in steps.items()}
    with kernels_counted():
        after = {k: count_layers(m, c) for k, c in steps.items()}
    print(f"decode step at context ~{plain}, device {mx.default_device()}, MLX {mx.__version__}: primitives that "
          f"launch a kernel (views excluded); 'window' = the step completing a compressor window")
    print("| layer type | reference, eager | reference, compiled | kernels, eager | kernels, compiled "
          "| kernels, compiled, window step | kernels, mean per token | custom kernels |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    totals, means = collections.Counter(), {}
    for r in sorted(before["plain"]):
        (be, bc), (ke, kc) = before["plain"][r], after["plain"][r]
        win = _launches(after["csa" if r == 4 else "hca"][r][1])
        mean = _launches(kc) + (win - _launches(kc)) / r if r else _launches(kc)
        print(f"| {NAMES[r]} | {_launches(be)} | {_launches(bc)} | {_launches(ke)} | {_launches(kc)} | "
              f"{win if r else '-'} | {mean:.1f} | {kc['CustomKernel']} |")
        ref_win = _launches(before["csa" if r == 4 else "hca"][r][1])
        totals["ref"] += FLASH[r] * (_launches(bc) + (ref_win - _launches(bc)) / max(r, 1))
        totals["ker"] += FLASH[r] * mean
        means[r] = (_launches(bc), mean)
    print(f"Flash schedule (2 sliding + 21 CSA + 20 HCA), mean launches per token after mx.compile: "
          f"reference {totals['ref']:.0f}, kernels {totals['ker']:.0f}")
    if a.verbose:
        for r in sorted(after["plain"]):
            left = {k: v for k, v in after["plain"][r][1].items() if k not in VIEWS}
            print(NAMES[r], "with kernels, compiled:", dict(collections.Counter(left).most_common(40)))
    return means


if __name__ == "__main__":
    main()
