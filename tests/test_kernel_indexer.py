"""Indexer scores: the reference vs a float64 numpy oracle, the Metal kernel (CPU harness) vs the
reference on decode / ragged prefill / batch > 1 / bf16 / fp16 shapes, dispatch, broken variants.

Tolerance (elementwise): |kernel - reference| <= 2 (D + H + 2) 2^-24 sum_h |w_h| sum_d |q_hd k_nd|.
Both sum the same fp32 terms (D products per head, then H weighted heads) in different orders;
each is within (D + H + 2) u of the exact value times that magnitude (standard summation bound,
u = 2^-24). Masked (-inf) entries must agree exactly.
"""

import mlx.core as mx
import numpy as np
import pytest
from kernel_util import assert_caught, needs_cxx, variant

from mlx_dsv4.kernels import indexer_score as ix
from mlx_dsv4.kernels import registry
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
    B, L, H, D = q.shape
    N = k.shape[1]
    (score,) = run_metal_kernel_on_cpu(spec, [q, k, w, off], {"T": q.dtype, "H": H, "DQ": D, "RATIO": ratio},
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
    monkeypatch.delenv(registry.REFERENCE_ENV, raising=False)
    fake = CpuKernel(SPEC)
    monkeypatch.setattr(registry, "metal_available", lambda: True)
    monkeypatch.setattr(registry, "get_kernel", lambda name: fake)
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
