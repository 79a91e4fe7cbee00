"""The compiled decode step (compiled_step.py over ring_cache.py) against plain decoding.

Truths: the LayerCache it was made from (the ring form round-trips bit for bit), and plain decoding's
tokens, log-probabilities and caches. Tolerance for the last two: the ring path attends over every row of
its fixed-size buffers with the invisible ones masked (exact zeros), and the CSA layers over a top-k of the
whole capacity, so the same fp32 terms are summed in another order and over padded lengths: ~1e-7 relative
per layer, ~2e-6 measured on the log-probabilities of 300 tokens. 1e-5 leaves room for that and is far
below what a wrong row or position moves (the negative control: > 1e-2). With the trained-format
simulation on, a value within ~1e-7 of an FP8 rounding boundary may land on the other neighbour (seen:
one of 8,192 window values, 6e-5 of the largest), which moves what follows by up to ~1e-4
(tests/test_kernel_model.py measured 1.7e-4): there the bound is 1e-3.
"""

import mlx.core as mx
import numpy as np
import pytest
from kernel_util import benchmark
from mlx.utils import tree_flatten
from tinymodels import flat_state, mlx_model, tokens

from mlx_dsv4 import compiled_step, ring_cache
from mlx_dsv4.generate import stream_generate
from mlx_dsv4.compiled_step import CompiledDecode
from mlx_dsv4.kernels import registry
from mlx_dsv4.load import load
from mlx_dsv4.kvstore import Rows
from mlx_dsv4.ring_cache import RingCache

TOL, TOL_SIM = 1e-5, 1e-3
PROMPT = "<｜begin▁of▁sentence｜><｜User｜>Tell me a story about a dragon.<｜Assistant｜></think>"


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random")


def prefilled(model, n: int, batch: int = 1):
    cache = model.make_cache()
    if n:
        model(mx.array(tokens(n, batch)), cache)
        mx.eval([c.state for c in cache])
    return cache


def same_state(a: dict, b: dict, tol: float = 0.0) -> list[str]:
    """Keys whose values differ (arrays: by more than tol of their largest magnitude). With tol, an FP8 store's
    codes may differ by one step (a value at a rounding boundary, see the module docstring) in at most one of
    1,000 entries (and at least one entry; OpenBLAS on an AMD EPYC VM flipped one of 4,320 codes)."""
    assert a.keys() == b.keys()
    bad = []
    for k in a:
        x, y = a[k], b[k]
        if not isinstance(x, np.ndarray):
            ok = x == y
        elif x.shape != y.shape or x.dtype != y.dtype:
            ok = False
        elif tol and x.dtype.kind == "f":
            ok = np.abs(x.astype(np.float64) - y).max(initial=0) <= tol * max(1.0, np.abs(x).max(initial=0))
        elif tol and k.endswith(".codes"):
            d = np.abs(x.astype(np.int64) - y)
            ok = d.max(initial=0) <= 1 and (d > 0).sum() <= max(1, x.size // 1000)
        else:
            ok = np.array_equal(x, y)
        if not ok:
            bad.append(k)
    return bad


@pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])
@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 127, 128, 129, 131, 260])
def test_ring_form_round_trips_bit_for_bit(compact, n):
    """Tiny Flash schedule [0, 0, 4, 128, 4]: offsets around the CSA / HCA window ends and the 128-row window."""
    model = mlx_model("flash", simulate_qat=compact)
    cache = prefilled(model, n)
    a = model.args
    back = [type(c)(c.ratio, c.window_size) for c in cache]
    for c, b in zip(cache, back):
        RingCache.from_layer(c, 512, mx.float32, a.head_dim, a.index_head_dim).to_layer(b, n, n)
    assert same_state(flat_state(cache), flat_state(back)) == []


def test_ring_form_refuses_what_it_cannot_hold():
    model = mlx_model("flash")
    c = prefilled(model, 300)[3]
    a = model.args
    with pytest.raises(ValueError, match="below the 300 tokens"):
        RingCache.from_layer(c, 256, mx.float32, a.head_dim, a.index_head_dim)
    with pytest.raises(ValueError, match="not a multiple of the ratio"):
        RingCache.from_layer(c, 500, mx.float32, a.head_dim, a.index_head_dim)
    r = RingCache.from_layer(c, 512, mx.float32, a.head_dim, a.index_head_dim)
    with pytest.raises(ValueError, match="cannot go back"):
        r.to_layer(type(c)(c.ratio, c.window_size), 300 - ring_cache.SPARE - 1, 300)


