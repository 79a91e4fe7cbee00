"""Indexer top-k: the reference vs indexer.top_k_visible and a numpy stable-argsort oracle, the Metal
kernel (CPU harness) vs both on ragged / decode / prefill / batch > 1 shapes, dispatch, broken variants.

Exact checks, no tolerance: selection only compares scores, never computes with them. Ids per row
are compared as sets (sorted), since the order within a row is free. For distinct scores the
kernel's set must equal the reference's; with ties at the k-th value it must equal the set of a
stable descending argsort (lowest index first, the kernel's documented choice), which is also a
valid reference answer: right size, every id scoring at least the k-th value.
"""

import mlx.core as mx
import numpy as np
import pytest
from kernel_util import assert_caught, fake_metal, needs_cxx, variant

from mlx_dsv4 import indexer
from mlx_dsv4.kernels import indexer_topk as it
from mlx_dsv4.kernels import registry
from mlx_dsv4.kernels.registry import load_spec
from mlx_dsv4.kernels.sim import run_metal_kernel_on_cpu

SPEC = load_spec("indexer_topk")


def _visible(B, L, start, ratio):
    off = np.broadcast_to(np.asarray(start), (B,))
    return (off[:, None] + np.arange(L)[None] + 1) // ratio  # [B, L]


def _scores(B, L, N, start, ratio, kind="normal", seed=0):
    """Indexer-like scores: -inf for the entries a query cannot see yet."""
    rng = np.random.default_rng(seed)
    pool = np.unique(rng.standard_normal(2 * N + 64).astype(np.float32))  # distinct float32 normals

    def distinct():
        return np.stack([rng.choice(pool, N, replace=False) for _ in range(B * L)]).reshape(B, L, N)

    s = {"normal": distinct,
         "negative": lambda: -np.abs(distinct()) - 1e-3,
         "ties": lambda: rng.integers(-3, 4, (B, L, N)) * 0.5,
         "zeros": lambda: rng.choice(np.array([-0.0, 0.0, 0.0, -0.0, 1.0, -1.0]), (B, L, N))}[kind]()
    vis = _visible(B, L, start, ratio)
    return np.where(np.arange(N)[None, None] < vis[..., None], s, -np.inf).astype(np.float32)


def _oracle(s, k, start, ratio):
    """Stable descending argsort over the visible prefix: ties lowest index first, -1 padding."""
    B, L, N = s.shape
    k = min(k, N)
    vis = np.minimum(_visible(B, L, start, ratio), N)
    out = np.full((B, L, k), -1, np.int32)
    for b in range(B):
        for q in range(L):
            top = np.argsort(-s[b, q, : vis[b, q]], kind="stable")[:k]
            out[b, q, : len(top)] = top
    return out


def _sets(ids):
    return np.sort(np.asarray(ids), axis=-1)


def _run(spec, s, k, start, ratio):
    B, L, N = s.shape
    kk, tg = min(k, N), it.threads(N)
    off = np.broadcast_to(np.asarray(start, np.int32), (B,)).copy()
    (ids,) = run_metal_kernel_on_cpu(spec, [s, off, np.int32(kk)], {"RATIO": ratio}, (tg, L, B), (tg, 1, 1),
                                     [(B, L, kk)], [np.int32])
    return ids


def test_reference_matches_oracle():
    assert indexer.top_k_visible is it.top_k_visible  # the model's indexer selects through the dispatcher
    for B, L, N, k, start, kind in [(2, 5, 100, 16, 60, "normal"), (2, 1, 300, 512, 900, "negative"),
                                    (1, 3, 7, 4, 0, "normal"), (2, 2, 50, 8, 300, "normal")]:
        s = _scores(B, L, N, start, 4, kind, seed=N)
        ref = it.top_k_visible_reference(mx.array(s), k, start, 4)
        np.testing.assert_array_equal(_sets(ref), _sets(_oracle(s, k, start, 4)))


CASES = {  # (B, L, N, k, start, ratio, kind): visible = (start + l + 1) // ratio
    "N = 1, k > N, nothing visible yet": (2, 5, 1, 4, 2, 4, "normal"),
    "N = 7, prefill, visible reaches k": (2, 5, 7, 4, 16, 4, "normal"),
    "N = 100, negative scores, visible crosses k": (2, 5, 100, 16, 60, 4, "negative"),
    "N = 100, k = 512 > N, -inf tail": (2, 5, 100, 512, 300, 4, "normal"),
    "N = 5000 ragged vs 1024 threads, decode, k = 512": (2, 1, 5000, 512, 19000, 4, "normal"),
    "N = 5000, k = 4, prefill": (2, 5, 5000, 4, 19996, 4, "normal"),
    "ties at the k-th value": (2, 5, 100, 16, 390, 4, "ties"),
    "+0 and -0 tie": (2, 5, 100, 16, 390, 4, "zeros"),
    "ratio 1": (1, 5, 100, 16, 90, 1, "normal"),
}


