"""MoE router: the reference vs a float64 numpy oracle, the Metal kernel (CPU harness) vs the reference
for hashed and top-k gates (N = 1 and N > 1, E = 8 and 256, k = 2 and 6, fp32 and bf16 x), ties,
dispatch, broken variants.

Ids are compared as sets (the order within a token is unspecified), each with its weight. Tolerance
on the weights, relative: 2 (d + 2) u max_e sum_i |x_i w_ei| + 32 u, u = 2^-24. Both sides sum the
same d fp32 products in different orders (each within (d + 2) u of the exact logit times that
magnitude); |ds/s| = sigmoid(z) / (2 softplus(z)) |dz| <= |dz| / 2 and a weight is a ratio of s
values, so its relative error is at most |dz| plus a few ulp of exp, log, sqrt and the k-term sum.
Test data keep the k-th and (k+1)-th s + bias apart by far more than the logit error, so the sets
must be equal; ties are tested separately (lowest index first in the kernel).
"""

import mlx.core as mx
import numpy as np
import pytest
from kernel_util import assert_caught, fake_metal, needs_cxx, variant

from mlx_dsv4.kernels import registry
from mlx_dsv4.kernels import moe_router as rt
from mlx_dsv4.kernels.registry import load_spec
from mlx_dsv4.kernels.sim import run_metal_kernel_on_cpu

SPEC = load_spec("moe_router")
SCALE = 1.5
U = 2.0**-24
VOCAB = 40


def _case(N, E, d, k, hashed, seed=0, dtype=mx.float32):
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((N, d)).astype(np.float32)).astype(dtype)
    w = mx.array((rng.standard_normal((E, d)) * 2 / np.sqrt(d)).astype(np.float32)).astype(dtype)
    if hashed:
        tab = np.stack([rng.permutation(E)[:k] for _ in range(VOCAB)]).astype(np.int32)
        return x, w, dict(tid2eid=mx.array(tab), tokens=mx.array(rng.integers(0, VOCAB, N).astype(np.int32)))
    return x, w, dict(bias=mx.array((rng.standard_normal(E) * 0.3).astype(np.float32)))


def _np(a):
    return np.array(a.astype(mx.float32), dtype=np.float64)


def _oracle(x, w, k, kw):
    """float64, explicit sort: (weights, ids, k-th minus (k+1)-th selection key or inf)."""
    s = np.sqrt(np.logaddexp(0.0, _np(x) @ _np(w).T))
    gap = np.inf
    if "tid2eid" in kw:
        ids = np.array(kw["tid2eid"])[np.array(kw["tokens"])]
    else:
        key = s + _np(kw["bias"])
        order = np.argsort(-key, axis=-1, kind="stable")
        ids = order[:, :k]
        if k < key.shape[1]:
            srt = np.take_along_axis(key, order, axis=-1)
            gap = float((srt[:, k - 1] - srt[:, k]).min())
    sel = np.take_along_axis(s, ids, axis=-1)
    return sel / sel.sum(axis=-1, keepdims=True) * SCALE, ids, gap


def _sets(w, ids):
    ids = np.asarray(ids).astype(np.int64)
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(np.asarray(w, np.float64), order, axis=-1), np.take_along_axis(ids, order, axis=-1)


def _rel_tol(x, w):
    mag = np.abs(_np(x)) @ np.abs(_np(w)).T  # [N, E]
    return 2 * (x.shape[1] + 2) * U * mag.max(axis=-1, keepdims=True) + 32 * U


def _ok(got, want, x, w) -> bool:
    (gw, gi), (ww, wi) = _sets(*got), _sets(*want)
    if gi.shape != wi.shape or not np.array_equal(gi, wi):
        return False
    return bool((np.abs(gw - ww) <= _rel_tol(x, w) * np.abs(ww)).all())