def stream(model, tok, compiled: str, monkeypatch, **kw):
    monkeypatch.setenv(compiled_step.ENV, compiled)
    cache = model.make_cache()
    return list(stream_generate(model, tok, PROMPT, prompt_cache=cache, **kw)), cache


@pytest.mark.parametrize("kw", [
    dict(max_tokens=300, stop=["\x00never\x00"]),  # past the 128-row window and the first HCA entry
    dict(max_tokens=40, temperature=0.8, top_k=40, seed=3),  # sampling: the same draws
    dict(max_tokens=12, stop_at=9),  # a stop string: the step fed ahead is dropped
])
def test_same_tokens_log_probs_and_caches_as_plain_decoding(tiny, monkeypatch, kw):
    model, tok = tiny
    kw = dict(kw)
    if "stop_at" in kw:  # the text of two tokens the plain stream emits at position stop_at
        plain, _ = stream(model, tok, "0", monkeypatch, max_tokens=kw["max_tokens"])
        kw["stop"] = [tok.decode([r.token for r in plain[kw.pop("stop_at") :][:2]])]
    old, old_cache = stream(model, tok, "0", monkeypatch, **kw)
    new, new_cache = stream(model, tok, "1", monkeypatch, **kw)
    assert [r.token for r in new] == [r.token for r in old]
    assert old[-1].finish_reason == new[-1].finish_reason
    lp = [(a.logprob, b.logprob) for a, b in zip(old, new) if a.logprob is not None]
    tol = TOL_SIM if model.simulate_qat else TOL
    assert max(abs(a - b) for a, b in lp) <= tol
    assert new_cache[0].offset == old_cache[0].offset == len(tok.encode(PROMPT, add_special_tokens=False)) + len(
        new) - 1 - (new[-1].token is None)
    assert same_state(flat_state(old_cache), flat_state(new_cache), tol) == []


def decode(model, cache, steps: int, compiled=None):
    """Logits [steps, B, V] of feeding fixed tokens (a near-tie can flip a greedy choice, and then two
    sequences part), through CompiledDecode (compiled: True / False) or the model itself."""
    cd = None if compiled is None else CompiledDecode(model, cache, 1, compiled)
    feed, out = tokens(steps, cache[0].window.shape[0], seed=7), []
    for i in range(steps):
        t = mx.array(feed[:, i : i + 1])
        y = model(t, cache=cache, last_only=True)[:, -1] if cd is None else cd(t)
        mx.eval(y, cd.arrays if cd else [c.state for c in cache])
        out.append(np.array(y))
    if cd is not None:
        cd.write_back(cache)
    return np.stack(out)


@pytest.mark.parametrize("simulate", [False, True], ids=["sim_off", "sim_on"])
def test_capacity_grows_and_batch_rows_share_the_position(simulate, monkeypatch):
    """Made for 1 step, run for 150 past the 128-row window and the first HCA entry (capacity 128 -> 384 on a
    ladder from 128: traced again), batch of 2."""
    monkeypatch.setattr(compiled_step, "SMALLEST", 128)
    model = mlx_model("flash", simulate_qat=simulate)
    tol = TOL_SIM if simulate else TOL
    ref_cache, cache = prefilled(model, 30, batch=2), prefilled(model, 30, batch=2)
    ref, got = decode(model, ref_cache, 150), decode(model, cache, 150, compiled=True)
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
    assert same_state(flat_state(ref_cache), flat_state(cache), tol) == []


def test_a_wrong_position_is_caught(monkeypatch):
    """Negative control: the ring path fed one position too far (every RoPE angle and mask shifts by one)."""
    model = mlx_model("flash")
    ref = decode(model, prefilled(model, 140), 6)
    monkeypatch.setattr(RingCache, "with_arrays", lambda self, a, pos, f=RingCache.with_arrays: f(self, a, pos + 1))
    got = decode(model, prefilled(model, 140), 6, compiled=False)
    assert np.abs(got - ref).max() > 1e-2 * np.abs(ref).max()


