"""The mxfp8 shared expert fused into the expert kernels (slot K of experts_gate_up, the second weight
set of experts_down): mxfp8 decoding against a float64 oracle from the e4m3 definition; both kernels
(CPU harness) against the reference; the wrapper and the model's MoE through the harness against the
reference path; broken variants; bad input.

Tolerances (u = 2^-24, u_T = T's unit roundoff; sums of |terms| from the float64 oracle), as in
test_kernel_experts.py with the shared expert as slot K of weight 1, plus its roundings to T:
- gate / up: kernel and reference sum the same D fp32 products in different orders: dg <= 2 (D + 2) u G
  (G = sum_d |w1 x|); the shared slot rounds g and u to T on both sides, so they may land on
  neighbouring T values: + 2 u_T |g|. Then |dh| <= 1.1 min(|u| + du, limit) dg + (|g| + dg) du + 8 u |h|.
- down, from the same h: hT bitwise equal; routed 2 (K I + 4) u S, shared 2 (I + 4) u Ss + 2 u_T Ss
  (its sum rounded to T on both sides), S = sum |w2| |hT| (the + 4 covers the final fp32 add).
- end to end: sum_j wt_j |w2_j| dh_j + 2 u_T (S + Ss) (a perturbed h may round hT to the neighbouring
  T value) + the down terms; 1 % slack for the float64 magnitudes standing in for the fp32 ones.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from kernel_util import assert_caught, needs_cxx, variant
from mlx.utils import tree_map
from mlx_lm.models.switch_layers import SwitchLinear
from test_kernel_experts import U32, UNIT, _decode, _weights, _within

from mlx_dsv4 import moe
from mlx_dsv4.config import from_hf_config
from mlx_dsv4.kernels import experts as ex
from mlx_dsv4.kernels import moe_router as router, registry
from mlx_dsv4.kernels.registry import load_spec
from mlx_dsv4.kernels.sim import kernels_on_cpu, run_metal_kernel_on_cpu
from mlx_dsv4.tiny import tiny_hf_config

GATE_UP, DOWN = load_spec("experts_gate_up"), load_spec("experts_down")
CODES = np.setdiff1d(np.arange(256), [0x7F, 0xFF]).astype(np.uint8)  # e4m3fn without its NaNs


def _e4m3(c) -> np.ndarray:
    """e4m3fn by definition: sign, 4-bit exponent with bias 7, 3-bit mantissa; exponent 0 subnormal."""
    c = np.asarray(c).astype(np.int64)
    e, m = (c >> 3) & 15, (c & 7).astype(np.float64)
    mag = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7.0))
    return np.where(c & 0x80, -mag, mag)


def _decode8(q, s) -> np.ndarray:
    """Dequantize mxfp8 in float64: word w's byte i (lowest first) is element 4 w + i; 2^(b-127) per 32."""
    q = np.asarray(q).astype(np.uint64)
    c = ((q[..., None] >> (8 * np.arange(4, dtype=np.uint64))) & 255).reshape(*q.shape[:-1], -1)
    return _e4m3(c) * np.repeat(2.0 ** (np.asarray(s).astype(np.float64) - 127), 32, axis=-1)


def _mx8(w):
    return tuple(mx.quantize(mx.array(w.astype(np.float32)), group_size=32, bits=8, mode="mxfp8"))


