"""Indexer scores: the reference vs a float64 numpy oracle, the Metal kernel (CPU harness) vs the
reference on decode / ragged prefill / batch > 1 / bf16 / fp16 shapes, dense keys or the compact FP4
key store read in place, dispatch, broken variants.

Tolerance (elementwise): |kernel - reference| <= 2 (D + H + 2) 2^-24 sum_h |w_h| sum_d |q_hd k_nd|.
Both sum the same fp32 terms (D products per head, then H weighted heads) in different orders;
each is within (D + H + 2) u of the exact value times that magnitude (standard summation bound,
u = 2^-24). Masked (-inf) entries must agree exactly. The FP4 form decodes the keys in-kernel to
the very values FP4Rows.view() gives, and then sums exactly as the dense form does: kernel(store)
must equal kernel(store.view()) bit for bit, and the reference within the bound above.
"""

import mlx.core as mx
import numpy as np
import pytest
from kernel_util import assert_caught, fake_metal, needs_cxx, variant

from mlx_dsv4 import indexer
from mlx_dsv4.cache import LayerCache
from mlx_dsv4.kernels import indexer_score as ix
from mlx_dsv4.kernels import registry
from mlx_dsv4.kvstore import FP4Rows
from mlx_dsv4.kernels.registry import load_spec
from mlx_dsv4.kernels.sim import CpuKernel, run_metal_kernel_on_cpu

SPEC = load_spec("indexer_score")


def _case(B, L, H, D, N, offsets, seed=0, dtype=mx.float32):
    rng = np.random.default_rng(seed)
    q = mx.array(rng.standard_normal((B, L, H, D)).astype(np.float32)).astype(dtype)
    k = mx.array(rng.standard_normal((B, N, D)).astype(np.float32)).astype(dtype)
    w = mx.array(rng.standard_normal((B, L, H)).astype(np.float32) / H)
    return q, k, w, mx.array(offsets, dtype=mx.int32)


def _np(a):
    return np.array(a.astype(mx.float32), dtype=np.float64)


def _oracle(q, k, w, off, ratio):
    q, k, w = _np(q), _np(k), _np(w)
    s = np.einsum("blh,blhn->bln", w, np.maximum(np.einsum("blhd,bnd->blhn", q, k), 0))
    visible = (np.array(off)[:, None] + np.arange(q.shape[1])[None] + 1) // ratio
    return np.where(np.arange(k.shape[1])[None, None] < visible[..., None], s, -np.inf)


def _ok(score, ref, q, k, w) -> bool:
    score, ref = np.asarray(score, np.float64), np.asarray(ref, np.float64)
    masked = np.isneginf(ref)
    if not np.array_equal(np.isneginf(score), masked):
        return False
    D, H = q.shape[-1], q.shape[2]
    mag = np.einsum("blh,blhd,bnd->bln", np.abs(_np(w)), np.abs(_np(q)), np.abs(_np(k)), optimize=True)
    bound = 2 * (D + H + 2) * 2.0**-24 * mag[~masked]
    return bool((np.abs(score[~masked] - ref[~masked]) <= bound).all())