def test_a_step_told_the_wrong_windows_end_is_caught(monkeypatch):
    """Negative control for the traces' specialisation: steps told their windows end one position late write
    each entry from the next window's first row and the one before, after a query has already seen its empty
    row: 100x the tolerance the right steps keep (1e-5) at the least."""
    model = mlx_model("flash")
    ref = decode(model, prefilled(model, 140), 12)
    monkeypatch.setattr(compiled_step, "ends", lambda rings, pos, f=compiled_step.ends: f(rings, pos - 1))
    got = decode(model, prefilled(model, 140), 12, compiled=False)
    assert np.abs(got - ref).max() > 100 * TOL * np.abs(ref).max()


def test_one_trace_per_kind_of_step_and_no_evaluation_inside(monkeypatch):
    """The step's graph depends on the position only through the windows it completes: 20 steps from position
    40 (every 4th ends a CSA window, none an HCA one) replay two traces (a Python position would retrace each
    step, or replay a stale one). Nothing in a step evaluates: step 2's graph still holds step 1's argmax."""
    model = mlx_model("flash")
    traced = []
    step = compiled_step._step

    def counting(m, rings, ended):
        f = step(m, rings, ended)
        return lambda *a: (traced.append(ended), f(*a))[1]

    monkeypatch.setattr(compiled_step, "_step", counting)
    compiled_step._TRACES.clear()
    decode(model, prefilled(model, 40), 20, compiled=True)
    assert sorted(traced) == [(), (4,)]
    cd = CompiledDecode(model, prefilled(model, 40), 4)
    y1 = cd(mx.array(tokens(1)))
    y2 = cd(mx.argmax(y1, axis=-1)[:, None])
    assert _argmax_nodes(y2) == 1  # step 1's argmax, still lazy under step 2


def _kernel_step_nodes(model, cache) -> int:
    """Graph nodes (views included: each is replayed) of one compiled decode step with kernel dispatch, each
    launch one node as a Metal kernel is (benchmarks/launch_count.py's stand-ins)."""
    lc = benchmark("launch_count")
    with lc.kernels_counted():
        compiled_step._TRACES.clear()  # a fresh trace of what the code builds now
        cd = CompiledDecode(model, [c.copy() for c in cache], 4)
        mx.eval(cd.arrays)  # the rings' own making is no part of a step
        y = cd(mx.array(tokens(1)))
        outs = [y] + [v for a in cd.arrays for _, v in tree_flatten(a)]
        return sum(lc._count(outs).values())


@pytest.mark.parametrize("n, bound", [(40, 385), (127, 449)], ids=["no_window_ends", "all_windows_end"])
def test_the_kernel_step_replays_few_nodes(monkeypatch, n, bound):
    """A count, not a timing: replaying the compiled step costs host time per node (README "Host time per
    decode step"), so its node count is guarded, for the step that completes no window (3 of 4 steps) and the
    one that completes the CSA and HCA windows. 377 / 440 on the 5-layer tiny Flash with MLX 0.32 (a new MLX
    may move them: re-measure then); the bounds leave 2%. Negative control: position vectors built from a
    fresh constant per launch (as before) are nodes mx.compile cannot merge, and the bound catches them."""
    model = mlx_model("flash", simulate_qat=True)
    cache = prefilled(model, n)
    assert _kernel_step_nodes(model, cache) <= bound

    def unshared(*values):
        return mx.concatenate([v.reshape(1) if isinstance(v, mx.array) else mx.array([v], mx.int32) for v in values])

    monkeypatch.setattr(registry, "int_inputs", unshared)
    assert _kernel_step_nodes(model, cache) > bound


