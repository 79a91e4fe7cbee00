"""Compressor pooling: the reference vs a float64 numpy loop written from the spec's formula (§4.1) and
vs the spec's token-by-token decode state machine, the Metal kernel (CPU harness) vs the reference,
dispatch through the wrapper and through a whole Compressor over two chunks, broken variants.

Tolerance (elementwise), with S slots (2m with overlap, else m) and w the softmax weights:
- kernel vs reference: 4 (S + 4) 2^-24 sum_s w_s |a_s|. Both compute the same max and exp(g - max)
  (within ~4 ulp each on Metal, ~1 here), then sum S terms in fp32 in different orders and divide
  at a different point; each is within (S + 4) u of exact times that magnitude, u = 2^-24.
- reference vs float64: the same bound (the reference alone is well within it).
"""

import mlx.core as mx
import numpy as np
import pytest
from kernel_util import assert_caught, fake_metal, needs_cxx, variant

from mlx_dsv4.cache import CompressorState
from mlx_dsv4.compressor import Compressor
from mlx_dsv4.kernels import compressor_pool as cp
from mlx_dsv4.kernels import registry
from mlx_dsv4.kernels.registry import load_spec
from mlx_dsv4.kernels.sim import run_metal_kernel_on_cpu

SPEC = load_spec("compressor_pool")
U = 2.0**-24


def _windows(B, n, m, D, overlap, seed, prev=False, inf_prev=False):
    rng = np.random.default_rng(seed)
    W = 2 * D if overlap else D
    wa = rng.standard_normal((B, n, m, W)).astype(np.float32)
    wg = (2 * rng.standard_normal((B, n, m, W))).astype(np.float32)
    pa = pg = None
    if prev:
        pa = rng.standard_normal((B, m, D)).astype(np.float32)
        pg = (2 * rng.standard_normal((B, m, D))).astype(np.float32)
        if inf_prev:
            pg[rng.random(pg.shape) < 0.3] = -np.inf
    return wa, wg, pa, pg


def _oracle(wa, wg, pa, pg, overlap):
    """float64 loop over (b, j, f): (entries, sum_s w_s |a_s|)."""
    B, n, m, W = wa.shape
    D = W // 2 if overlap else W
    out, mag = np.zeros((B, n, D)), np.zeros((B, n, D))
    for b in range(B):
        for j in range(n):
            for f in range(D):
                if not overlap:
                    a, g = wa[b, j, :, f], wg[b, j, :, f]
                else:
                    if j > 0:
                        a0, g0 = wa[b, j - 1, :, f], wg[b, j - 1, :, f]
                    elif pa is not None:
                        a0, g0 = pa[b, :, f], pg[b, :, f]
                    else:
                        a0, g0 = np.zeros(m), np.full(m, -np.inf)
                    a = np.concatenate([a0, wa[b, j, :, D + f]])
                    g = np.concatenate([g0, wg[b, j, :, D + f]])
                a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
                e = np.exp(g - g.max())
                w = e / e.sum()
                out[b, j, f], mag[b, j, f] = (w * a).sum(), (w * np.abs(a)).sum()
    return out, mag


def _ok(got, want, mag, slots) -> bool:
    return bool((np.abs(np.asarray(got, np.float64) - want) <= 4 * (slots + 4) * U * mag).all())


def _mx(*xs):
    return [None if x is None else mx.array(x) for x in xs]


REF_CASES = {  # (B, n, m, D, overlap, prev)
    "ratio 4, first call (no prev), n = 3": (2, 3, 4, 6, True, False),
    "ratio 4, later call with prev, n = 1": (1, 1, 4, 5, True, True),
    "ratio 4, later call with prev, n = 2": (2, 2, 4, 3, True, True),
    "ratio 8, no overlap, n = 1": (1, 1, 8, 7, False, False),
    "ratio 16, no overlap, n = 3": (2, 3, 16, 4, False, False),
    "ratio 128, tiny width": (1, 2, 128, 3, False, False),
}


