"""Indexer q / key finishing: the reference vs the trained-format vectors, a float64 numpy Hadamard and the
unfused model path; the Metal kernel (CPU harness) vs the reference; dispatch; the Indexer wiring; broken
variants.

Tolerances, kernel vs reference:
- QAT outputs (FP4 values in T): exact, except that at most 1 in 1000 elements may sit one FP4 step
  away (|d| <= 2/3 of the block's max |value|, the largest e2m1 step being 2 scales with the block max
  >= 3 scales). Everything after RoPE is bit-exact by construction (same fp32 butterfly tree as
  MLX's hadamard_transform, same bits-derived scale, same midpoints: checked on the qat-vectors), but
  the harness's cos / sin (libm) differ from MLX's CPU polynomial by an ulp, and NORM sums squares in
  another order; an ulp moved before the bf16 rounding changes an FP4 code only when it crosses a
  bf16 rounding boundary that is also an e2m1 midpoint (~1e-6 per element). Measured here: 0.
- without QAT (rope, norm only): |d| <= 4 u_T (|r_2i| + |r_2i+1|) per rope pair (cos / sin within an ulp,
  three fp32 roundings, then one rounding to T that the ulp can tip), u_T the unit roundoff of T.
"""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from kernel_util import assert_caught, fake_metal, needs_cxx, variant

from mlx_dsv4 import formats
from mlx_dsv4.cache import LayerCache
from mlx_dsv4.indexer import Indexer
from mlx_dsv4.kernels import index_finish as ixf
from mlx_dsv4.kernels import registry
from mlx_dsv4.kernels.registry import load_spec
from mlx_dsv4.kernels.sim import kernels_on_cpu, run_metal_kernel_on_cpu
from mlx_dsv4.norm import RMSNorm
from mlx_dsv4.rope import apply_rope, cos_sin

SPEC = load_spec("index_finish")
VECTORS = Path(__file__).resolve().parent / "data" / "qat-vectors.npz"
UNIT = {mx.float32: 2.0**-24, mx.float16: 2.0**-11, mx.bfloat16: 2.0**-8}


def _freqs(r2, base=10000.0):
    return mx.array((1.0 / base ** (np.arange(r2) / r2)).astype(np.float32))


def _case(B, L, H, D, r2, norm, dtype, seed):
    """x [B, L, H, D] (H None: keys [B, L, D]), freqs, weight or None."""
    rng = np.random.default_rng(seed)
    shape = (B, L, D) if H is None else (B, L, H, D)
    x = mx.array((3 * rng.standard_normal(shape)).astype(np.float32)).astype(dtype)
    w = mx.array(rng.uniform(0.5, 1.5, D).astype(np.float32)) if norm else None
    return x, _freqs(r2), w


def _f64(a):
    return np.array(mx.array(a).astype(mx.float32), dtype=np.float64)


def _ok(out, ref, dtype, qat) -> bool:
    out, ref = _f64(out), _f64(ref)
    if out.shape != ref.shape or not np.isfinite(out).all():
        return False
    d = np.abs(out - ref)
    if qat:
        blockmax = np.abs(ref).reshape(*ref.shape[:-1], -1, 32).max(-1, keepdims=True)
        step = np.broadcast_to(blockmax, (*blockmax.shape[:-1], 32)).reshape(ref.shape) * (2 / 3)
        return bool((d > 0).mean() <= 1e-3 and (d <= step).all())
    pair = np.abs(ref).reshape(*ref.shape[:-1], -1, 2).sum(-1, keepdims=True)
    bound = 4 * UNIT[dtype] * np.broadcast_to(pair, (*pair.shape[:-1], 2)).reshape(ref.shape)
    return bool((d <= bound).all())