def _run(spec, x, w, k, kw):
    N, d = x.shape
    E = w.shape[0]
    hashed = "tid2eid" in kw
    grid, tg = rt._geometry(N, E, k, hashed)
    tokens = kw.get("tokens", kw.get("bias"))  # as the wrapper: not read by top-k routing
    ids, wts = run_metal_kernel_on_cpu(
        spec, [x, w, kw["tid2eid"] if hashed else kw["bias"], tokens, mx.array(SCALE)],
        {"D": d, "E": E, "K": k, "HASHED": hashed}, grid, tg, [(N, k), (N, k)], [mx.int32, mx.float32])
    return wts, ids


CASES = {  # (N, E, d, k, hashed, dtype)
    "decode, Flash-like top-6 of 256": (1, 256, 40, 6, False, mx.float32),
    "batch, top-2 of 8, ragged d": (5, 8, 70, 2, False, mx.float32),
    "batch, bf16 x and weight, top-6 of 256": (3, 256, 64, 6, False, mx.bfloat16),
    "hashed, decode, 6 of 256": (1, 256, 64, 6, True, mx.float32),
    "hashed, batch, bf16, 2 of 8": (4, 8, 64, 2, True, mx.bfloat16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_float64_oracle(name):
    N, E, d, k, hashed, dtype = CASES[name]
    x, w, kw = _case(N, E, d, k, hashed, seed=len(name), dtype=dtype)
    ow, oi, gap = _oracle(x, w, k, kw)
    assert gap > 1e-3  # the data leave no doubt about the selected set
    rw, ri = rt.moe_router_reference(x, w, k, SCALE, **kw)
    assert _ok((rw, ri), (ow, oi), x, w)
    assert rw.dtype == mx.float32


@needs_cxx
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name):
    N, E, d, k, hashed, dtype = CASES[name]
    x, w, kw = _case(N, E, d, k, hashed, seed=len(name), dtype=dtype)
    assert _oracle(x, w, k, kw)[2] > 1e-3
    got = _run(SPEC, x, w, k, kw)
    assert got[1].dtype == np.int32 and _ok(got, rt.moe_router_reference(x, w, k, SCALE, **kw), x, w)
    if hashed:  # the kernel keeps the table's order
        np.testing.assert_array_equal(got[1], np.array(kw["tid2eid"])[np.array(kw["tokens"])])


def _tied(E, period):
    """x = 0 gives every expert s = sqrt(log 2); the bias repeats with `period`, so keys tie."""
    x = mx.zeros((2, 16))
    w = mx.array(np.random.default_rng(1).standard_normal((E, 16)).astype(np.float32))
    return x, w, dict(bias=mx.array((np.arange(E) % period).astype(np.float32)))


def _lowest_first(ids, kw, k) -> bool:
    """The kernel's tie rule: exactly the k lowest indices among the largest keys."""
    key = np.array(kw["bias"])
    want = np.sort(np.argsort(-key, kind="stable")[:k])
    return all(np.array_equal(np.sort(row), want) for row in np.asarray(ids))


def _valid(w, ids, kw, k) -> bool:
    """Any correct top-k under ties: k distinct ids whose keys are >= every unselected key, equal weights."""
    key = np.array(kw["bias"])
    for row, wr in zip(np.asarray(ids).astype(np.int64), np.asarray(w)):
        rest = np.setdiff1d(np.arange(key.size), row)
        if len(set(row)) != k or key[row].min() < key[rest].max() or not np.allclose(wr, SCALE / k, rtol=1e-6):
            return False
    return True


@needs_cxx
@pytest.mark.parametrize("E, period, k", [(256, 5, 6), (8, 3, 2)])
def test_ties_give_a_valid_set_lowest_index_first(E, period, k):
    x, w, kw = _tied(E, period)
    assert _valid(*rt.moe_router_reference(x, w, k, SCALE, **kw), kw, k)
    got = _run(SPEC, x, w, k, kw)
    assert _valid(*got, kw, k) and _lowest_first(got[1], kw, k)


@needs_cxx
def test_dispatch_through_the_wrapper(monkeypatch):
    fake = fake_metal(monkeypatch, SPEC)
    x, w, kw = _case(3, 8, 64, 2, False, seed=7)
    got = rt.moe_router(x, w, 2, SCALE, **kw)
    assert fake.calls == 1 and got[1].dtype == mx.int32
    assert _ok(got, rt.moe_router_reference(x, w, 2, SCALE, **kw), x, w)
    rows = rt.moe_router(x.reshape(1, 3, 64), w, 2, SCALE, **kw)  # a step's [B, L, d], launched as it is
    assert fake.calls == 2 and all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(rows, got))
    assert all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(
        rt.moe_router_reference(x.reshape(3, 1, 64), w, 2, SCALE, **kw), rt.moe_router_reference(x, w, 2, SCALE, **kw)))
    big = mx.concatenate([x] * 6)  # 18 > KERNEL_TOKENS tokens: the GEMM path
    rt.moe_router(big, w, 2, SCALE, **kw)
    assert fake.calls == 2
    monkeypatch.setenv(registry.REFERENCE_ENV, "1")
    rt.moe_router(x, w, 2, SCALE, **kw)
    assert fake.calls == 2


