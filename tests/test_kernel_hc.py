"""mHC hc_pre / hc_post: the references vs a float64 numpy oracle, the fused Metal kernels (CPU
harness) vs the references, the official Sinkhorn vectors through hc_pre, dispatch, broken variants.

Tolerance, per token, with u = 2^-24 and d the stream width:
- mixes: delta_r = 2 (4 d) u (rho sum_e |x_e fn_re| + |mix_r|): kernel and reference sum the same
  4 d fp32 products in other orders (each within (4 d) u of exact times the sum of |terms|) and rho
  comes from a 4 d-term sum of squares (relative error <= (4 d) u / 2 after the rsqrt).
- pre, post, comb: the split's gain times max_r delta_r, plus the Sinkhorn kernel's own 2e-6
  (tests/test_kernel_sinkhorn_split.py). Gains: sigmoid' <= 1/4, so pre moves <= scale[0]/4 and post <=
  scale[1]/2 per unit of mix; comb's measured float64 gain is <= 0.62 scale[2] (random mixes of
  spread 0.5-5, 200 draws): allow 2 scale[2].
- u (stored in T): sum_k |d pre_k| |X_k| + 4 u sum_k |pre_k X_k| in fp32, then 1 ulp of T, as both
  round a slightly different fp32 value (bf16: 2^-7 |u|, fp32: 2^-23 |u|).
- hc_post: 4 u (|post_k y| + sum_j |comb_jk X_j|) (5 terms, another order), then 1 ulp of T.
"""

import mlx.core as mx
import numpy as np
import pytest
from kernel_util import assert_caught, needs_cxx, variant

from mlx_dsv4 import mhc as model_mhc
from mlx_dsv4.kernels import hc, registry
from mlx_dsv4.kernels.registry import load_spec
from mlx_dsv4.kernels.sim import CpuKernel, run_metal_kernel_on_cpu
from mlx_dsv4.norm import rms_norm

PRE, POST = load_spec("hc_pre"), load_spec("hc_post")
EPS, NORM_EPS, SINKHORN_TOL, U = 1e-6, 1e-6, 2e-6, 2.0**-24
ULP = {mx.float32: 2.0**-23, mx.bfloat16: 2.0**-7, mx.float16: 2.0**-10}


def _f64(a):
    return np.array(mx.array(a).astype(mx.float32), dtype=np.float64)


def _split64(m, s, iters=20):
    """The Sinkhorn split in float64 (spec §3 item 2), independent of MLX."""
    s, b = _f64(s[0]), _f64(s[1])
    z = m * np.repeat(s, [4, 4, 16]) + b
    pre = 1 / (1 + np.exp(-z[..., :4])) + EPS
    post = 2 / (1 + np.exp(-z[..., 4:8]))
    c = z[..., 8:].reshape(*z.shape[:-1], 4, 4)
    c = np.exp(c - c.max(-1, keepdims=True))
    c = c / c.sum(-1, keepdims=True) + EPS
    c = c / (c.sum(-2, keepdims=True) + EPS)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdims=True) + EPS)
        c = c / (c.sum(-2, keepdims=True) + EPS)
    return pre, post, c


def _oracle_pre(X, fn, scale, base, iters=20):
    """(u, post, comb) in float64, and the per-token tolerances (u elementwise, pre/post/comb)."""
    x, f = _f64(X), _f64(fn)
    flat = x.reshape(*x.shape[:-2], -1)
    w = flat.shape[-1]
    rho = 1 / np.sqrt((flat**2).mean(-1, keepdims=True) + NORM_EPS)
    mix = rho * (flat @ f.T)
    pre, post, comb = _split64(mix, (scale, base), iters)
    u = np.einsum("...k,...kd->...d", pre, x)
    delta = (2 * w * U * (rho * (np.abs(flat) @ np.abs(f).T) + np.abs(mix))).max(-1, keepdims=True)
    s = _f64(scale)
    tol_pre = s[0] / 4 * delta + SINKHORN_TOL
    tol_u = tol_pre[..., None] * np.abs(x) + 4 * U * pre[..., None] * np.abs(x)
    tol_u = tol_u.sum(-2) + ULP[mx.array(X).dtype] * np.abs(u)
    return (u, post, comb), (tol_u, s[1] / 2 * delta + SINKHORN_TOL, (2 * s[2] * delta + SINKHORN_TOL)[..., None])