def _run(spec, x, freqs, pos0, step, qat, w=None, eps=1e-6, D=None):
    """D: the row width where x is [B, L, H D] (q as projected)."""
    D = D or x.shape[-1]
    threads = 32 * (x.size // D)
    (out,) = run_metal_kernel_on_cpu(  # x as the wrapper passes it: keys [B, n, D] unreshaped
        spec, [x, freqs, freqs if w is None else w, mx.array([pos0, step], mx.int32),
               mx.array([eps, D**-0.5], mx.float32)],
        {"T": x.dtype, "D": D, "R2": freqs.shape[0], "NORM": w is not None, "QAT": qat},
        (threads, 1, 1), (min(threads, 128), 1, 1), [x.shape], [x.dtype])
    return out


# ---- the reference ----------------------------------------------------------------------------------


def _sylvester(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _butterfly(x):
    """float32 radix-2 butterfly, strides increasing, one final scale: the kernel's summation tree."""
    y, n = np.array(x, np.float32), x.shape[-1]
    h = 1
    while h < n:
        y = y.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        y = np.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], axis=-2).reshape(x.shape)
        h *= 2
    return y * np.float32(n**-0.5)


def test_reference_against_vectors_float64_hadamard_and_the_butterfly():
    v = np.load(VECTORS)
    x = mx.array(v["idx_in"])
    rot = formats.hadamard(x)
    exact = v["idx_in"].astype(np.float64) @ _sylvester(128) / np.sqrt(128)
    bound = 8 * 2.0**-24 * np.abs(v["idx_in"]).astype(np.float64).sum(-1, keepdims=True) / np.sqrt(128)
    assert (np.abs(np.array(rot) - exact) <= bound).all()  # log2(128) + 1 roundings per output
    np.testing.assert_array_equal(np.array(rot), _butterfly(v["idx_in"]))  # the same tree, bit for bit
    np.testing.assert_array_equal(np.array(rot.astype(mx.bfloat16).astype(mx.float32)), v["idx_rot"])
    # at position 0 RoPE is the identity: the whole reference reproduces the trained vectors
    out = ixf.index_finish_reference(x.reshape(1, 1, 256, 128), _freqs(32), 0, 1, True)
    np.testing.assert_array_equal(np.array(out).reshape(256, 128), v["idx_out"])


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_reference_is_the_unfused_model_path(dtype):
    def rounded(y):  # the trained Hadamard + FP4, as the model's indexer applies it
        return formats.indexer_roundtrip(y).astype(y.dtype)

    q, fr, _ = _case(2, 3, 4, 32, 8, False, dtype, 1)
    cos, sin = cos_sin(mx.arange(5, 8), fr)
    want = rounded(apply_rope(q, cos[:, None], sin[:, None]))
    np.testing.assert_array_equal(_f64(ixf.index_finish_reference(q, fr, 5, 1, True)), _f64(want))
    c, fr, w = _case(2, 3, None, 32, 8, True, dtype, 2)
    norm = RMSNorm(32, 1e-6)
    norm.weight = w
    cos, sin = cos_sin(mx.arange(7, 10) * 4, fr)
    want = rounded(apply_rope(norm(c), cos, sin))
    np.testing.assert_array_equal(_f64(ixf.index_finish_reference(c, fr, 28, 4, True, w, 1e-6)), _f64(want))


# ---- the kernel -------------------------------------------------------------------------------------

CASES = {  # (B, L, H, D, R2, norm, pos0, step, dtype, qat); H None: keys [B, n, D]
    "Flash q decode, bf16": (1, 1, 8, 128, 32, False, 700, 1, mx.bfloat16, True),
    "Flash keys, norm, step 4, fp32": (2, 3, None, 128, 32, True, 96, 4, mx.float32, True),
    "tiny q prefill, ragged threadgroups, fp32": (2, 5, 3, 32, 8, False, 11, 1, mx.float32, True),
    "tiny keys, norm, step 4, bf16": (1, 7, None, 32, 8, True, 0, 4, mx.bfloat16, True),
    "no simulation: norm + rope only, fp32": (1, 2, 3, 128, 32, True, 40, 1, mx.float32, False),
    "no simulation, fp16, D 64": (2, 2, 2, 64, 16, False, 9, 1, mx.float16, False),
}