BROKEN = {  # name: (old, new, case)
    "bias added to the weights too": ("weights[o] = score[slot]", "weights[o] = biased[slot]", "batch"),
    "off-by-one in the top-k loop": ("j < K; ++j", "j + 1 < K; ++j", "batch"),
    "wrong simd reduction (min for max)": ("simd_max(bi < E", "simd_min(bi < E", "batch"),
    "wrong tie reduction (max for min)": ("win = simd_min(", "win = simd_max(", "ties"),
    "missing barrier after the logits": ("threadgroup_barrier(mem_flags::mem_threadgroup);", "", "batch"),
}


@needs_cxx
@pytest.mark.parametrize("what", list(BROKEN))
def test_broken_variants_are_caught(what):
    old, new, case = BROKEN[what]
    k = 6
    if case == "ties":
        x, w, kw = _tied(256, 5)
        ok = lambda out: _valid(*out, kw, k) and _lowest_first(out[1], kw, k)  # noqa: E731
    else:
        x, w, kw = _case(3, 256, 32, k, False, seed=3)
        ref = rt.moe_router_reference(x, w, k, SCALE, **kw)
        ok = lambda out: _ok(out, ref, x, w)  # noqa: E731
    assert ok(_run(SPEC, x, w, k, kw))  # the intact kernel passes the same check
    assert assert_caught(lambda: _run(variant(SPEC, old, new), x, w, k, kw), ok)


def test_bad_input_is_refused():
    x, w, kw = _case(2, 8, 16, 2, False)
    _, _, hk = _case(2, 8, 16, 2, True)
    with pytest.raises(ValueError, match="want x \\[N, d\\]"):
        rt.moe_router(x, w[:, :8], 2, SCALE, **kw)
    with pytest.raises(ValueError, match="k must be"):
        rt.moe_router(x, w, 9, SCALE, **kw)
    with pytest.raises(ValueError, match="exactly one of bias"):
        rt.moe_router(x, w, 2, SCALE)
    with pytest.raises(ValueError, match="bias must be \\[8\\]"):
        rt.moe_router(x, w, 2, SCALE, bias=kw["bias"][:4])
    with pytest.raises(ValueError, match="tid2eid must be"):
        rt.moe_router(x, w, 3, SCALE, **hk)
    with pytest.raises(ValueError, match="needs integer tokens"):
        rt.moe_router(x, w, 2, SCALE, tid2eid=hk["tid2eid"])
    with pytest.raises(ValueError, match="moe_router kernel"):
        rt.moe_router_kernel(x.astype(mx.int32), w, 2, SCALE, **kw)
