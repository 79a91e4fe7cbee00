"""mxfp4 routed experts: the reference against a float64 numpy oracle (its own e2m1 / E8M0 decoding)
and the model's RoutedExperts; the two Metal kernels (CPU harness) against the reference; dispatch
through the wrapper and through RoutedExperts; broken kernel variants; bad input.

Tolerances (u = 2^-24; G = sum_d |w1 x|, U = sum_d |w3 x| per output row, S = sum |w2| |h wt|):
- gate / up: any order of summing the D fp32 products is within (D + 2) u G (U) of the exact value;
  kernel and reference sum in different orders, so each may differ by twice that. Through the clamps
  (1-Lipschitz) and silu (|silu'| <= 1.1, |silu(g)| <= |g|):
  |dh| <= 2 (D + 2) u (1.1 min(|u|, limit) G + |g| U) + 8 u |h| (exp and divide, a few ulp).
- down: with the same h, hT = round_T(h wt) is bitwise equal (one fp32 multiply, round to nearest
  even); the K I products then differ only in order: |dy| <= 2 (K I + 2) u S.
- end to end: sum_j |wt_j| sum_i |w2| |dh| + 2 u_T S (a perturbed h may round hT to the neighbouring
  T value: 2 u_T relative, u_T = 2^-8 for bfloat16, 2^-11 for float16, u for float32) + the down term.
Against the float64 oracle the factor 2 covers the reference alone (the oracle is exact).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from kernel_util import assert_caught, needs_cxx, variant

from mlx_dsv4.kernels import experts as ex
from mlx_dsv4.kernels import registry
from mlx_dsv4.kernels.registry import load_spec
from mlx_dsv4.kernels.sim import CpuKernel, run_metal_kernel_on_cpu
from mlx_dsv4.moe import RoutedExperts

U32 = 2.0**-24
UNIT = {mx.float32: U32, mx.float16: 2.0**-11, mx.bfloat16: 2.0**-8}
GATE_UP, DOWN = load_spec("experts_gate_up"), load_spec("experts_down")


def _decode(q, s) -> np.ndarray:
    """Dequantize mxfp4 in float64 from the bit fields (sign, 2-bit exponent, 1-bit mantissa)."""
    q = np.asarray(q).astype(np.uint64)
    c = ((q[..., None] >> (4 * np.arange(8, dtype=np.uint64))) & 15).reshape(*q.shape[:-1], -1)
    e, m = (c >> 1) & 3, (c & 1).astype(np.float64)
    mag = np.where(e == 0, 0.5 * m, (1 + 0.5 * m) * 2.0 ** (e.astype(np.float64) - 1))
    scale = 2.0 ** (np.asarray(s).astype(np.float64) - 127)
    return np.where(c & 8, -mag, mag) * np.repeat(scale, 32, axis=-1)


def _weights(E, out, inp, seed, std):
    w = mx.array(np.random.default_rng(seed).standard_normal((E, out, inp)).astype(np.float32) * std)
    return tuple(mx.quantize(w, group_size=32, bits=4, mode="mxfp4"))


def _case(N, k, D, I, E, seed=0, dtype=mx.float32, limit=1.5, ids=None):
    """Weights scaled so gate / up are ~N(0, 2): both clamps at limit 1.5 are active."""
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((N, D)).astype(np.float32)).astype(dtype)
    if ids is None:
        ids = np.stack([rng.choice(E, k, replace=False) for _ in range(N)])
    wt = mx.array(rng.uniform(0.1, 1.5, (N, k)).astype(np.float32))
    w1, w3 = (_weights(E, I, D, seed + i, 2 / np.sqrt(D)) for i in (1, 2))
    w2 = _weights(E, D, I, seed + 3, 1 / np.sqrt(I))
    return dict(x=x, ids=mx.array(ids, dtype=mx.uint32), wt=wt, w1=w1, w3=w3, w2=w2, limit=limit)


def _oracle(c):
    """float64 g, u, h [N, k, I], their bounds' magnitudes, and the dense pieces for y."""
    x = np.array(c["x"].astype(mx.float32), np.float64)
    ids = np.array(c["ids"])
    W1, W3, W2 = (_decode(*c[n])[ids] for n in ("w1", "w3", "w2"))  # [N, k, out, in]
    g, u = np.einsum("nkid,nd->nki", W1, x), np.einsum("nkid,nd->nki", W3, x)
    G, U = np.einsum("nkid,nd->nki", abs(W1), abs(x)), np.einsum("nkid,nd->nki", abs(W3), abs(x))
    gc, uc = np.minimum(g, c["limit"]), np.clip(u, -c["limit"], c["limit"])
    h = gc / (1 + np.exp(-gc)) * uc
    return dict(g=g, u=u, G=G, U=U, h=h, W2=W2, wt=np.array(c["wt"], np.float64))