@needs_cxx
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name):
    B, L, H, D, r2, norm, pos0, step, dtype, qat = CASES[name]
    x, fr, w = _case(B, L, H, D, r2, norm, dtype, len(name))
    ref = ixf.index_finish_reference(x, fr, pos0, step, qat, w, 1e-6)
    out = _run(SPEC, x, fr, pos0, step, qat, w)
    assert _ok(out, ref, dtype, qat)
    if qat:  # stronger than the tolerance: on these inputs nothing moved
        np.testing.assert_array_equal(_f64(out), _f64(ref))


@needs_cxx
def test_kernel_reproduces_the_trained_vectors():
    v = np.load(VECTORS)
    out = _run(SPEC, mx.array(v["idx_in"]).reshape(1, 1, 256, 128), _freqs(32), 0, 1, True)
    np.testing.assert_array_equal(out.reshape(256, 128), v["idx_out"])


@needs_cxx
def test_dispatch_through_the_wrapper(monkeypatch):
    fake = fake_metal(monkeypatch, SPEC)
    x, fr, w = _case(2, 3, None, 128, 32, True, mx.float32, 3)
    ref = ixf.index_finish_reference(x, fr, 8, 4, True, w, 1e-6)
    assert _ok(ixf.index_finish(x, fr, 8, 4, True, w, 1e-6), ref, mx.float32, True) and fake.calls == 1
    ixf.index_finish(x[..., :16], fr[:4], 8, 4, True)  # D = 16: no kernel width, the reference
    monkeypatch.setenv(registry.REFERENCE_ENV, "1")
    ixf.index_finish(x, fr, 8, 4, True, w, 1e-6)
    assert fake.calls == 1
    with pytest.raises(ValueError, match="heads must be a positive int dividing"):
        ixf.index_finish(x, fr, 8, 4, True, heads=3)


@needs_cxx
def test_q_as_projected(monkeypatch):
    """q [B, L, H D] with heads=H, as its projection gives it (no reshape node before the launch): H rows of
    width D per token, through the wrapper against the reference on the [B, L, H, D] view (reference path too).
    Broken variant: the rank-3 rows read as one per token, which puts heads at other tokens' positions."""
    fake = fake_metal(monkeypatch, SPEC)
    x, fr, _ = _case(2, 3, 4, 128, 32, False, mx.bfloat16, 7)
    flat = x.reshape(2, 3, 512)
    ref = ixf.index_finish_reference(x, fr, 40, 1, True)
    got = ixf.index_finish(flat, fr, 40, 1, True, heads=4)
    assert fake.calls == 1 and got.shape == (2, 3, 4, 128) and _ok(got, ref, mx.bfloat16, True)
    monkeypatch.setenv(registry.REFERENCE_ENV, "1")
    np.testing.assert_array_equal(_f64(ixf.index_finish(flat, fr, 40, 1, True, heads=4)), _f64(ref))
    broken = variant(SPEC, "x_ndim == 4 ? x_shape[2] : x_shape[2] / D", "x_ndim == 4 ? x_shape[2] : 1")
    assert assert_caught(lambda: _run(broken, flat, fr, 40, 1, True, D=128).reshape(2, 3, 4, 128),
                         lambda o: _ok(o, ref, mx.bfloat16, True))


def _indexer_run(idx, toks, chunks):
    cache = LayerCache(4, 8)
    ids, start = [], 0
    for n in chunks:
        x = toks[:, start : start + n]
        ids.append(idx(x, x[..., :8], start, cache, _freqs(8), True, 1))  # k < entries: q is scored
        start += n
    return ids, cache.index_keys