def _run(spec, q, k, w, off, ratio):
    """The kernel on dense keys [B, N, D] or on an FP4Rows store's parts, read in place."""
    B, L, H, D = q.shape
    if isinstance(k, FP4Rows):
        N, fp4, kk, kexp = k.n, True, k.parts["packed"], k.parts["exps"]
    else:
        N, fp4, kk, kexp = k.shape[1], False, k, mx.zeros((8,), mx.uint8)
    (score,) = run_metal_kernel_on_cpu(spec, [q, kk, kexp, w, off, mx.array(N, dtype=mx.int32)],
                                       {"T": q.dtype, "H": H, "DQ": D, "RATIO": ratio, "FP4": fp4},
                                       (128 * (-(-N // 32)), L, B), (128, 1, 1), [(B, L, N)], [mx.float32])
    return score


def test_reference_matches_float64_oracle_and_chunking(monkeypatch):
    q, k, w, off = _case(2, 5, 6, 8, 7, [3, 20])
    ref = ix.indexer_score_reference(q, k, w, off, 4)
    exact = _oracle(q, k, w, off, 4)
    np.testing.assert_array_equal(np.isneginf(np.array(ref)), np.isneginf(exact))
    fin = np.isfinite(exact)
    np.testing.assert_allclose(np.array(ref)[fin], exact[fin], rtol=1e-5, atol=1e-6)
    assert np.isneginf(exact).any() and fin.any()  # both kinds of entries are exercised
    monkeypatch.setattr(ix, "SCORE_BUDGET", 13)  # forces blocks of 2 keys x 1 query
    np.testing.assert_allclose(np.array(ix.indexer_score_reference(q, k, w, off, 4)), np.array(ref), rtol=1e-6)
    np.testing.assert_array_equal(np.array(ix.indexer_score_reference(q, k, w, 3, 1)),
                                  np.array(ix.indexer_score_reference(q, k, w, mx.array([3, 3]), 1)))


CASES = {  # (B, L, H, D, N, offsets, ratio, dtype)
    "decode": (1, 1, 64, 128, 9, [40], 4, mx.float32),
    "prefill, ragged last tile, per-row offsets": (2, 3, 64, 128, 70, [250, 270], 4, mx.float32),
    "H not a multiple of 32, invisible tiles": (3, 4, 40, 32, 33, [0, 100, 131], 4, mx.float32),
    "bfloat16 q and k": (2, 2, 64, 128, 40, [150, 160], 4, mx.bfloat16),
    "float16, ratio 1": (1, 3, 32, 64, 20, [17], 1, mx.float16),
}


@needs_cxx
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name):
    B, L, H, D, N, offsets, ratio, dtype = CASES[name]
    q, k, w, off = _case(B, L, H, D, N, offsets, seed=len(name), dtype=dtype)
    ref = ix.indexer_score_reference(q, k, w, off, ratio)
    assert _ok(_run(SPEC, q, k, w, off, ratio), ref, q, k, w)


@needs_cxx
def test_dispatch_through_the_wrapper(monkeypatch):
    fake = fake_metal(monkeypatch, SPEC)
    q, k, w, _ = _case(2, 2, 64, 128, 40, [0, 0], seed=5)
    ref = ix.indexer_score_reference(q, k, w, 150, 4)
    assert _ok(ix.indexer_score(q, k, w, 150, 4), ref, q, k, w) and fake.calls == 1
    monkeypatch.setenv(registry.REFERENCE_ENV, "1")
    ix.indexer_score(q, k, w, 150, 4)
    assert fake.calls == 1


BROKEN = {
    "off-by-one causal mask": ("out[n] = int(n) < visible ? total", "out[n] = int(n) <= visible ? total"),
    "missing barrier after the key tile load": ("threadgroup_barrier(mem_flags::mem_threadgroup);", ""),
    "wrong butterfly mask (xor 4 for xor 8)": ("simd_shuffle_xor(b3 ? a[i] : a[i + 2], 8)",
                                               "simd_shuffle_xor(b3 ? a[i] : a[i + 2], 4)"),
}


@needs_cxx
@pytest.mark.parametrize("what", list(BROKEN))
def test_broken_variants_are_caught(what):
    old, new = BROKEN[what]
    section = "header" if "butterfly" in what else "source"
    B, L, H, D, N, offsets, ratio, _dtype = CASES["prefill, ragged last tile, per-row offsets"]
    q, k, w, off = _case(B, L, H, D, N, offsets, seed=11)
    ref = ix.indexer_score_reference(q, k, w, off, ratio)
    assert _ok(_run(SPEC, q, k, w, off, ratio), ref, q, k, w)  # the intact kernel passes the same check
    broken = variant(SPEC, old, new, section)
    assert assert_caught(lambda: _run(broken, q, k, w, off, ratio), lambda s: _ok(s, ref, q, k, w))


def test_bad_input_is_refused():
    q, k, w, _off = _case(2, 3, 4, 8, 5, [0, 0])
    with pytest.raises(ValueError, match="shapes disagree"):
        ix.indexer_score(q, k[:, :, :4], w, 0, 4)
    with pytest.raises(ValueError, match="ratio must be an int >= 1"):
        ix.indexer_score(q, k, w, 0, 0)
    with pytest.raises(ValueError, match="one per row \\[2\\]"):
        ix.indexer_score(q, k, w, mx.array([1, 2, 3]), 4)
    with pytest.raises(ValueError, match="share a dtype"):
        ix.indexer_score_kernel(q, k.astype(mx.float16), w, 0, 4)


# ---- the compact FP4 key store, read in place ------------------------------------------------------------


def _store(k: mx.array, chunks=(3,), dtype=None) -> FP4Rows:
    """An FP4Rows store holding keys k [B, N, D], appended in pieces (rows 0..2, then the rest):
    its buffers have capacity 256 > N, so the kernel must use the capacity as the row stride.
    dtype: the decoded dtype, otherwise taken from the first append."""
    st = FP4Rows()
    st.dtype = dtype
    cuts = [0, *[c for c in chunks if c < k.shape[1]], k.shape[1]]
    for a, b in zip(cuts, cuts[1:]):
        st.append(k[:, a:b])
    assert st.n == k.shape[1] and st.parts["packed"].shape[1] > st.n
    return st


FP4_CASES = {  # (B, L, H, D, N, offsets, ratio, dtype, key scale)
    "decode, batch 2, ragged n vs cap": (2, 1, 64, 128, 41, [120, 200], 4, mx.float32, 1.0),
    "prefill, invisible tiles, H 40": (3, 3, 40, 64, 70, [0, 100, 270], 4, mx.float32, 1.0),
    "bfloat16 q and keys, wide scales": (2, 2, 64, 128, 33, [100, 160], 4, mx.bfloat16, 2.0**40),
    "float16, tiny keys rounded to fp16 subnormals": (2, 2, 32, 64, 20, [40, 90], 4, mx.float16, 2.0**-24),
}


def _fp4_case(name):
    B, L, H, D, N, offsets, ratio, dtype, scale = FP4_CASES[name]
    q, k, w, off = _case(B, L, H, D, N, offsets, seed=len(name), dtype=dtype)
    # Per-row scales spread the E8M0 exponents; keys are appended in q's dtype, as the model does.
    rows = mx.array(np.exp2(np.random.default_rng(1).integers(-6, 7, size=(B, N, 1))).astype(np.float32))
    k = k.astype(mx.float32) * rows * scale
    if dtype == mx.float16:  # fp32 keys below fp16's range in a store that decodes to fp16: rounding to T
        return q, _store(k, dtype=mx.float16), w, off, ratio
    return q, _store(k.astype(dtype)), w, off, ratio


def test_fp16_case_really_rounds_the_decoded_keys():
    """In the fp16 case above the rounding to T matters: the fp32 products are not all fp16 values."""
    _q, st, _w, _off, _r = _fp4_case("float16, tiny keys rounded to fp16 subnormals")
    assert st.dtype == mx.float16
    fp32 = np.array(st.view(mx.float32))
    assert not np.array_equal(fp32, np.array(st.view().astype(mx.float32)))


@needs_cxx
@pytest.mark.parametrize("name", list(FP4_CASES))
def test_fp4_store_kernel_matches_reference_and_dense_kernel(name):
    q, st, w, off, ratio = _fp4_case(name)
    K = st.view()  # what the cache's index_keys decodes today
    assert K.dtype == q.dtype
    ref = ix.indexer_score_reference(q, st, w, off, ratio)
    np.testing.assert_array_equal(np.array(ref), np.array(ix.indexer_score_reference(q, K, w, off, ratio)))
    score = _run(SPEC, q, st, w, off, ratio)
    assert _ok(score, ref, q, K, w)
    np.testing.assert_array_equal(score, _run(SPEC, q, K, w, off, ratio))  # same values, same sums
    assert np.isneginf(score).any() and np.isfinite(score).any()


FP4_BROKEN = {  # (old, new, section)
    "nibble order swapped": ("lo = float(T(E2M1[byte & 15u] * s));\n        hi = float(T(E2M1[byte >> 4] * s));",
                             "lo = float(T(E2M1[byte >> 4] * s));\n        hi = float(T(E2M1[byte & 15u] * s));",
                             "header"),
    "off-by-one exponent index": ("+ j / 16]", "+ (j + 1) / 16]", "header"),
    "row stride n instead of the capacity": ("size_t(b) * cap + n0", "size_t(b) * N + n0", "source"),
}


@needs_cxx
@pytest.mark.parametrize("what", list(FP4_BROKEN))
def test_fp4_broken_variants_are_caught(what):
    old, new, section = FP4_BROKEN[what]
    q, st, w, off, ratio = _fp4_case("decode, batch 2, ragged n vs cap")
    K = st.view()
    ref = ix.indexer_score_reference(q, st, w, off, ratio)
    assert _ok(_run(SPEC, q, st, w, off, ratio), ref, q, K, w)  # the intact kernel passes the same check
    broken = variant(SPEC, old, new, section)
    assert assert_caught(lambda: _run(broken, q, st, w, off, ratio), lambda s: _ok(s, ref, q, K, w))


def _compact_cache(B=2, D=64, chunks=(5, 30), seed=7):
    rng = np.random.default_rng(seed)
    cache = LayerCache(4, 8, compact=True, nope=D)
    for n in chunks:
        cache.push_index_keys(mx.array(rng.standard_normal((B, n, D)).astype(np.float32)))
    assert cache.index_store is cache._index and cache.index_store.kind == "fp4"
    return cache


@needs_cxx
def test_fp4_dispatch_with_a_compact_cache(monkeypatch):
    """Through CpuKernel: the wrapper reads the cache's FP4 store in place (one launch), select()
    hands it over undecoded, and the reference path decodes it exactly as index_keys does."""
    monkeypatch.delenv(registry.REFERENCE_ENV, raising=False)
    fake, others = CpuKernel(SPEC), {}  # select() also runs the top-k kernel: on its own CpuKernel
    monkeypatch.setattr(registry, "metal_available", lambda: True)
    monkeypatch.setattr(registry, "get_kernel",
                        lambda name: fake if name == "indexer_score" else others.setdefault(name, CpuKernel(name)))
    cache = _compact_cache()
    st, K = cache.index_store, cache.index_keys
    q, _k, w, _ = _case(2, 3, 40, 64, 1, [0, 0], seed=9)
    ref = ix.indexer_score_reference(q, K, w, 150, 4)
    assert ix.scoring_keys(q, st) is st
    score = ix.indexer_score(q, st, w, 150, 4)
    assert fake.calls == 1 and _ok(np.array(score), ref, q, K, w)
    dense = ix.indexer_score(q, K, w, 150, 4)  # the dense form of the same kernel: identical sums
    np.testing.assert_array_equal(np.array(score), np.array(dense))
    ids = indexer.select(q, st, w, 150, 4, 8)
    np.testing.assert_array_equal(np.array(ids), np.array(indexer.select(q, K, w, 150, 4, 8)))
    assert fake.calls == 4
    # a restored store decodes to float32 (FP4Rows.decode's default): the kernel covers fp32 q only
    restored = LayerCache.from_state(cache.state).index_store
    assert restored.dtype is None and ix.kernel_supported(q, restored)
    assert not ix.kernel_supported(q.astype(mx.bfloat16), restored)
    monkeypatch.setenv(registry.REFERENCE_ENV, "1")
    dec = ix.scoring_keys(q, st)
    assert not isinstance(dec, FP4Rows) and np.array_equal(np.array(dec), np.array(K))
    np.testing.assert_array_equal(np.array(ix.indexer_score(q, st, w, 150, 4)), np.array(ref))
    np.testing.assert_array_equal(np.array(indexer.select(q, st, w, 150, 4, 8)),
                                  np.array(indexer.select(q, K, w, 150, 4, 8)))
    assert fake.calls == 4


def test_fp4_store_bad_input_is_refused():
    cache = _compact_cache(B=2, D=64)
    q, _k, w, _ = _case(2, 1, 4, 32, 1, [0, 0])
    with pytest.raises(ValueError, match="shapes disagree"):
        ix.indexer_score(q, cache.index_store, w, 0, 4)  # key width 64 vs q's 32
    with pytest.raises(ValueError, match="k must be an array or a dense / FP4 row store"):
        ix.indexer_score(q, cache.compressed_store, w, 0, 4)
    q64, _k, w64, _ = _case(2, 1, 4, 64, 1, [0, 0])
    with pytest.raises(ValueError, match="share a dtype"):
        ix.indexer_score_kernel(q64.astype(mx.bfloat16), cache.index_store, w64, 0, 4)


@needs_cxx
def test_dense_store_is_read_in_place(monkeypatch):
    """A non-compact cache's dense store (capacity 256 > n rows, batch 2) goes to the kernel as is, with
    the capacity as the row stride: the same sums as the kernel on the sliced keys, bit for bit."""
    fake = fake_metal(monkeypatch, SPEC)
    rng = np.random.default_rng(4)
    cache = LayerCache(4, 8, compact=False)
    for n in (5, 30):
        cache.push_index_keys(mx.array(rng.standard_normal((2, n, 64)).astype(np.float32)))
    st, K = cache.index_store, cache.index_keys
    q, _k, w, _ = _case(2, 2, 40, 64, 1, [0, 0], seed=2)
    assert st.kind == "dense" and st.parts["rows"].shape[1] > st.n and ix.scoring_keys(q, st) is st
    score = ix.indexer_score(q, st, w, 100, 4)
    np.testing.assert_array_equal(np.array(score), np.array(ix.indexer_score(q, K, w, 100, 4)))
    assert fake.calls == 2 and _ok(np.array(score), ix.indexer_score_reference(q, K, w, 100, 4), q, K, w)