def _h_bound(o, c, factor=2):
    D = c["x"].shape[1]
    dg = factor * (D + 2) * U32
    return dg * (1.1 * np.minimum(abs(o["u"]), c["limit"]) * o["G"] + abs(o["g"]) * o["U"]) + 8 * U32 * abs(o["h"])


def _y_bound(o, c, dh, factor=2):
    hw = abs(o["h"]) * o["wt"][..., None]
    S = np.einsum("nkri,nki->nr", abs(o["W2"]), hw)
    k, inter = o["h"].shape[1:]
    prop = np.einsum("nkri,nki->nr", abs(o["W2"]), dh * o["wt"][..., None])
    return prop + (2 * UNIT[c["x"].dtype] + factor * (k * inter + 2) * U32) * S * 1.01


def _within(got, want, bound) -> bool:
    return bool((abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)) <= bound).all())


def _gate_up(spec, c):
    N, D = c["x"].shape
    k, I = c["ids"].shape[1], c["w1"][0].shape[1]
    (h,) = run_metal_kernel_on_cpu(
        spec, [c["x"], c["ids"], *c["w1"], *c["w3"], mx.array(c["limit"]), *c["w1"], *c["w3"]],  # no shared slot
        {"T": c["x"].dtype, "D": D, "I": I, "K": k, "SHARED": False}, *ex._grid(I, N * k), [(N, k, I)], [mx.float32])
    return h


def _down(spec, c, h):
    N, D = c["x"].shape
    k, I = c["ids"].shape[1], c["w1"][0].shape[1]
    (y,) = run_metal_kernel_on_cpu(
        spec, [h, c["ids"], c["wt"], *c["w2"], *c["w2"]], {"T": c["x"].dtype, "D": D, "I": I, "K": k, "SHARED": False},
        *ex._grid(D, N), [(N, D)], [mx.float32])
    return y


def _ref(c):
    return ex.routed_experts_reference(c["x"], c["ids"], c["wt"], c["w1"], c["w3"], c["w2"], c["limit"])


def test_decoding_matches_mlx_dequantize():
    """The oracle's bit-field decoding is MLX's mxfp4 layout (low nibble first, scale 2^(b-127))."""
    q, s = _weights(3, 8, 96, 0, 1.0)
    want = np.array(mx.dequantize(q, s, group_size=32, bits=4, mode="mxfp4").astype(mx.float32))
    np.testing.assert_array_equal(_decode(q, s), want)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_reference_matches_float64_oracle(dtype):
    c = _case(3, 2, 96, 64, 5, seed=1, dtype=dtype)
    o = _oracle(c)
    assert (o["g"] > c["limit"]).any() and (abs(o["u"]) > c["limit"]).any()  # both clamps act
    h = ex.gate_up_reference(c["x"], c["ids"], c["w1"], c["w3"], c["limit"])
    dh = _h_bound(o, c, factor=1)
    assert _within(h, o["h"], dh)
    y_exact = np.einsum("nkri,nki->nr", o["W2"], o["h"] * o["wt"][..., None])
    assert _within(_ref(c), y_exact, _y_bound(o, c, dh, factor=1))


def _model(c):
    """A RoutedExperts holding the case's weights as mlx-lm QuantizedSwitchLinear (mxfp4)."""
    D, (E, I, _) = c["x"].shape[1], c["w1"][0].shape
    m = RoutedExperts(D, I, E, c["limit"])
    nn.quantize(m, group_size=32, bits=4, mode="mxfp4")
    m.update({n: {"weight": c[n][0], "scales": c[n][1]} for n in ("w1", "w2", "w3")})
    return m