def _raw8(rng, out, inp, std):
    """mxfp8 from codes: row r holds random signs and mantissas in binade r % 16 (subnormals, 448 and all
    between), its scale byte bringing it to ~std; NaN codes become 0x7e / 0xfe."""
    e = np.arange(out)[:, None] % 16
    codes = (rng.integers(0, 2, (out, inp)) << 7) | (e << 3) | rng.integers(0, 8, (out, inp))
    codes = np.where((codes & 0x7F) == 0x7F, codes - 1, codes).astype(np.uint8)
    b = 127 + round(np.log2(std)) - (np.maximum(e, 1) - 7)  # (1 + m/8) 2^(e - 7) 2^(b - 127) ~ std
    q = mx.array(np.ascontiguousarray(codes).view(np.uint32))  # little-endian: byte i of a word is element i
    return q, mx.array(np.repeat(b, inp // 32, axis=1).astype(np.uint8))


def _case(N, k, D, I, E, seed=0, dtype=mx.float32, limit=1.5, raw=False):
    """Routed mxfp4 and shared mxfp8 weights scaled so both clamps act at limit 1.5."""
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((N, D)).astype(np.float32)).astype(dtype)
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(N)])
    wt = mx.array(rng.uniform(0.1, 1.5, (N, k)).astype(np.float32))
    w1, w3 = (_weights(E, I, D, seed + i, 2 / np.sqrt(D)) for i in (1, 2))
    w2 = _weights(E, D, I, seed + 3, 1 / np.sqrt(I))
    if raw:
        s1, s3 = (_raw8(rng, I, D, 2 / np.sqrt(D)) for _ in range(2))
        s2 = _raw8(rng, D, I, 1 / np.sqrt(I))
    else:
        s1, s3 = (_mx8(rng.standard_normal((I, D)) * 2 / np.sqrt(D)) for _ in range(2))
        s2 = _mx8(rng.standard_normal((D, I)) / np.sqrt(I))
    return dict(x=x, ids=mx.array(ids, dtype=mx.uint32), wt=wt, w1=w1, w3=w3, w2=w2, shared=(s1, s3, s2),
                limit=limit)


def _oracle(c):
    """float64 g, u, h [N, k + 1, I] (slot k: the shared expert), |.| sums, W2 [N, k + 1, D, I], weights."""
    x = np.array(c["x"].astype(mx.float32), np.float64)
    ids = np.array(c["ids"])
    N = x.shape[0]

    def stack(routed, shared):
        S = _decode8(*shared)
        return np.concatenate([_decode(*routed)[ids], np.broadcast_to(S, (N, 1, *S.shape))], 1)

    W1, W3, W2 = (stack(c[n], c["shared"][i]) for i, n in enumerate(("w1", "w3", "w2")))
    g, u = np.einsum("nkid,nd->nki", W1, x), np.einsum("nkid,nd->nki", W3, x)
    G, U = np.einsum("nkid,nd->nki", abs(W1), abs(x)), np.einsum("nkid,nd->nki", abs(W3), abs(x))
    gc, uc = np.minimum(g, c["limit"]), np.clip(u, -c["limit"], c["limit"])
    wt = np.concatenate([np.array(c["wt"], np.float64), np.ones((N, 1))], 1)
    return dict(g=g, u=u, G=G, U=U, h=gc / (1 + np.exp(-gc)) * uc, W2=W2, wt=wt)


def _h_bound(o, c):
    D, uT = c["x"].shape[1], UNIT[c["x"].dtype]
    shared = np.zeros(o["g"].shape[1])
    shared[-1] = 2 * uT * 1.01  # the shared slot's g and u are rounded to T
    dg = 2 * (D + 2) * U32 * o["G"] + shared[:, None] * abs(o["g"])
    du = 2 * (D + 2) * U32 * o["U"] + shared[:, None] * abs(o["u"])
    return 1.1 * np.minimum(abs(o["u"]) + du, c["limit"]) * dg + (abs(o["g"]) + dg) * du + 8 * U32 * abs(o["h"])


def _down_terms(o, c, hT):
    """(routed S, shared Ss) and the down bound for hT [N, k + 1, I] (the same on both sides)."""
    I, k = hT.shape[2], hT.shape[1] - 1
    S = np.einsum("nkri,nki->nkr", abs(o["W2"]), abs(hT))
    Sr, Ss = S[:, :k].sum(1), S[:, k]
    return Sr, Ss, 2 * (k * I + 4) * U32 * Sr + (2 * (I + 4) * U32 + 2.02 * UNIT[c["x"].dtype]) * Ss