@needs_cxx
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name):
    B, L, N, k, start, ratio, kind = CASES[name]
    s = _scores(B, L, N, start, ratio, kind, seed=len(name))
    ids = _run(SPEC, s, k, start, ratio)
    oracle = _oracle(s, k, start, ratio)
    np.testing.assert_array_equal(_sets(ids), _sets(oracle))
    n = (ids >= 0).sum(-1, keepdims=True)  # documented order: ascending ids, then the -1 slots
    assert (np.diff(ids, axis=-1)[np.arange(ids.shape[-1] - 1) < n - 1] > 0).all()
    assert ((ids >= 0) == (np.arange(ids.shape[-1]) < n)).all()
    ref = np.array(it.top_k_visible_reference(mx.array(s), k, start, ratio))

    def val(i):  # the scores of ids, +inf for -1 slots
        return np.where(i >= 0, np.take_along_axis(s, np.maximum(i, 0), -1), np.inf)

    if kind in ("normal", "negative"):  # distinct scores: the very set of the reference
        assert all(len(np.unique(r[np.isfinite(r)])) == np.isfinite(r).sum() for r in s.reshape(-1, s.shape[-1]))
        np.testing.assert_array_equal(_sets(ids), _sets(ref))
    else:  # ties (really at the k-th value): also a valid reference answer, same size, all >= the k-th
        kth = val(ref).min(-1, keepdims=True)
        assert ((val(ids) >= kth).all() and (n[..., 0] == (ref >= 0).sum(-1)).all())
        full = n[..., 0] == ids.shape[-1]
        assert ((s == kth).sum(-1)[full] > (val(ids) == kth).sum(-1)[full]).any()


@needs_cxx
def test_per_row_offsets():
    """The kernel takes one offset per batch row (the wrapper passes start to all)."""
    s = np.random.default_rng(3).standard_normal((2, 3, 60)).astype(np.float32)
    ids = _run(SPEC, s, 8, np.array([10, 200]), 4)
    for b, start in enumerate([10, 200]):
        masked = _scores(1, 3, 60, start, 4)[0]
        masked = np.where(np.isfinite(masked), s[b], -np.inf).astype(np.float32)
        np.testing.assert_array_equal(_sets(ids[b]), _sets(_oracle(masked[None], 8, start, 4)[0]))


@needs_cxx
def test_dispatch_through_the_wrapper(monkeypatch):
    fake = fake_metal(monkeypatch, SPEC)
    s = _scores(2, 3, 700, 2790, 4, "normal", seed=7)
    ref = it.top_k_visible_reference(mx.array(s), 100, 2790, 4)
    ids = it.top_k_visible(mx.array(s), 100, 2790, 4)
    assert ids.dtype == mx.int32 and ids.shape == ref.shape and fake.calls == 1
    np.testing.assert_array_equal(_sets(ids), _sets(ref))
    monkeypatch.setenv(registry.REFERENCE_ENV, "1")
    it.top_k_visible(mx.array(s), 100, 2790, 4)
    assert fake.calls == 1


BROKEN = {  # what: (section, old, new)
    "sign flip of negative floats ignored":
        ("header", "(u & 0x80000000u) ? ~u : (u | 0x80000000u)", "u ^ 0x80000000u"),
    "-0 not made +0 (ranks below +0)": ("header", "u = (u << 1) == 0u ? 0u : u;", ""),
    "wrong bucket boundary (a bucket that ends at rem skipped)":
        ("source", "above + c[j] >= rem", "above + c[j] > rem"),
    "off-by-one prefix scan (inclusive)":
        ("source", "uint above = simd_prefix_exclusive_sum(s);", "uint above = simd_prefix_inclusive_sum(s);"),
    "last run of a digit not counted": ("source", "  if (run != 0) {\n", "  if (false) {\n"),
    "missing barrier after the histogram":
        ("source", "threadgroup_barrier(mem_flags::mem_threadgroup);  // histogram complete", ""),
    "missing barrier before reading tile totals":
        ("source", "threadgroup_barrier(mem_flags::mem_threadgroup);  // tile totals written", ""),
}


@needs_cxx
@pytest.mark.parametrize("what", list(BROKEN))
def test_broken_variants_are_caught(what):
    section, old, new = BROKEN[what]
    # the k-th of ~700 normals is negative (the sign matters), 22 SIMD groups, a ragged tile; or
    # +0 / -0 ties at the k-th value, where the documented choice is the lowest index
    s = _scores(2, 3, 700, 2790, 4, "zeros" if "-0" in what else "normal", seed=11)
    want = _sets(_oracle(s, 400, 2790, 4))

    def ok(ids):
        return np.array_equal(_sets(ids), want)

    assert ok(_run(SPEC, s, 400, 2790, 4))  # the intact kernel passes the same check
    broken = variant(SPEC, old, new, section)
    assert assert_caught(lambda: _run(broken, s, 400, 2790, 4), ok)


def test_bad_input_is_refused():
    s = mx.zeros((2, 3, 5))
    with pytest.raises(ValueError, match="scores must be"):
        it.top_k_visible(s[0], 4, 0, 4)
    for args, name in [((0, 0, 4), "k"), ((4, -1, 4), "start"), ((4, 0, 0), "ratio"), ((4.0, 0, 4), "k")]:
        with pytest.raises(ValueError, match=f"{name} must be an int"):
            it.top_k_visible(s, *args)
    with pytest.raises(ValueError, match="floating point"):
        it.top_k_visible_kernel(s.astype(mx.int32), 4, 0, 4)