@pytest.mark.parametrize("N,k", [(3, 2), (40, 2)])  # N k = 80: the model's sorted path
def test_reference_matches_the_model(N, k):
    """float32: the same gather_qmm and elementwise ops as RoutedExperts, expected bit-equal (the
    tolerance still allows reordering). bfloat16: the model rounds gate and up to bfloat16 before
    the SwiGLU (its gather_qmm outputs x's dtype), the reference keeps float32: a few bfloat16 ulp."""
    c = _case(N, k, 64, 32, 6, seed=2)
    m = _model(c)
    assert type(m.w1).__name__ == "QuantizedSwitchLinear" and m.w1.mode == "mxfp4"
    o = _oracle(c)
    assert _within(m(c["x"], c["ids"], c["wt"]), _ref(c), _y_bound(o, c, _h_bound(o, c)))
    xb = c["x"].astype(mx.bfloat16)
    got, want = np.array(m(xb, c["ids"], c["wt"])), np.array(_ref({**c, "x": xb}))
    assert np.linalg.norm(got - want) <= 2.0**-6 * np.linalg.norm(want)


SHAPES = {  # (N, k, D, I, E, dtype, ids)
    "decode N=1 k=1": (1, 1, 64, 32, 4, mx.float32, None),
    "N=4 k=3 bf16, experts repeated across tokens": (4, 3, 96, 64, 5, mx.bfloat16, [[0, 2, 4], [2, 0, 1],
                                                                                     [4, 2, 0], [0, 2, 3]]),
    "ragged lane loop (36 words) fp16": (2, 2, 288, 32, 4, mx.float16, None),
}


@needs_cxx
@pytest.mark.parametrize("name", list(SHAPES))
def test_gate_up_kernel_matches_reference(name):
    N, k, D, I, E, dtype, ids = SHAPES[name]
    c = _case(N, k, D, I, E, seed=len(name), dtype=dtype, ids=ids)
    o = _oracle(c)
    ref = ex.gate_up_reference(c["x"], c["ids"], c["w1"], c["w3"], c["limit"])
    assert _within(_gate_up(GATE_UP, c), ref, _h_bound(o, c))


DOWN_SHAPES = {  # the down kernel reduces over I: a ragged lane loop needs I = 288
    "decode N=1 k=1": (1, 1, 64, 32, 4, mx.float32, None),
    "N=4 k=3 bf16, experts repeated across tokens": SHAPES["N=4 k=3 bf16, experts repeated across tokens"],
    "ragged lane loop (36 words) fp32": (2, 2, 64, 288, 4, mx.float32, None),
}


def _down_ok(c, y, h_ref):
    """|dy| <= 2 (K I + 2) u S with hT taken from the same h (bitwise equal on both sides)."""
    hT = np.array((h_ref * c["wt"][..., None]).astype(c["x"].dtype).astype(mx.float32), np.float64)
    W2 = _decode(*c["w2"])[np.array(c["ids"])]
    k, I = hT.shape[1:]
    S = np.einsum("nkri,nki->nr", abs(W2), abs(hT))
    want = ex.down_reference(h_ref, c["ids"], c["wt"], c["w2"], c["x"].dtype)
    return _within(y, want, 2 * (k * I + 2) * U32 * S)


@needs_cxx
@pytest.mark.parametrize("name", list(DOWN_SHAPES))
def test_down_kernel_matches_reference(name):
    N, k, D, I, E, dtype, ids = DOWN_SHAPES[name]
    c = _case(N, k, D, I, E, seed=len(name), dtype=dtype, ids=ids)
    h = ex.gate_up_reference(c["x"], c["ids"], c["w1"], c["w3"], c["limit"])
    assert _down_ok(c, _down(DOWN, c, h), h)


def _fakes(monkeypatch):
    monkeypatch.delenv(registry.REFERENCE_ENV, raising=False)
    fakes = {"experts_gate_up": CpuKernel(GATE_UP), "experts_down": CpuKernel(DOWN)}
    monkeypatch.setattr(registry, "metal_available", lambda: True)
    monkeypatch.setattr(registry, "get_kernel", lambda name: fakes[name])
    return fakes