def test_weights_the_prefill_left_lazy_are_no_part_of_the_step(monkeypatch):
    """Weights load lazily (and nn.quantize quantizes lazily): those the prefill did not read (here the
    indexers', whose top-k of 16 covers the 10 entries of a 40-token prompt) must be evaluated before the
    trace, or the step replays the graph that makes them at every token (re-reading or re-quantizing them).
    Truth: the step's node count with every weight evaluated first. Negative control: without the evaluation
    the step holds more nodes."""
    import mlx.nn as nn

    def lazy_model():
        m = mlx_model("flash", simulate_qat=True)
        mx.eval(m.parameters())
        nn.quantize(m, group_size=32, bits=8, mode="mxfp8",
                    class_predicate=lambda _p, mod: isinstance(mod, nn.Linear) and mod.weight.shape[-1] % 32 == 0)
        return m

    model = lazy_model()
    cache = prefilled(model, 40)
    lazy = _kernel_step_nodes(model, cache)
    assert lazy == _kernel_step_nodes(model, cache)  # now that every weight is evaluated, whatever did it
    monkeypatch.setattr(compiled_step, "_evaluate_weights", lambda params: None)
    model = lazy_model()
    assert _kernel_step_nodes(model, prefilled(model, 40)) > lazy


def test_a_bf16_ring_reads_its_fp4_keys_in_place(monkeypatch):
    """With kernel dispatch the ring's FP4 indexer keys go to the indexer_score kernel, read in place as a
    LayerCache's are: the ring's store keeps the decoded dtype (bf16) the kernel requires, where one made
    anew from the arrays would decode to float32 and send every CSA layer to the reference's ~40 ops of FP4
    decoding and scoring. Negative control: a store made anew."""
    model = mlx_model("flash", simulate_qat=True, dtype=mx.bfloat16)
    csa = sum(layer.attn.ratio == 4 for layer in model.layers)
    lc = benchmark("launch_count")

    def launches():
        with lc.kernels_counted():
            cd = CompiledDecode(model, prefilled(model, 40), 4, compiled=False)
            lc._KERNEL_CALLS.clear()
            mx.eval(cd(mx.array(tokens(1))))
            return lc._KERNEL_CALLS["indexer_score"]

    assert csa and launches() == csa
    def made_anew(self, name):
        like, parts = self.stores[name], self.arrays[name]
        n = next(iter(parts.values())).shape[1]
        return Rows.from_arrays({"kind": like.kind, "n": n, **parts}, nope=getattr(like, "nope", None))

    monkeypatch.setattr(RingCache, "store", made_anew)
    assert launches() == 0


def test_a_model_given_new_weights_is_traced_anew():
    """A trace holds the weight arrays it was made with: after model.update the step must use the new ones."""
    model = mlx_model("flash")
    decode(model, prefilled(model, 20), 3, compiled=True)
    model.update({"head": {"weight": model.head.weight * 2}})
    ref = decode(model, prefilled(model, 20), 3)
    got = decode(model, prefilled(model, 20), 3, compiled=True)
    assert np.abs(got - ref).max() <= TOL * np.abs(ref).max()


def _argmax_nodes(y) -> int:
    import tempfile
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, y)
        return open(f.name).read().count('label ="ArgReduce"')


def test_the_default_follows_the_kernels_and_the_switch(monkeypatch):
    model = mlx_model("flash")
    cache = model.make_cache()
    monkeypatch.delenv(compiled_step.ENV, raising=False)
    monkeypatch.delenv(registry.REFERENCE_ENV, raising=False)
    assert not compiled_step.wanted(model, cache)  # the CPU's reference path: eager (see compiled_step.py)
    monkeypatch.setattr(registry, "metal_available", lambda: True)
    assert compiled_step.wanted(model, cache)  # where the kernels run
    monkeypatch.setenv(compiled_step.ENV, "0")
    assert not compiled_step.wanted(model, cache)
    monkeypatch.setenv(compiled_step.ENV, "1")
    assert compiled_step.wanted(model, cache)
    monkeypatch.setattr(type(model), "evaluates_inside", property(lambda self: True))  # streamed experts, ranks
    assert not compiled_step.wanted(model, cache)