def _y_bound(o, c):
    """End to end, kernel vs reference."""
    uT = UNIT[c["x"].dtype]
    prop = np.einsum("nkri,nki->nr", abs(o["W2"]), _h_bound(o, c) * o["wt"][..., None])
    Sr, Ss, down = _down_terms(o, c, o["h"] * o["wt"][..., None])
    return 1.01 * (prop + 2 * uT * (Sr + Ss) + down)


def _gate_up(spec, c):
    N, D = c["x"].shape
    k, I = c["ids"].shape[1], c["w1"][0].shape[1]
    (h,) = run_metal_kernel_on_cpu(
        spec, [c["x"], c["ids"], *c["w1"], *c["w3"], mx.array(c["limit"]), *c["shared"][0], *c["shared"][1]],
        {"T": c["x"].dtype, "D": D, "I": I, "K": k, "SHARED": True}, *ex._grid(I, N * (k + 1)),
        [(N, k + 1, I)], [mx.float32])
    return h


def _down(spec, c, h):
    N, D = c["x"].shape
    k, I = c["ids"].shape[1], c["w1"][0].shape[1]
    (y,) = run_metal_kernel_on_cpu(
        spec, [h, c["ids"], c["wt"], *c["w2"], *c["shared"][2]],
        {"T": c["x"].dtype, "D": D, "I": I, "K": k, "SHARED": True}, *ex._grid(D, N), [(N, D)], [mx.float32])
    return y


def _h_ref(c):
    return ex.gate_up_reference(c["x"], c["ids"], c["w1"], c["w3"], c["limit"], c["shared"][:2])


def _down_ok(c, o, y, h):
    """The down kernel against down_reference from the same h."""
    wt = np.concatenate([np.array(c["wt"]), np.ones((h.shape[0], 1), np.float32)], 1)
    hT = np.array((h * mx.array(wt)[..., None]).astype(c["x"].dtype).astype(mx.float32), np.float64)
    want = ex.down_reference(h, c["ids"], c["wt"], c["w2"], c["x"].dtype, c["shared"][2])
    return _within(y, want, _down_terms(o, c, hT)[2])


def test_mxfp8_decoding_matches_mlx_dequantize():
    """The oracle is MLX's mxfp8 layout: every non-NaN e4m3 code, at several scales, and quantized weights."""
    rng = np.random.default_rng(0)
    codes = np.stack([rng.permutation(np.resize(CODES, 256)) for _ in range(6)])
    q, s = mx.array(codes.view(np.uint32)), mx.array(rng.integers(100, 150, (6, 8)).astype(np.uint8))
    want = np.array(mx.dequantize(q, s, group_size=32, bits=8, mode="mxfp8", dtype=mx.float32))
    np.testing.assert_array_equal(_decode8(q, s), want)
    assert _e4m3(0x7E) == 448 and _e4m3(0x01) == 2.0**-9 and _e4m3(0xB8) == -1  # spot values of the format
    q, s = _mx8(rng.standard_normal((8, 96)))
    want = np.array(mx.dequantize(q, s, group_size=32, bits=8, mode="mxfp8", dtype=mx.float32))
    np.testing.assert_array_equal(_decode8(q, s), want)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_reference_matches_oracle_and_the_model(dtype):
    """Within the reference's own error of the float64 oracle (half the kernel-vs-reference bounds,
    which allow two summation orders, apart from the roundings to T). In float32 the shared part is
    the model's Expert on nn.QuantizedLinear mxfp8 (the same ops: expected bit-equal); in bfloat16 on
    the CPU the Expert's quantized matmuls sum in bfloat16 (the reference, like Metal, in float32):
    within 2^-6 of the norm."""
    c = _case(3, 2, 64, 32, 5, seed=1, dtype=dtype)
    o = _oracle(c)
    assert (o["g"] > c["limit"]).any() and (abs(o["u"]) > c["limit"]).any()  # both clamps act
    assert _within(_h_ref(c), o["h"], _h_bound(o, c))
    y_exact = np.einsum("nkri,nki->nr", o["W2"], o["h"] * o["wt"][..., None])
    ref = ex.routed_experts_reference(c["x"], c["ids"], c["wt"], c["w1"], c["w3"], c["w2"], c["limit"], c["shared"])
    assert _within(ref, y_exact, _y_bound(o, c))
    e = moe.Expert(64, 32, c["limit"])
    nn.quantize(e, group_size=32, bits=8, mode="mxfp8")
    e.update({n: {"weight": w[0], "scales": w[1]} for n, w in zip(("w1", "w3", "w2"), c["shared"])})
    assert e.mxfp8() is not None
    routed = ex.routed_experts_reference(c["x"], c["ids"], c["wt"], c["w1"], c["w3"], c["w2"], c["limit"])
    model = np.array(routed + e(c["x"]).astype(mx.float32))
    if dtype == mx.float32:
        assert _within(ref, model, 0)
    else:
        assert np.linalg.norm(model - np.array(ref)) <= 2.0**-6 * np.linalg.norm(model)