@pytest.mark.parametrize("name", list(REF_CASES))
def test_reference_matches_float64_loop(name):
    B, n, m, D, overlap, prev = REF_CASES[name]
    wa, wg, pa, pg = _windows(B, n, m, D, overlap, seed=len(name), prev=prev)
    exact, mag = _oracle(wa, wg, pa, pg, overlap)
    ref = cp.compressor_pool_reference(*_mx(wa, wg, pa, pg), overlap)
    assert ref.shape == (B, n, D) and ref.dtype == mx.float32
    assert _ok(ref, exact, mag, 2 * m if overlap else m)


def test_reference_state_carry_and_a_broken_layout_is_caught(monkeypatch):
    """Windows split over two calls (the second gets window 1's first half as prev) equal one call;
    an overlap layout that drops the previous window fails the oracle."""
    wa, wg, _, _ = _windows(2, 3, 4, 5, True, seed=1)
    whole = np.array(cp.compressor_pool_reference(*_mx(wa, wg), None, None, True))
    first = np.array(cp.compressor_pool_reference(*_mx(wa[:, :1], wg[:, :1]), None, None, True))
    later = cp.compressor_pool_reference(*_mx(wa[:, 1:], wg[:, 1:], wa[:, 0, :, :5], wg[:, 0, :, :5]), True)
    np.testing.assert_array_equal(np.concatenate([first, np.array(later)], axis=1), whole)

    def no_prev(wa, wg, pa, pg, D):
        z = mx.zeros((*wa.shape[:3], D))
        return mx.concatenate([z, wa[..., D:]], 2), mx.concatenate([z - mx.inf, wg[..., D:]], 2)

    exact, mag = _oracle(wa, wg, None, None, True)
    monkeypatch.setattr(cp, "overlap_slots", no_prev)
    assert not _ok(cp.compressor_pool_reference(*_mx(wa, wg), None, None, True), exact, mag, 8)


def _spec_stream(x, wkv, wgate, ape, m, overlap):
    """The spec's decode state machine, token by token in float64: a 2m-row (overlap) or m-row buffer;
    emit when (t + 1) % m == 0; with overlap, rows m..2m-1 then move to rows 0..m-1."""
    B, T, _ = x.shape
    W = wkv.shape[0]
    D = W // 2 if overlap else W
    base = m if overlap else 0
    ka = np.zeros((B, base + m, W))
    kg = np.full((B, base + m, W), -np.inf)
    out = []
    for t in range(T):
        ka[:, base + t % m] = x[:, t] @ wkv.T
        kg[:, base + t % m] = x[:, t] @ wgate.T + ape[t % m]
        if (t + 1) % m:
            continue
        if overlap:
            a = np.concatenate([ka[:, :m, :D], ka[:, m:, D:]], axis=1)
            g = np.concatenate([kg[:, :m, :D], kg[:, m:, D:]], axis=1)
        else:
            a, g = ka, kg
        e = np.exp(g - g.max(axis=1, keepdims=True))
        out.append((e * a).sum(axis=1) / e.sum(axis=1))
        if overlap:
            ka[:, :m], kg[:, :m] = ka[:, m:], kg[:, m:]
    return np.stack(out, axis=1)


def _compressor(ratio, dim, D, seed):
    rng = np.random.default_rng(seed)
    c = Compressor(dim, D, ratio, 1e-6)
    coff = 2 if ratio == 4 else 1
    wkv, wgate = (rng.standard_normal((coff * D, dim)).astype(np.float32) / np.sqrt(dim) for _ in range(2))
    c.wkv_gate.weight = mx.array(np.concatenate([wkv, wgate]))  # rows wkv, then wgate (load.to_model_layout)
    c.ape = mx.array(rng.standard_normal((ratio, coff * D)).astype(np.float32))
    return c, rng.standard_normal((2, 23, dim)).astype(np.float32)


def _pool_chunks(c, x, cuts):
    state, outs, firsts = CompressorState(), [], []
    for s, e in zip([0, *cuts], [*cuts, x.shape[1]]):
        out, first = c.pool(mx.array(x[:, s:e]), s, state)
        outs.append(np.array(out))
        firsts.append(first)
    return np.concatenate(outs, axis=1), firsts