def _oracle_post(y, X, post, comb):
    y, x, p, c = _f64(y), _f64(X), _f64(post), _f64(comb)
    terms = np.abs(p[..., None] * y[..., None, :]) + np.einsum("...jk,...jd->...kd", np.abs(c), np.abs(x))
    out = p[..., None] * y[..., None, :] + np.einsum("...jk,...jd->...kd", c, x)  # X'_k = sum_j C[j, k] X_j
    return out, 4 * U * terms + ULP[mx.array(X).dtype] * np.abs(out)


def _within(outs, refs, tols) -> bool:
    return all(bool((np.abs(_f64(o) - _f64(r)) <= t).all()) for o, r, t in zip(outs, refs, tols))


def _case(lead, d, seed=0, dtype=mx.float32, spread=3.0):
    rng = np.random.default_rng(seed)
    X = mx.array(rng.standard_normal((*lead, 4, d)).astype(np.float32)).astype(dtype)
    fn = mx.array((rng.standard_normal((24, 4 * d)) * spread / np.sqrt(4 * d)).astype(np.float32))
    scale = mx.array(rng.uniform(0.2, 2.0, 3).astype(np.float32))
    base = mx.array(rng.standard_normal(24).astype(np.float32))
    y = mx.array(rng.standard_normal((*lead, d)).astype(np.float32)).astype(dtype)
    return X, fn, scale, base, y