SHAPES = {  # (N, k, D, I, E, dtype, raw codes)
    "decode N=1 k=1 fp32": (1, 1, 64, 32, 4, mx.float32, False),
    "N=3 k=2 bf16, ragged lane loop (40 mxfp8 words)": (3, 2, 160, 32, 5, mx.bfloat16, False),
    "N=3 fp32, every e4m3 code (a binade per row)": (3, 2, 64, 32, 4, mx.float32, True),
}


@needs_cxx
@pytest.mark.parametrize("name", list(SHAPES))
def test_gate_up_kernel_matches_reference(name):
    *shape, dtype, raw = SHAPES[name]
    c = _case(*shape, seed=len(name), dtype=dtype, raw=raw)
    if raw:
        assert set(np.unique(np.array(c["shared"][0][0]).view(np.uint8))) == set(CODES)
    o = _oracle(c)
    assert _within(_gate_up(GATE_UP, c), _h_ref(c), _h_bound(o, c))


DOWN_SHAPES = {
    "decode N=1 k=1 fp32": SHAPES["decode N=1 k=1 fp32"],
    "N=3 k=2 bf16, ragged lane loop (40 mxfp8 words)": (3, 2, 64, 160, 5, mx.bfloat16, False),
    "N=3 fp32, every e4m3 code (a binade per row)": SHAPES["N=3 fp32, every e4m3 code (a binade per row)"],
}


@needs_cxx
@pytest.mark.parametrize("name", list(DOWN_SHAPES))
def test_down_kernel_matches_reference(name):
    *shape, dtype, raw = DOWN_SHAPES[name]
    c = _case(*shape, seed=len(name), dtype=dtype, raw=raw)
    h = _h_ref(c)
    assert _down_ok(c, _oracle(c), _down(DOWN, c, h), h)


@needs_cxx
def test_down_writes_the_rounded_sum_in_the_streams_shape():
    """y in x's dtype with x's leading axes (what a decode step's stream takes: no cast or reshape node after the
    kernel) is the float32 sum rounded once, bit for bit as astype rounds it. Broken variant: the sum truncated
    to bfloat16 (not rounded to nearest even)."""
    c = _case(*DOWN_SHAPES["N=3 k=2 bf16, ragged lane loop (40 mxfp8 words)"][:5], seed=5, dtype=mx.bfloat16)
    h = _h_ref(c)
    N, D = c["x"].shape
    k, I = c["ids"].shape[1], c["w1"][0].shape[1]

    def run(spec, shape, dtype):
        return run_metal_kernel_on_cpu(spec, [h, c["ids"], c["wt"], *c["w2"], *c["shared"][2]],
                                       {"T": mx.bfloat16, "D": D, "I": I, "K": k, "SHARED": True}, *ex._grid(D, N),
                                       [shape], [dtype])[0]

    want = mx.array(run(DOWN, (N, D), mx.float32)).astype(mx.bfloat16).reshape(1, N, D)

    def same(y):
        return np.array_equal(np.array(mx.array(y).astype(mx.float32)), np.array(want.astype(mx.float32)))

    got = run(DOWN, (1, N, D), mx.bfloat16)
    assert got.shape == (1, N, D) and same(got)
    truncated = variant(DOWN, "y[size_t(n) * D + row0 + r] = s;",
                        "y[size_t(n) * D + row0 + r] = as_type<float>(as_type<uint>(s) & 0xFFFF0000u);")
    assert assert_caught(lambda: run(truncated, (1, N, D), mx.bfloat16), same)