@pytest.mark.parametrize("ratio", [4, 8])
def test_compressor_pool_over_chunks_matches_the_spec_stream(ratio):
    c, x = _compressor(ratio, 6, 5, seed=ratio)
    wkv, wgate = np.split(np.array(c.wkv_gate.weight, np.float64), 2)
    exact = _spec_stream(x.astype(np.float64), wkv, wgate, np.array(c.ape, np.float64), ratio, ratio == 4)
    got, firsts = _pool_chunks(c, x, [3, 10, 11])  # chunks end mid-window, complete several, complete none
    assert got.shape == exact.shape == (2, 23 // ratio, 5)
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-5)  # fp32 projections dominate the error
    assert firsts == [0, 0, 10 // ratio, 11 // ratio]


def _run(spec, wa, wg, pa, pg, overlap, tg=None, pos=None):
    """pos: wa / wg are a decode ring [B, 2m, 2D] and pos its position."""
    if pos is not None:
        B, n, m, W = wa.shape[0], 1, wa.shape[1] // 2, wa.shape[2]
    else:
        B, n, m, W = wa.shape if wa.ndim == 4 else (wa.shape[0], 1, *wa.shape[1:])  # [B, m, W]: one window
    D = W // 2 if overlap else W
    grid, tg0 = cp.launch_geometry(B, n, D)
    has = pa is not None
    at = np.array([0 if pos is None else pos], np.int32)
    (out,) = run_metal_kernel_on_cpu(spec, [wa, wg, pa if has else wa, pg if has else wg, at],
                                     {"RATIO": m, "OVERLAP": overlap, "HAS_PREV": has, "RING": pos is not None},
                                     grid, tg or tg0, [(B, n, D)], [np.float32])
    return out


KERNEL_CASES = {  # (B, n, m, D, overlap, prev, -inf in prev, threadgroup or None for the wrapper's)
    "decode, ratio 4, prev, partial SIMD group": (1, 1, 4, 40, True, True, False, None),
    "prefill, ratio 4, no prev, batch 2, partial threadgroup": (2, 3, 4, 300, True, False, False, None),
    "ratio 4, batch 3, -inf g in prev, 32-thread groups": (3, 2, 4, 45, True, True, True, (32, 1, 1)),
    "ratio 16 without overlap, batch 2": (2, 2, 16, 70, False, False, False, None),
    "ratio 128, tiny width": (1, 2, 128, 5, False, False, False, None),
}


@needs_cxx
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_matches_reference(name):
    B, n, m, D, overlap, prev, inf_prev, tg = KERNEL_CASES[name]
    wa, wg, pa, pg = _windows(B, n, m, D, overlap, seed=len(name), prev=prev, inf_prev=inf_prev)
    ref = np.array(cp.compressor_pool_reference(*_mx(wa, wg, pa, pg), overlap))
    _, mag = _oracle(wa, wg, pa, pg, overlap)
    assert _ok(_run(SPEC, wa, wg, pa, pg, overlap, tg), ref, mag, 2 * m if overlap else m)


@needs_cxx
@pytest.mark.parametrize("overlap, m", [(True, 4), (False, 16)], ids=["ratio 4, prev", "ratio 16"])
def test_one_window_without_its_axis(overlap, m):
    """A decode step's window as its ring holds it, [B, m, coff*D] (no n axis: no reshape node before the
    launch), is n = 1. Broken variant: n read from the shape's second axis (then the ratio), which puts
    batch row 1's window past the end."""
    wa, wg, pa, pg = _windows(2, 1, m, 33, overlap, seed=m, prev=overlap)
    ref = np.array(cp.compressor_pool_reference(*_mx(wa, wg, pa, pg), overlap))
    np.testing.assert_array_equal(np.array(cp.compressor_pool_reference(*_mx(wa[:, 0], wg[:, 0], pa, pg), overlap)),
                                  ref)
    _, mag = _oracle(wa, wg, pa, pg, overlap)
    got = _run(SPEC, wa[:, 0], wg[:, 0], pa, pg, overlap)
    assert got.shape == (2, 1, 33) and _ok(got, ref, mag, 2 * m if overlap else m)
    broken = variant(SPEC, "const uint n = wa_ndim == 4 && !RING ? wa_shape[1] : 1;", "const uint n = wa_shape[1];",
                     "source")
    assert assert_caught(lambda: _run(broken, wa[:, 0], wg[:, 0], pa, pg, overlap),
                         lambda out: _ok(out, ref, mag, 2 * m if overlap else m))


def _ring(B, m, D, pos, seed):
    """A decode ring [B, 2m, 2D] at position pos (ring_cache.py: position p in slot p % 2m; before the first
    window the other half holds a = 0, g = -inf) and the windows it holds as compressor_pool's arguments."""
    rng = np.random.default_rng(seed)
    ra = rng.standard_normal((B, 2 * m, 2 * D)).astype(np.float32)
    rg = (2 * rng.standard_normal((B, 2 * m, 2 * D))).astype(np.float32)
    j = pos // m
    this, prev = (j % 2) * m, ((j + 1) % 2) * m
    if j == 0:
        ra[:, prev:prev + m], rg[:, prev:prev + m] = 0, -np.inf
    wa, wg = ra[:, None, this:this + m], rg[:, None, this:this + m]
    pa, pg = ra[:, prev:prev + m, :D], rg[:, prev:prev + m, :D]
    return ra, rg, (wa, wg, pa, pg)


RING_POSITIONS = [1, 3, 6, 13]  # window 0 (previous half: a = 0, g = -inf), window 1 (halves swapped), 1, 3


@pytest.mark.parametrize("pos", RING_POSITIONS)
def test_reference_reads_a_ring_as_its_windows(pos):
    """The ring form pools exactly the windows the ring holds (the same reference on the sliced windows)."""
    ra, rg, wins = _ring(2, 4, 5, pos, seed=pos)
    want = cp.compressor_pool_reference(*_mx(*wins), True)
    got = cp.compressor_pool_reference(*_mx(ra, rg), None, None, True, mx.array(pos, mx.int32))
    assert got.shape == (2, 1, 5)
    np.testing.assert_array_equal(np.array(got), np.array(want))


@needs_cxx
@pytest.mark.parametrize("pos", RING_POSITIONS)
def test_kernel_reads_a_ring_in_place(pos):
    """RING: the kernel finds this window's half and the previous one's in the ring itself. Broken variant: the
    halves not alternated (window j always in the first half)."""
    ra, rg, wins = _ring(2, 4, 37, pos, seed=pos)
    ref = np.array(cp.compressor_pool_reference(*_mx(*wins), True))
    _, mag = _oracle(*wins, True)
    assert _ok(_run(SPEC, ra, rg, None, None, True, pos=pos), ref, mag, 8)
    broken = variant(SPEC, "((uint(pos[0]) / RATIO) % 2) * RATIO", "0", "source")
    if (pos // 4) % 2:  # the break shows where the window sits in the second half
        assert assert_caught(lambda: _run(broken, ra, rg, None, None, True, pos=pos), lambda out: _ok(out, ref, mag, 8))


@pytest.fixture
def fake(monkeypatch):
    return fake_metal(monkeypatch, SPEC)


@needs_cxx
def test_dispatch_through_the_wrapper(fake, monkeypatch):
    wa, wg, pa, pg = _windows(2, 2, 4, 9, True, seed=4, prev=True)
    ref = np.array(cp.compressor_pool_reference(*_mx(wa, wg, pa, pg), True))
    _, mag = _oracle(wa, wg, pa, pg, True)
    assert _ok(cp.compressor_pool(*_mx(wa, wg, pa, pg), True), ref, mag, 8) and fake.calls == 1
    monkeypatch.setenv(registry.REFERENCE_ENV, "1")
    np.testing.assert_array_equal(np.array(cp.compressor_pool(*_mx(wa, wg, pa, pg), True)), ref)
    assert fake.calls == 1
    monkeypatch.delenv(registry.REFERENCE_ENV)
    ra, rg, _ = _ring(2, 4, 9, 6, seed=5)
    ring = [mx.array(ra), mx.array(rg), None, None, True, mx.array(6, mx.int32)]
    ref = np.array(cp.compressor_pool_reference(*ring))
    assert _ok(cp.compressor_pool(*ring), ref, _oracle(*_ring(2, 4, 9, 6, seed=5)[2], True)[1], 8)
    assert fake.calls == 2
    tiny = _mx(*_windows(1, 1, 4, 1, True, seed=2, prev=True))  # prev of 4 elements: Metal constant space
    np.testing.assert_array_equal(np.array(cp.compressor_pool(*tiny, True)),
                                  np.array(cp.compressor_pool_reference(*tiny, True)))
    assert fake.calls == 2


@needs_cxx
@pytest.mark.parametrize("ratio", [4, 8])
def test_whole_compressor_over_two_chunks_uses_the_kernel(fake, monkeypatch, ratio):
    c, x = _compressor(ratio, 6, 40, seed=10 + ratio)
    got, _ = _pool_chunks(c, x, [9])  # the second call starts mid-window and carries prev (ratio 4)
    assert fake.calls == 2
    monkeypatch.setenv(registry.REFERENCE_ENV, "1")
    ref, _ = _pool_chunks(c, x, [9])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)  # S <= 16: well inside 80 u relative


BROKEN = {  # the case each runs on has a prev and n >= 2, so every break shows
    "overlap halves swapped": ("const uint lo = 0, hi = OVERLAP ? D : 0;", "const uint lo = OVERLAP ? D : 0, hi = 0;",
                               "source"),
    "off-by-one slot": ("acc += e * a[s * stride];", "acc += e * a[(s + 1) * stride];", "header"),
    "prev ignored": ("const bool has_prev = OVERLAP && (j > 0 || HAS_PREV || RING);",
                     "const bool has_prev = OVERLAP && (j > 0 || RING);", "source"),
    "previous window off by one": ("pa = wa + cur - RATIO * W + lo + f;", "pa = wa + cur + lo + f;", "source"),
}


@needs_cxx
@pytest.mark.parametrize("what", list(BROKEN))
def test_broken_variants_are_caught(what):
    old, new, section = BROKEN[what]
    wa, wg, pa, pg = _windows(2, 2, 4, 37, True, seed=9, prev=True)
    ref = np.array(cp.compressor_pool_reference(*_mx(wa, wg, pa, pg), True))
    _, mag = _oracle(wa, wg, pa, pg, True)
    assert _ok(_run(SPEC, wa, wg, pa, pg, True), ref, mag, 8)  # the intact kernel passes the same check
    broken = variant(SPEC, old, new, section)
    assert assert_caught(lambda: _run(broken, wa, wg, pa, pg, True), lambda out: _ok(out, ref, mag, 8))


def test_bad_input_is_refused():
    wa = mx.zeros((1, 2, 4, 6))
    with pytest.raises(ValueError, match="wa and wg must be"):
        cp.compressor_pool(wa, wa[..., :4], None, None, True)
    with pytest.raises(ValueError, match="wa and wg must be"):
        cp.compressor_pool(wa[0, 0, 0], wa[0, 0, 0], None, None, True)
    with pytest.raises(ValueError, match="even width"):
        cp.compressor_pool(wa[..., :5], wa[..., :5], None, None, True)
    with pytest.raises(ValueError, match="both be given"):
        cp.compressor_pool(wa, wa, mx.zeros((1, 4, 3)), None, True)
    with pytest.raises(ValueError, match="prev_a / prev_g must be"):
        cp.compressor_pool(wa, wa, mx.zeros((1, 4, 6)), mx.zeros((1, 4, 6)), True)
    with pytest.raises(ValueError, match="a ring takes overlap"):
        cp.compressor_pool(wa[:, 0], wa[:, 0], None, None, False, mx.array(3))
    with pytest.raises(ValueError, match="a ring takes overlap"):
        cp.compressor_pool(wa[:, 0], wa[:, 0], None, None, True, mx.array(3.0))
    with pytest.raises(ValueError, match="must be float32 and wa / prev_a at least 8"):
        cp.compressor_pool_kernel(wa.astype(mx.float16), wa.astype(mx.float16), None, None, True)
