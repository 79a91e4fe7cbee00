"""mHC: the Sinkhorn split against the reference vectors, and the stream algebra's invariants."""

import mlx.core as mx
import numpy as np

from mlx_dsv4.mhc import hc_post, hc_pre, sinkhorn_split


def test_sinkhorn_split_matches_reference_vectors(data_dir):
    """qat-vectors hc_*: the official split (20 iterations, eps 1e-6). fp32 throughout; the
    vectors were produced with another summation order, so allow a few ulps (2e-6 absolute on
    values in [0, 2])."""
    v = np.load(data_dir / "qat-vectors.npz")
    pre, post, comb = sinkhorn_split(mx.array(v["hc_mixes"]), mx.array(v["hc_scale"]), mx.array(v["hc_base"]),
                                     4, 20, 1e-6)
    for ours, ref in ((pre, v["hc_pre"]), (post, v["hc_post"]), (comb, v["hc_comb"])):
        np.testing.assert_allclose(np.array(ours), ref, rtol=0, atol=2e-6)
    # negative control: 10 iterations (a shipped "speed-up") is visibly different
    _, _, c10 = sinkhorn_split(mx.array(v["hc_mixes"]), mx.array(v["hc_scale"]), mx.array(v["hc_base"]), 4, 10, 1e-6)
    assert np.abs(np.array(c10) - v["hc_comb"]).max() > 1e-4


def test_comb_is_doubly_stochastic_and_post_mixes_transposed():
    mix = mx.random.normal((3, 5, 24), key=mx.random.key(0))
    _, _, comb = sinkhorn_split(mix, mx.array([1.0, 1.0, 1.0]), mx.zeros((24,)), 4, 20, 1e-6)
    c = np.array(comb)
    np.testing.assert_allclose(c.sum(-2), 1, atol=1e-5)  # the last step normalises columns
    np.testing.assert_allclose(c.sum(-1), 1, atol=1e-3)
    X = mx.random.normal((3, 5, 4, 8), key=mx.random.key(1))
    y = mx.zeros((3, 5, 8))
    out = np.array(hc_post(y, X, mx.zeros((3, 5, 4)), comb))
    expect = np.einsum("bljk,bljd->blkd", c, np.array(X))  # X'_k = sum_j C[j, k] X_j
    np.testing.assert_allclose(out, expect, atol=1e-5)


def test_hc_pre_collapses_with_pre_weights():
    X = mx.random.normal((1, 2, 4, 16), key=mx.random.key(2))
    fn = mx.zeros((24, 64))  # mixes all zero: pre = sigmoid(base) + eps
    base = mx.array(np.linspace(-1, 1, 24).astype(np.float32))
    u, post, _ = hc_pre(X, fn, mx.ones((3,)), base, 20, 1e-6, 1e-6)
    pre = 1 / (1 + np.exp(-np.array(base[:4]))) + 1e-6
    np.testing.assert_allclose(np.array(u), np.einsum("k,blkd->bld", pre, np.array(X)), atol=1e-5)
    np.testing.assert_allclose(np.array(post)[0, 0], 2 / (1 + np.exp(-np.array(base[4:8]))), atol=1e-6)