@needs_cxx
def test_indexer_wiring(monkeypatch):
    """The Indexer's q and keys go through index_finish: with kernels on it runs for both and gives the
    reference path's keys (within the kernel tolerance) and the same top-k ids."""
    mx.random.seed(3)
    idx = Indexer(dim=16, q_lora_rank=8, n_heads=4, head_dim=32, ratio=4, norm_eps=1e-6)
    idx.compressor.norm.weight = mx.random.uniform(0.5, 1.5, (32,))
    toks = mx.random.normal((2, 14, 16))
    monkeypatch.setenv(registry.REFERENCE_ENV, "1")
    ids, keys = _indexer_run(idx, toks, (9, 1, 4))
    monkeypatch.delenv(registry.REFERENCE_ENV)
    with kernels_on_cpu(schedules=("forward",)) as calls:
        ids_k, keys_k = _indexer_run(idx, toks, (9, 1, 4))
    assert calls["index_finish"] == 5  # q in all three calls, keys in the two that complete a window (9, 4)
    assert _ok(keys_k, keys, mx.float32, True)
    for a, b in zip(ids_k, ids):
        np.testing.assert_array_equal(np.array(a), np.array(b))


BROKEN = {  # (old, new, section)
    "wrong butterfly partner": ("simd_shuffle_xor(v[k], h)", "simd_shuffle_xor(v[k], h ^ 1)", "source"),
    "butterfly sign swapped on the high lanes": ("? u - v[k] :", "? v[k] - u :", "source"),
    "register stage skipped": ("for (int h = 1; h < V; h <<= 1)", "for (int h = 2; h < V; h <<= 1)", "source"),
    "off-by-one block scale": ("* e8m0(e);", "* e8m0(e + 1);", "header"),
    "ties rounded away from even": ("uint(a > 5.0f)", "uint(a >= 5.0f)", "header"),
    "rope partner from the wrong lane": ("simd_shuffle_xor(v[k], 1)", "simd_shuffle_xor(v[k], 2)", "source"),
    "off-by-one rope position": ("pos[0] + int(t) * pos[1]", "pos[0] + int(t + 1) * pos[1]", "source"),
    "norm over one register only": ("ss += v[k] * v[k];", "ss = v[k] * v[k];", "source"),
    "keys' heads read from the shape": ("(row / (x_ndim == 4 ? x_shape[2] : x_shape[2] / D))", "(row / x_shape[2])",
                                        "source"),
}


def _ties():
    """Keys whose only nonzero channel (0, outside the rope) is c with bf16(c / sqrt(128)) = +-5 2^k:
    every Hadamard output is an e2m1 tie between 4 and 6 (scaled), which nearest-even sends to 4."""
    c = 5 * np.sqrt(128) * np.array([1, -2.0**-3, 2.0**5, -2.0**-20])
    x = np.zeros((1, 4, 128), np.float32)
    x[0, :, 0] = c
    return mx.array(x)


@needs_cxx
@pytest.mark.parametrize("what", list(BROKEN))
def test_broken_variants_are_caught(what):
    """No threadgroup memory and no barriers by design (lanes exchange values only through SIMD
    shuffles), so there is no barrier to drop; the hazards are partners, strides, scales and order."""
    old, new, section = BROKEN[what]
    x, fr, w = _case(2, 3, None, 128, 32, True, mx.float32, 5)
    if "ties" in what:
        x, w = _ties(), None
    ref = ixf.index_finish_reference(x, fr, 100, 4, True, w, 1e-6)
    assert _ok(_run(SPEC, x, fr, 100, 4, True, w), ref, mx.float32, True)
    broken = variant(SPEC, old, new, section)
    assert assert_caught(lambda: _run(broken, x, fr, 100, 4, True, w), lambda o: _ok(o, ref, mx.float32, True))


def test_bad_input_is_refused():
    x, fr, w = _case(1, 2, 3, 32, 8, False, mx.float32, 0)
    with pytest.raises(ValueError, match="x must be"):
        ixf.index_finish(x[0, 0], fr, 0, 1, True)
    with pytest.raises(ValueError, match="freqs must be"):
        ixf.index_finish(x, _freqs(17), 0, 1, True)
    with pytest.raises(ValueError, match="pos_step"):
        ixf.index_finish(x, fr, 0, 0, True)
    with pytest.raises(ValueError, match="weight must be"):
        ixf.index_finish(x, fr, 0, 1, True, mx.ones((31,)))
    with pytest.raises(ValueError, match="D=48"):
        ixf.index_finish_kernel(mx.zeros((1, 2, 48)), fr, 0, 1, True)