def _moe(shared_format: str | None, seed=0):
    """The model's MoE at tiny Flash sizes (d 64, inter 32, 8 experts, top 2), routed mxfp4."""
    args = from_hf_config(tiny_hf_config("flash"))
    m = moe.MoE(args, hashed=False)
    rng = np.random.default_rng(seed)
    m.update(tree_map(lambda a: mx.array(rng.standard_normal(a.shape).astype(np.float32) * 0.2), m.parameters()))
    nn.quantize(m, class_predicate=lambda _p, mod: isinstance(mod, SwitchLinear), group_size=32, bits=4, mode="mxfp4")
    if shared_format:
        nn.quantize(m, class_predicate=lambda p, mod: "shared_experts" in p and isinstance(mod, nn.Linear),
                    group_size=32, bits=8, mode=shared_format)
    return m


def _moe_case(m, x, tokens):
    """The case (and oracle bound) for the MoE's own routing of x."""
    w, ids = m.gate(x, tokens)
    r, s = m.experts, m.shared_experts
    return dict(x=x, ids=ids, wt=w, w1=(r.w1.weight, r.w1.scales), w3=(r.w3.weight, r.w3.scales),
                w2=(r.w2.weight, r.w2.scales), shared=s.mxfp8(), limit=r.limit)


@needs_cxx
def test_wrapper_and_the_model_moe(monkeypatch):
    """fp32 within the end-to-end bound; bf16 within 2^-6 of the norm (the model's path rounds gate, up
    and each expert's output to bfloat16, the kernels keep them fp32: a few bfloat16 ulp)."""
    monkeypatch.setattr(moe.moe_router, "moe_router", router.moe_router_reference)  # the same routing on both paths
    m = _moe("mxfp8")
    x = mx.array(np.random.default_rng(3).standard_normal((2, 3, 64)).astype(np.float32))
    tokens = mx.array([[1, 2, 3], [4, 5, 6]])
    c = _moe_case(m, x.reshape(-1, 64), tokens.reshape(-1))
    bound = _y_bound(_oracle(c), c).reshape(2, 3, 64)
    monkeypatch.setenv(registry.REFERENCE_ENV, "1")
    ref, ref_b = m(x, tokens), m(x.astype(mx.bfloat16), tokens)
    big = mx.array(np.random.default_rng(4).standard_normal((1, 40, 64)).astype(np.float32))
    ref_big = m(big, mx.arange(40)[None])
    monkeypatch.delenv(registry.REFERENCE_ENV)
    with kernels_on_cpu(schedules=("forward",)) as calls:
        got = m(x, tokens)
        assert dict(calls) == {"experts_gate_up": 1, "experts_down": 1} and got.dtype == mx.float32
        assert _within(got, ref, bound)
        args = [c[n] for n in ("x", "ids", "wt", "w1", "w3", "w2", "limit")]
        assert _within(ex.routed_experts(*args, shared=c["shared"]), ref.reshape(-1, 64), bound.reshape(-1, 64))
        got_b = np.array(m(x.astype(mx.bfloat16), tokens).astype(mx.float32))
        assert np.linalg.norm(got_b - np.array(ref_b.astype(mx.float32))) <= 2.0**-6 * np.linalg.norm(got_b)
        assert _within(m(big, mx.arange(40)[None]), ref_big, 0)  # N k = 80: the existing path, bit for bit
        assert dict(calls) == {"experts_gate_up": 3, "experts_down": 3}
    seen = []
    routed = ex.routed_experts
    monkeypatch.setattr(ex, "routed_experts", lambda *a, **kw: seen.append(a[7]) or routed(*a, **kw))
    with kernels_on_cpu(schedules=("forward",)) as calls:
        _moe(None)(x, tokens)  # a dense shared expert: the routed kernels alone, the shared expert as before
    assert seen == [None] and dict(calls) == {"experts_gate_up": 1, "experts_down": 1}