def test_capacity_ladder():
    """Capacities come from one ladder (shared traces), hold the next steps, stay within the context."""
    model = mlx_model("flash")
    cd = CompiledDecode(model, prefilled(model, 3), 1, compiled=False)

    def room(pos, tokens):
        cd.pos = pos
        return cd._room(tokens)

    assert [room(0, 256), room(100, 256), room(4000, 256), room(5000, 10**5)] == [4096, 4096, 6144, 12288]
    assert room(100_000, 1000) == room(100_000, 10**9) == 131072  # at most a quarter of the context at a time
    ctx = model.args.max_position_embeddings
    assert room(ctx - 10, 100) == -(-(ctx + 2) // 256) * 256


def _address(a: mx.array) -> int:
    return np.asarray(a).__array_interface__["data"][0]  # a view on the CPU buffer (released right away)


@pytest.mark.parametrize("hold", [False, True], ids=["dropped", "held (negative control)"])
def test_the_buffers_are_updated_in_place(hold):
    """MLX donates a compiled step's input buffer to its output when nothing else holds it, as CompiledDecode
    leaves it: a step then writes its new rows into the buffers instead of copying each (a 1M-token cache's
    stores are GBs). The control keeps a reference, which forces the copy the check must see. The step checked
    (position 43) ends a CSA window, as the one at 35 (its trace) and at 39 (a replay) did."""
    model = mlx_model("flash", simulate_qat=True)
    cd = CompiledDecode(model, prefilled(model, 35), 12)
    for _ in range(8):
        mx.eval(cd(mx.array(tokens(1))), cd.arrays)
    before = {k: _address(v) for k, v in cd.rings[2].arrays["comp"].items()}  # a CSA layer's entry store
    kept = dict(cd.rings[2].arrays["comp"]) if hold else None
    mx.eval(cd(mx.array(tokens(1))), cd.arrays)
    after = {k: _address(v) for k, v in cd.rings[2].arrays["comp"].items()}
    assert (after == before) != hold, (before, after, kept is None)


@pytest.mark.parametrize("fail_at", [0, 5], ids=["first step", "fifth step"])
def test_a_default_compiled_step_that_fails_gives_way_to_the_eager_one(tiny, monkeypatch, caplog, fail_at):
    """Where it is the default (Metal, untested there), a step that cannot be traced must not end the stream:
    decoding goes on eagerly from the state reached, says so once, and leaves what plain decoding leaves.
    Asked for (MLX_DSV4_COMPILE=1), the failure is an error."""
    model, tok = tiny
    plain, _ = stream(model, tok, "0", monkeypatch, max_tokens=12)
    stop = [tok.decode([r.token for r in plain[8:10]])]  # ends with a step fed ahead, which close() drops
    old, old_cache = stream(model, tok, "0", monkeypatch, max_tokens=12, stop=stop)
    calls = []
    real = compiled_step._traced

    def failing(m, rings, ended):
        f = real(m, rings, ended)

        def step(*a):
            calls.append(1)
            if len(calls) > fail_at:
                raise RuntimeError("cannot trace this here\nsecond line")
            return f(*a)
        return step

    monkeypatch.setattr(compiled_step, "_traced", failing)
    monkeypatch.setattr(compiled_step, "wanted", lambda m, c: True)
    monkeypatch.delenv(compiled_step.ENV, raising=False)
    cache = model.make_cache()
    with caplog.at_level("WARNING", logger="mlx_dsv4"):
        new = list(stream_generate(model, tok, PROMPT, prompt_cache=cache, max_tokens=12, stop=stop))
    assert [r.token for r in new] == [r.token for r in old] and new[-1].finish_reason == "stop"
    assert len(calls) == fail_at + 1
    assert [r.getMessage() for r in caplog.records if "compiled decode step failed" in r.getMessage()] == [
        "note: the compiled decode step failed (RuntimeError: cannot trace this here); decoding eagerly "
        "(MLX_DSV4_COMPILE=0 skips it, =1 makes this an error)"]
    tol = TOL_SIM if model.simulate_qat else TOL
    assert same_state(flat_state(old_cache), flat_state(cache), tol) == []
    calls.clear()
    monkeypatch.setenv(compiled_step.ENV, "1")
    with pytest.raises(RuntimeError, match="cannot trace this here"):
        list(stream_generate(model, tok, PROMPT, max_tokens=12))