@needs_cxx
def test_dispatch_through_the_wrapper_and_the_model(monkeypatch):
    c = _case(2, 2, 64, 32, 6, seed=9)
    o = _oracle(c)
    bound = _y_bound(o, c, _h_bound(o, c))
    ref = _ref(c)
    m = _model(c)
    before = m(c["x"], c["ids"], c["wt"])  # the existing path (no Metal here)
    fakes = _fakes(monkeypatch)
    args = (c["x"], c["ids"], c["wt"], c["w1"], c["w3"], c["w2"], c["limit"])
    assert _within(ex.routed_experts(*args), ref, bound)
    assert [f.calls for f in fakes.values()] == [1, 1]
    got = m(c["x"], c["ids"], c["wt"])
    assert got.shape == before.shape and got.dtype == mx.float32 and _within(got, before, bound)
    assert [f.calls for f in fakes.values()] == [2, 2]
    big = _case(40, 2, 64, 32, 6, seed=9)  # N k = 80 rows: above the threshold, the existing path
    m(big["x"], big["ids"], big["wt"])
    monkeypatch.setenv(registry.REFERENCE_ENV, "1")
    assert _within(ex.routed_experts(*args), ref, 0) and _within(m(c["x"], c["ids"], c["wt"]), before, 0)
    assert [f.calls for f in fakes.values()] == [2, 2]


BROKEN = {  # (kernel, old, new, section); the header includes experts_common.h
    "nibble order reversed": ("gate_up", "(q >> (BITS * i))", "(q >> (BITS * (32 / BITS - 1 - i)))", "header"),
    "scale index off by one word (past the last row: guard page)": ("gate_up", "sa[row * G + w / BITS]",
                                                                     "sa[row * G + (w + 1) / BITS]", "header"),
    "scale groups of 64 (w / 8)": ("down", "s[row * G + w / BITS]", "s[row * G + w / (2 * BITS)]", "header"),
    "gate not clamped": ("gate_up", "metal::min(gs, limit)", "gs", "source"),
    "up not clipped": ("gate_up", "metal::clamp(us, -limit, limit)", "us", "source"),
    "half a SIMD reduction (xor 16 only)": ("down", "simd_sum(acc[r])",
                                            "acc[r] + simd_shuffle_xor(acc[r], 16)", "source"),
    "routing weight of the first slot only": ("down", "wt[p]", "wt[n * K]", "source"),
}


@needs_cxx
@pytest.mark.parametrize("what", list(BROKEN))
def test_broken_variants_are_caught(what):
    kernel, old, new, section = BROKEN[what]
    if kernel == "gate_up":
        c = _case(*SHAPES["N=4 k=3 bf16, experts repeated across tokens"][:5], seed=4, dtype=mx.float32)
        o = _oracle(c)
        ref = ex.gate_up_reference(c["x"], c["ids"], c["w1"], c["w3"], c["limit"])
        ok = lambda h: _within(h, ref, _h_bound(o, c))  # noqa: E731
        assert ok(_gate_up(GATE_UP, c))  # the intact kernel passes the same check
        assert assert_caught(lambda: _gate_up(variant(GATE_UP, old, new, section), c), ok)
    else:
        c = _case(*DOWN_SHAPES["ragged lane loop (36 words) fp32"][:5], seed=4)
        h = ex.gate_up_reference(c["x"], c["ids"], c["w1"], c["w3"], c["limit"])
        assert _down_ok(c, _down(DOWN, c, h), h)
        assert assert_caught(lambda: _down(variant(DOWN, old, new, section), c, h), lambda y: _down_ok(c, y, h))


def test_bad_input_is_refused():
    c = _case(2, 2, 64, 32, 4)
    args = dict(x=c["x"], ids=c["ids"], weights=c["wt"], w1=c["w1"], w3=c["w3"], w2=c["w2"], limit=1.0)
    for name, bad, msg in [
        ("x", c["x"][0], "x must be \\[N, d\\]"),
        ("ids", c["ids"].astype(mx.float32), "ids must be integer"),
        ("weights", c["wt"][:, :1], "weights must be \\[N, k\\]"),
        ("w1", c["w1"][0], "w1 must be an mxfp4 \\(weight, scales\\) pair"),
        ("w3", (c["w3"][0][:2], c["w3"][1][:2]), "w3 has 2 experts"),
        ("w2", (c["w2"][0], c["w2"][1].astype(mx.uint32)), "w2 must be \\(uint32"),
    ]:
        with pytest.raises(ValueError, match=msg):
            ex.routed_experts(**{**args, name: bad})
    with pytest.raises(ValueError, match="h must be \\[N, k, inter\\]"):
        ex.down_kernel(mx.zeros((2, 3, 32)), c["ids"], c["wt"], c["w2"], mx.float32)