BROKEN = {  # (kernel, old, new, section, case)
    "e4m3 bytes in reverse order": ("gate_up", "(q >> (BITS * i))", "(q >> (BITS == 8 ? 8 * (3 - i) : BITS * i))",
                                    "header", "N=3 k=2 bf16, ragged lane loop (40 mxfp8 words)"),
    "mxfp8 scale group off by one word": ("gate_up", "sa[row * G + w / BITS]",
                                          "sa[row * G + (BITS == 8 ? w + 1 : w) / BITS]", "header",
                                          "N=3 k=2 bf16, ragged lane loop (40 mxfp8 words)"),
    "e4m3 subnormals one binade high": ("gate_up", "0.001953125f", "0.00390625f", "header",
                                        "N=3 fp32, every e4m3 code (a binade per row)"),
    "down: mxfp8 scale group off by one word": ("down", "s[row * G + w / BITS]",
                                                "s[row * G + (BITS == 8 ? w + 1 : w) / BITS]", "header",
                                                "N=3 k=2 bf16, ragged lane loop (40 mxfp8 words)"),
    "down: shared slot given the first routing weight": ("down", "1.0f, w2s", "wt[n * K], w2s", "source",
                                                         "decode N=1 k=1 fp32"),
    "down: shared slot read from slot K - 1": ("down", "(size_t(n) * KS + K) * I", "(size_t(n) * KS + K - 1) * I",
                                               "source", "N=3 fp32, every e4m3 code (a binade per row)"),
}


@needs_cxx
@pytest.mark.parametrize("what", list(BROKEN))
def test_broken_variants_are_caught(what):
    kernel, old, new, section, case = BROKEN[what]
    if kernel == "gate_up":
        *shape, dtype, raw = SHAPES[case]
        c = _case(*shape, seed=4, dtype=dtype, raw=raw)
        o, ref = _oracle(c), _h_ref(c)
        ok = lambda h: _within(h, ref, _h_bound(o, c))  # noqa: E731
        assert ok(_gate_up(GATE_UP, c))  # the intact kernel passes the same check
        assert assert_caught(lambda: _gate_up(variant(GATE_UP, old, new, section), c), ok)
    else:
        *shape, dtype, raw = DOWN_SHAPES[case]
        c = _case(*shape, seed=4, dtype=dtype, raw=raw)
        o, h = _oracle(c), _h_ref(c)
        assert _down_ok(c, o, _down(DOWN, c, h), h)
        assert assert_caught(lambda: _down(variant(DOWN, old, new, section), c, h), lambda y: _down_ok(c, o, y, h))


def test_bad_shared_input_is_refused():
    c = _case(2, 2, 64, 32, 4)
    s1, s3, s2 = c["shared"]
    args = [c[n] for n in ("x", "ids", "wt", "w1", "w3", "w2", "limit")]
    for bad, msg in [
        ((s1, s3), "shared must be None or the \\(w1, w3, w2\\)"),
        ((s1, s3, c["w2"]), "shared expert: w2 must be \\(uint32 \\[64, 8\\]"),
        ((s1, (s3[0], s3[1].astype(mx.uint32)), s2), "shared expert: w3 must be"),
        ((s1[0], s3, s2), "shared expert: w1 must be an mxfp8"),
    ]:
        with pytest.raises(ValueError, match=msg):
            ex.routed_experts(*args, shared=bad)
    with pytest.raises(ValueError, match="h must be \\[N, k \\+ 1, inter\\]"):
        ex.down_kernel(mx.zeros((2, 2, 32)), c["ids"], c["wt"], c["w2"], mx.float32, s2)
    m = _moe("mxfp8")
    with pytest.raises(ValueError, match="shared is fused only on the kernel path"):
        m.experts(c["x"], c["ids"], c["wt"], m.shared_experts.mxfp8())