def _run_pre(spec, X, fn, scale, base, iters=20, norm_eps=NORM_EPS, norm=None, after=None):
    """(u, post, comb), and X' with after = (y, post, comb) of the previous sub-layer (POST)."""
    n, _, d = X.shape
    tg = min(512, -(-4 * d // 32) * 32)
    w, out_eps = (base, 0.0) if norm is None else norm
    y, p, c = after or (mx.zeros((8,), mx.array(X).dtype), base, base)  # never read without POST
    shapes = [(n, d), (n, 4), (n, 4, 4), (n, 4, d) if after else (1,)]
    outs = run_metal_kernel_on_cpu(spec, [X, fn, scale, base, np.float32(EPS), np.float32(norm_eps), w,
                                          np.float32(out_eps), y, p, c],
                                   {"T": X.dtype, "D": d, "ITERS": iters, "NORM": norm is not None,
                                    "POST": after is not None},
                                   (tg * n, 1, 1), (tg, 1, 1), shapes, [X.dtype, mx.float32, mx.float32, X.dtype])
    return outs if after else outs[:3]


def _run_post(spec, y, X, post, comb):
    n, _, d = X.shape
    (out,) = run_metal_kernel_on_cpu(spec, [y, X, post, comb], {"T": X.dtype, "D": d}, (d, n, 1),
                                     (min(d, 256), 1, 1), [(n, 4, d)], [X.dtype])
    return out


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_references_match_float64_oracle(dtype):
    X, fn, scale, base, y = _case((2, 3), 40, seed=1, dtype=dtype)
    ref = hc.hc_pre_reference(X, fn, scale, base, 20, EPS, NORM_EPS)
    exact, tols = _oracle_pre(X, fn, scale, base)
    assert ref[0].dtype == dtype and _within(ref, exact, tols)
    out = hc.hc_post_reference(y, X, ref[1], ref[2])
    exact, tol = _oracle_post(y, X, ref[1], ref[2])
    assert out.dtype == dtype and _within([out], [exact], [tol])
    # negative control: the untransposed mix is far outside the tolerance
    wrong = _f64(ref[1])[..., None] * _f64(y)[..., None, :] + _f64(ref[2]) @ _f64(X)
    assert not _within([wrong], [exact], [tol])


@needs_cxx
def test_hc_pre_kernel_reproduces_official_sinkhorn_vectors(data_dir):
    """mixes chosen exactly: 4 tokens, d = 24, token t's flat stream is 1/4 on block t (24 entries)
    and 0 elsewhere, fn[r, 24 t + r] = mix[t, r] / 2: one nonzero product per dot, and with
    norm_eps = 0 the mean square is 1/64, rho = 8, so the kernel sees the official mixes exactly."""
    v = np.load(data_dir / "qat-vectors.npz")
    n = 4
    X = np.zeros((n, 96), np.float32)
    fn = np.zeros((24, 96), np.float32)
    for t in range(n):
        X[t, 24 * t : 24 * t + 24] = 0.25
        fn[np.arange(24), 24 * t + np.arange(24)] = v["hc_mixes"][t] / 2
    X = X.reshape(n, 4, 24)
    u, post, comb = _run_pre(PRE, X, fn, v["hc_scale"], v["hc_base"], norm_eps=0.0)
    assert np.abs(post - v["hc_post"][:n]).max() <= SINKHORN_TOL
    assert np.abs(comb - v["hc_comb"][:n]).max() <= SINKHORN_TOL
    u_exact = np.einsum("tk,tkd->td", v["hc_pre"][:n].astype(np.float64), X)  # pre through u
    assert np.abs(u - u_exact).max() <= SINKHORN_TOL * 0.25 + 4 * U * np.abs(u_exact).max()


CASES = {  # lead dims, d, dtype
    "one token, d = 64": ((1,), 64, mx.float32),
    "3 tokens, ragged d = 40": ((3,), 40, mx.float32),
    "17 tokens, d = 72 (9 SIMD groups)": ((17,), 72, mx.float32),
    "d = 200: 512 threads, 1-2 elements each": ((1,), 200, mx.float32),
    "bf16, batch 2 x 3, d = 40": ((2, 3), 40, mx.bfloat16),
    "bf16, 17 tokens, d = 64": ((17,), 64, mx.bfloat16),
}


@needs_cxx
@pytest.mark.parametrize("what", list(CASES))
def test_kernels_match_references(what):
    lead, d, dtype = CASES[what]
    X, fn, scale, base, y = _case(lead, d, seed=len(what), dtype=dtype)
    n = X.size // (4 * d)
    ref = hc.hc_pre_reference(X, fn, scale, base, 20, EPS, NORM_EPS)
    _, tols = _oracle_pre(X, fn, scale, base)
    outs = _run_pre(PRE, X.reshape(n, 4, d), fn, scale, base)
    tols = [t.reshape(n, *t.shape[len(lead):]) for t in tols]
    assert _within(outs, [r.reshape(n, *r.shape[len(lead):]) for r in ref], tols)
    _, post, comb = (r.reshape(n, *r.shape[len(lead):]) for r in ref)
    out = _run_post(POST, y.reshape(n, d), X.reshape(n, 4, d), post, comb)
    _, tol = _oracle_post(y.reshape(n, d), X.reshape(n, 4, d), post, comb)
    assert _within([out], [hc.hc_post_reference(y.reshape(n, d), X.reshape(n, 4, d), post, comb)], [tol])


@needs_cxx
def test_dispatch_kernel_on_metal_reference_otherwise(monkeypatch):
    """The model's hc_pre / hc_post (mlx_dsv4.mhc) take the fused kernels when use_kernels(), with
    leading batch dims, and the references for MLX_DSV4_REFERENCE=1 or hc != 4."""
    monkeypatch.delenv(registry.REFERENCE_ENV, raising=False)
    fakes = {name: CpuKernel(load_spec(name)) for name in ("hc_pre", "hc_post", "sinkhorn_split")}
    monkeypatch.setattr(registry, "metal_available", lambda: True)
    monkeypatch.setattr(registry, "get_kernel", lambda name: fakes[name])
    X, fn, scale, base, y = _case((2, 3), 40, seed=5, dtype=mx.bfloat16)
    ref = hc.hc_pre_reference(X, fn, scale, base, 20, EPS, NORM_EPS)  # the split on its own kernel
    assert fakes["sinkhorn_split"].calls == 1
    _, tols = _oracle_pre(X, fn, scale, base)
    out = model_mhc.hc_pre(X, fn, scale, base, 20, EPS, NORM_EPS)
    assert fakes["hc_pre"].calls == 1 and [o.shape for o in out] == [(2, 3, 40), (2, 3, 4), (2, 3, 4, 4)]
    assert out[0].dtype == mx.bfloat16 and _within(out, ref, tols)
    X2 = model_mhc.hc_post(y, X, out[1], out[2])
    _, tol = _oracle_post(y, X, out[1], out[2])
    assert fakes["hc_post"].calls == 1 and X2.shape == X.shape
    assert _within([X2], [hc.hc_post_reference(y, X, out[1], out[2])], [tol])
    X3 = X[..., :3, :]  # hc = 3: references only (the split's too: mixes are 15 wide)
    model_mhc.hc_post(y, X3, model_mhc.hc_pre(X3, fn[:15, :120], scale, base[:15], 20, EPS, NORM_EPS)[1],
                      mx.zeros((2, 3, 3, 3)))
    monkeypatch.setenv(registry.REFERENCE_ENV, "1")
    model_mhc.hc_post(y, X, *model_mhc.hc_pre(X, fn, scale, base, 20, EPS, NORM_EPS)[1:])
    assert [f.calls for f in fakes.values()] == [1, 1, 1]


def _pre_ok(X, fn, scale, base):
    ref = hc.hc_pre_reference(mx.array(X), mx.array(fn), mx.array(scale), mx.array(base), 20, EPS, NORM_EPS)
    _, tols = _oracle_pre(X, fn, scale, base)
    return lambda outs: _within(outs, ref, tols)


BROKEN_PRE = {
    "missing barrier before the cross-SIMD-group sum": (
        "threadgroup_barrier(mem_flags::mem_threadgroup);\nif (tid < NR) {", "if (tid < NR) {", "source"),
    "no SIMD reduction (lane 0's partial only)": ("simd_sum(acc[r])", "acc[r]", "source"),
    "column sum over the wrong lanes (xor 2 for xor 8)": (
        "return v + simd_shuffle_xor(v, 8);", "return v + simd_shuffle_xor(v, 2);", "header"),
    "off-by-one fn column": ("fn[r * W + i]", "fn[r * W + i + 1]", "source"),
    "last stream value dropped (in bounds)": ("i < W; i += nt", "i < W - 1; i += nt", "source"),
    "comb written transposed": ("comb[size_t(tok) * 16 + e] = c;",
                                "comb[size_t(tok) * 16 + (e % 4) * 4 + e / 4] = c;", "source"),
}


@needs_cxx
@pytest.mark.parametrize("what", list(BROKEN_PRE))
def test_broken_hc_pre_variants_are_caught(what):
    old, new, section = BROKEN_PRE[what]
    X, fn, scale, base, _ = (np.array(a) for a in _case((3,), 40, seed=11))
    ok = _pre_ok(X, fn, scale, base)
    assert ok(_run_pre(PRE, X, fn, scale, base))  # the intact kernel passes the same check
    assert_caught(lambda: _run_pre(variant(PRE, old, new, section), X, fn, scale, base), ok)


BROKEN_POST = {
    "comb not transposed (sum over its column index)": (
        "((c[k] * xs[0] + c[4 + k] * xs[1]) + c[8 + k] * xs[2]) + c[12 + k] * xs[3]",
        "((c[4 * k] * xs[0] + c[4 * k + 1] * xs[1]) + c[4 * k + 2] * xs[2]) + c[4 * k + 3] * xs[3]"),
    "off-by-one stream row": ("xs[i] = float(x[i * D]);", "xs[i] = float(x[i * D + 1]);"),
}


@needs_cxx
@pytest.mark.parametrize("what", list(BROKEN_POST))
def test_broken_hc_post_variants_are_caught(what):
    old, new = BROKEN_POST[what]
    X, fn, scale, base, y = _case((3,), 40, seed=12)
    _, post, comb = hc.hc_pre_reference(X, fn, scale, base, 20, EPS, NORM_EPS)
    ref = hc.hc_post_reference(y, X, post, comb)
    _, tol = _oracle_post(y, X, post, comb)
    ok = lambda outs: _within(outs, [ref], [tol])  # noqa: E731
    assert ok([_run_post(POST, y, X, post, comb)])
    assert_caught(lambda: [_run_post(variant(POST, old, new), y, X, post, comb)], ok)


def _post_case(d=40, dtype=mx.float32, seed=21, n=3):
    """X, fn, scale, base, the previous sub-layer's (y, post, comb) (a real split's, so comb is doubly
    stochastic) and the norm weight, for n tokens."""
    X, fn, scale, base, y = _case((n,), d, seed=seed, dtype=dtype)
    _, post, comb = hc.hc_pre_reference(X, fn[::-1], scale, base[::-1], 20, EPS, NORM_EPS)
    w = mx.array(np.random.default_rng(seed).uniform(0.5, 1.5, d).astype(np.float32))
    return X, fn, scale, base, (y, post, comb), w


def _post_ok(X, fn, scale, base, after, w):
    """X' within hc_post's tolerance of its reference, and the rest bit for bit what hc_pre gives on that X'
    (POST feeds the pre the values it stores: the same loops over the same values)."""
    ref_xn = hc.hc_post_reference(after[0], X, *after[1:])
    _, tol = _oracle_post(after[0], X, *after[1:])

    def ok(outs):
        u, post, comb, xn = outs
        plain = _run_pre(PRE, mx.array(xn).astype(X.dtype), fn, scale, base, norm=(w, 1e-6))
        return _within([xn], [ref_xn], [tol]) and all(np.array_equal(a, b) for a, b in zip((u, post, comb), plain))
    return ok


@needs_cxx
@pytest.mark.parametrize("d,dtype", [(40, mx.float32), (200, mx.bfloat16), (64, mx.float16)])
def test_hc_pre_after_a_sublayer_is_its_hc_post_then_hc_pre(d, dtype):
    """POST: the previous sub-layer's hc_post in the same launch. X' as hc_post.metal stores it (bit for bit
    here, where both compile alike), the rest exactly hc_pre's on X', and within the tolerances above of the
    references composed (hc_post_reference, then hc_pre_reference with the sub-layer norm)."""
    X, fn, scale, base, after, w = _post_case(d, dtype)
    outs = _run_pre(PRE, X, fn, scale, base, norm=(w, 1e-6), after=after)
    assert _post_ok(X, fn, scale, base, after, w)(outs)
    assert np.array_equal(outs[3], _run_post(POST, *after[:1], X, *after[1:]))
    xn = hc.hc_post_reference(after[0], X, *after[1:])
    ref = hc.hc_pre_reference(xn, fn, scale, base, 20, EPS, NORM_EPS, (w, 1e-6))
    tol = (np.abs(np.array(ref[0].astype(mx.float32))) + 1) * 8 * ULP[dtype]  # u carried through the norm
    assert np.abs(outs[0].astype(np.float64) - np.array(ref[0].astype(mx.float32))).max() <= tol.max()


BROKEN_POST_PRE = {
    "weighted sum over X, not X'": (
        "float(POST ? post_stream<T, D>(x, yt, pt, ct, j) : x[j])", "float(x[j])", "source"),
    "comb not transposed in X'": ("c[4 + k] * float(x[D + j])", "c[4 * k + 1] * float(x[D + j])", "header"),
    "y of the first token for every token": ("const auto yt = y + size_t(tok) * D;", "const auto yt = y;", "source"),
}


@needs_cxx
@pytest.mark.parametrize("what", list(BROKEN_POST_PRE))
def test_broken_post_pre_variants_are_caught(what):
    old, new, section = BROKEN_POST_PRE[what]
    X, fn, scale, base, after, w = _post_case()
    ok = _post_ok(X, fn, scale, base, after, w)
    assert ok(_run_pre(PRE, X, fn, scale, base, norm=(w, 1e-6), after=after))
    broken = variant(PRE, old, new, section)
    assert_caught(lambda: _run_pre(broken, X, fn, scale, base, norm=(w, 1e-6), after=after), ok)


@needs_cxx
def test_dispatch_of_hc_pre_after_a_sublayer(monkeypatch):
    """mhc.hc_pre(after=...) takes one hc_pre launch (no hc_post) where the kernels run, the two references
    otherwise, and both give X' fourth."""
    X, fn, scale, base, after, w = _post_case(n=1)
    X, after = X[None], tuple(a[None] for a in after)  # [B, L, ...]
    monkeypatch.delenv(registry.REFERENCE_ENV, raising=False)
    fakes = {name: CpuKernel(load_spec(name)) for name in ("hc_pre", "hc_post")}
    monkeypatch.setattr(registry, "metal_available", lambda: True)
    monkeypatch.setattr(registry, "get_kernel", lambda name: fakes[name])
    out = model_mhc.hc_pre(X, fn, scale, base, 20, EPS, NORM_EPS, (w, 1e-6), after=after)
    assert [f.calls for f in fakes.values()] == [1, 0] and [o.shape for o in out] == [
        (1, 1, 40), (1, 1, 4), (1, 1, 4, 4), X.shape]
    monkeypatch.setenv(registry.REFERENCE_ENV, "1")
    ref = model_mhc.hc_pre(X, fn, scale, base, 20, EPS, NORM_EPS, (w, 1e-6), after=after)
    assert [f.calls for f in fakes.values()] == [1, 0]
    _, tol = _oracle_post(after[0], X, *after[1:])
    assert _within([out[3]], [ref[3]], [tol]) and np.abs(np.array(out[0]) - np.array(ref[0])).max() <= 1e-5


def test_bad_input_is_refused():
    X, fn, scale, base, y = _case((2,), 8)
    with pytest.raises(ValueError, match="fn must be"):
        hc.hc_pre(X, fn[:, :16], scale, base, 20, EPS, NORM_EPS)
    with pytest.raises(ValueError, match="X must be"):
        hc.hc_pre(X[0, 0, 0], fn, scale, base, 20, EPS, NORM_EPS)
    with pytest.raises(ValueError, match="scale must be \\[3\\]"):
        hc.hc_pre(X, fn, scale[:2], base, 20, EPS, NORM_EPS)
    with pytest.raises(ValueError, match="iters must be"):
        hc.hc_pre_kernel(X, fn, scale, base, 0, EPS, NORM_EPS)
    with pytest.raises(ValueError, match="y \\[..., d\\]"):
        hc.hc_post(y[:, :4], X, mx.zeros((2, 4)), mx.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="comb must be"):
        hc.hc_post(y, X, mx.zeros((2, 4)), mx.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match="hc_post kernel"):
        hc.hc_post_kernel(y.astype(mx.float16), X, mx.zeros((2, 4)), mx.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="y \\[..., d\\]"):
        hc.hc_pre(X, fn, scale, base, 20, EPS, NORM_EPS, after=(y[:, :4], mx.zeros((2, 4)), mx.zeros((2, 4, 4))))
    with pytest.raises(ValueError, match="y must be in X's dtype"):
        hc.hc_pre_kernel(X, fn, scale, base, 20, EPS, NORM_EPS, after=(y.astype(mx.float16), mx.zeros((2, 4)),
                                                                       mx.zeros((2, 4, 4))))


def _norm_case(d, dtype, seed):
    X, fn, scale, base, _ = _case((5,), d, seed=seed, dtype=dtype)
    w = mx.array(np.random.default_rng(seed).uniform(0.5, 1.5, d).astype(np.float32))
    return X.reshape(5, 4, d), fn, scale, base, w


def _norm_ok(spec, X, fn, scale, base, w):
    """The fused sub-layer norm against rms_norm applied to the kernel's own u (so only the norm is
    judged): both take the same T-rounded u, sum its squares in another order (within D 2^-24
    relative) and round once to T: |diff| <= 1 ulp_T |ref| + D 2^-24 |ref| + the smallest normal."""
    u, post, comb = _run_pre(spec, X, fn, scale, base)
    y, post_n, comb_n = _run_pre(spec, X, fn, scale, base, norm=(w, 1e-6))
    ref = np.array(rms_norm(mx.array(u).astype(X.dtype), w, 1e-6).astype(mx.float32))
    tol = (ULP[X.dtype] + X.shape[-1] * U) * np.abs(ref) + 1e-30
    same_rest = np.array_equal(post, post_n) and np.array_equal(comb, comb_n)
    return same_rest and bool(np.all(np.abs(np.asarray(y, np.float64) - ref) <= tol)), y


@needs_cxx
@pytest.mark.parametrize("d,dtype", [(40, mx.float32), (200, mx.bfloat16), (72, mx.float16)])
def test_hc_pre_with_the_sublayer_norm(d, dtype):
    """NORM: u leaves through the sub-layer's RMSNorm; the whole thing also matches the reference
    (hc_pre_reference with norm) within the u tolerance carried through the norm."""
    X, fn, scale, base, w = _norm_case(d, dtype, seed=d)
    ok, y = _norm_ok(PRE, X, fn, scale, base, w)
    assert ok
    ref, _, _ = hc.hc_pre_reference(X, fn, scale, base, 20, EPS, NORM_EPS, (w, 1e-6))
    ref = np.array(ref.astype(mx.float32))
    assert np.abs(y - ref).max() <= 4 * ULP[dtype] * np.abs(ref).max()


BROKEN_NORM = {
    "missing barrier before the norm's cross-SIMD-group sum": (
        "    sq[sg] = ss;\n  }\n  threadgroup_barrier(mem_flags::mem_threadgroup);", "    sq[sg] = ss;\n  }"),
    "norm sum over the first SIMD group only": ("tot += sq[g];", "tot = sq[0];"),
    "weight index off by one": ("float(w[j])", "float(w[(j + 1) % D])"),
}


@needs_cxx
@pytest.mark.parametrize("what", list(BROKEN_NORM))
def test_broken_norm_variants_are_caught(what):
    X, fn, scale, base, w = _norm_case(200, mx.float32, seed=4)
    old, new = BROKEN_NORM[what]
    assert assert_caught(lambda: _norm_ok(variant(PRE, old, new), X, fn, scale, base, w), lambda r: r[0])
