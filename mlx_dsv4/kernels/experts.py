"""Routed experts on mxfp4 weights, optionally with the mxfp8 shared expert fused in: the pure-MLX
reference and the Metal kernels (metal_kernels/experts_gate_up.metal, metal_kernels/experts_down.metal).

x [N, d] (or any leading axes of N rows), ids [N, k], weights [N, k] float32 -> y [N, d] float32 (x's leading axes;
or rounded once to x's dtype, what a decode step adds to its stream) = sum_j expert_{ids[n, j]}(x[n]):
h = silu(min(x w1^T, limit)) * clip(x w3^T, -limit, limit) in float32, then round_T(h * weight)
(T = x.dtype; the reference model scales before w2), then w2, summed over the k experts in float32.
Each projection is an mxfp4 pair (weight uint32 [E, out, in/8], 8 e2m1 codes per word, lowest
nibble first; scales uint8 [E, out, in/32], E8M0 2^(b-127)), as mlx-lm's QuantizedSwitchLinear
holds it with mode "mxfp4". Unlike the model's gather_qmm path, gate and up stay float32 for any T.

shared = (w1s, w3s, w2s), mxfp8 pairs as nn.QuantizedLinear holds them (weight uint32 [out, in/4], 4
e4m3 bytes per word, lowest first; scales as above), adds the model's shared expert to y:
round_T(w2s . round_T(clamped_swiglu(round_T(x w1s^T), round_T(x w3s^T)))) in float32, i.e. the
Linear layers' outputs in T, no routing weight. The kernels run it as an extra slot K of each token.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import fuse, registry

KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
ROWS = 4  # output rows per SIMD group in both kernels (R in the .metal files)
GROUP = 32  # mx group size (mxfp4 and mxfp8)


def clamped_swiglu(gate: mx.array, up: mx.array, limit: float) -> mx.array:
    """silu(min(gate, limit)) * clip(up, -limit, limit) in float32 (routed and shared experts alike);
    one fused piece (kernels/fuse.py)."""
    return fuse.run(_swiglu, (float(limit),), gate, up)


def _swiglu(limit: float, gate: mx.array, up: mx.array) -> mx.array:
    gate = mx.minimum(gate.astype(mx.float32), limit)
    up = mx.clip(up.astype(mx.float32), -limit, limit)
    return nn.silu(gate) * up


def _check_pair(name: str, w, experts: int | None, out: int | None, inp: int | None) -> tuple[int, int, int]:
    if not (isinstance(w, (tuple, list)) and len(w) == 2):
        raise ValueError(f"routed experts: {name} must be an mxfp4 (weight, scales) pair")
    q, s = w
    if q.dtype != mx.uint32 or s.dtype != mx.uint8 or q.ndim != 3 or s.shape != (*q.shape[:2], q.shape[2] // 4):
        raise ValueError(f"routed experts: {name} must be (uint32 [E, out, in/8], uint8 [E, out, in/32]), "
                         f"got {q.dtype} {q.shape} and {s.dtype} {s.shape}")
    E, o, i = q.shape[0], q.shape[1], q.shape[2] * 8
    for want, got, what in ((experts, E, "experts"), (out, o, "rows"), (inp, i, "columns")):
        if want is not None and want != got:
            raise ValueError(f"routed experts: {name} has {got} {what}, expected {want} (shape {q.shape})")
    return E, o, i


def _check_shared_pair(name: str, w, out: int, inp: int) -> None:
    if not (isinstance(w, (tuple, list)) and len(w) == 2):
        raise ValueError(f"shared expert: {name} must be an mxfp8 (weight, scales) pair")
    q, s = w
    want_q, want_s = (out, inp // 4), (out, inp // GROUP)
    if q.dtype != mx.uint32 or s.dtype != mx.uint8 or q.shape != want_q or s.shape != want_s or inp % GROUP:
        raise ValueError(f"shared expert: {name} must be (uint32 {list(want_q)}, uint8 {list(want_s)}), "
                         f"got {q.dtype} {q.shape} and {s.dtype} {s.shape}")


def _check_shared(shared, d: int, inter: int) -> None:
    if shared is None:
        return
    if not (isinstance(shared, (tuple, list)) and len(shared) == 3):
        raise ValueError("shared expert: shared must be None or the (w1, w3, w2) mxfp8 pairs")
    _check_shared_pair("w1", shared[0], inter, d)
    _check_shared_pair("w3", shared[1], inter, d)
    _check_shared_pair("w2", shared[2], d, inter)


def _check_gate_up(x, ids, w1, w3) -> tuple[int, int, int, int]:
    """(N, k, d, inter) after validating x, ids, w1 and w3."""
    if x.ndim < 2:
        raise ValueError(f"routed experts: x must be [N, d] (or [..., d]), got shape {x.shape}")
    N, d = x.size // max(x.shape[-1], 1), x.shape[-1]
    if ids.ndim != 2 or ids.shape[0] != N or not mx.issubdtype(ids.dtype, mx.integer):
        raise ValueError(f"routed experts: ids must be integer [{N}, k], got {ids.dtype} {ids.shape}")
    E, inter, _ = _check_pair("w1", w1, None, None, d)
    _check_pair("w3", w3, E, inter, d)
    return N, ids.shape[1], d, inter


def _check(x, ids, weights, w1, w3, w2, shared=None) -> tuple[int, int, int, int]:
    N, k, d, inter = _check_gate_up(x, ids, w1, w3)
    if weights.shape != ids.shape:
        raise ValueError(f"routed experts: weights must be [N, k] like ids {ids.shape}, got {weights.shape}")
    _check_pair("w2", w2, w1[0].shape[0], d, inter)
    _check_shared(shared, d, inter)
    return N, k, d, inter


def _qmm(x: mx.array, w, idx: mx.array) -> mx.array:
    return mx.gather_qmm(x, w[0], w[1], rhs_indices=idx, transpose=True, group_size=GROUP, bits=4, mode="mxfp4")


def _linear8(x: mx.array, w) -> mx.array:
    """nn.QuantizedLinear (mxfp8, no bias), x's dtype in and out, summed in float32 as MLX's Metal
    quantized matmul does (its CPU path sums bfloat16 inputs in bfloat16: errors of 10^3 ulp)."""
    y = mx.quantized_matmul(x.astype(mx.float32), w[0], w[1], transpose=True, group_size=GROUP, bits=8, mode="mxfp8")
    return y.astype(x.dtype)


def gate_up_reference(x: mx.array, ids: mx.array, w1, w3, limit: float, shared=None) -> mx.array:
    """h [N, k (+ 1), inter] float32: the clamped SwiGLU of the selected experts' gate and up rows; with
    shared = (w1s, w3s) the shared expert's (from its gate and up in x's dtype) appended as slot k."""
    x = x.reshape(ids.shape[0], x.shape[-1])  # rows [N, d] (a step's [B, L, d])
    xe = x.astype(mx.float32)[:, None, None, :]  # [N, 1, 1, d] against ids [N, k]
    h = clamped_swiglu(_qmm(xe, w1, ids), _qmm(xe, w3, ids), limit).squeeze(-2)
    if shared is None:
        return h
    g, u = (_linear8(x, w).astype(mx.float32) for w in shared)
    return mx.concatenate([h, clamped_swiglu(g, u, limit)[:, None]], axis=1)


def down_reference(h: mx.array, ids: mx.array, weights: mx.array, w2, dtype: mx.Dtype, shared=None) -> mx.array:
    """y [N, d] float32 = sum_j w2_j . round_dtype(h_j * weight_j); with shared = w2s, + the shared
    expert's round_dtype(w2s . round_dtype(h_k)) (h's last slot)."""
    k = ids.shape[1]
    hs = (h[:, :k] * weights.astype(mx.float32)[..., None]).astype(dtype).astype(mx.float32)
    y = _qmm(hs[..., None, :], w2, ids).squeeze(-2).sum(axis=-2)
    if shared is None:
        return y
    return y + _linear8(h[:, k].astype(dtype), shared).astype(mx.float32)


def routed_experts_reference(x: mx.array, ids: mx.array, weights: mx.array, w1, w3, w2, limit: float,
                             shared=None, dtype: mx.Dtype = mx.float32) -> mx.array:
    _check(x, ids, weights, w1, w3, w2, shared)
    gu, down = (None, None) if shared is None else (shared[:2], shared[2])
    y = down_reference(gate_up_reference(x, ids, w1, w3, limit, gu), ids, weights, w2, x.dtype, down)
    return y.astype(dtype).reshape(x.shape)


def _kernel_ok(x: mx.array, d: int, inter: int) -> bool:
    # d inter >= 256: every weight and scale array has 8+ elements, so MLX binds it as `device` (the
    # address space the kernels' helper functions take), never `constant`
    return x.dtype in KERNEL_DTYPES and d % GROUP == 0 and inter % GROUP == 0 and d * inter >= 256


def _grid(rows: int, y: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    gx = 32 * -(-rows // ROWS)
    return (gx, y, 1), (min(gx, 256), 1, 1)


def gate_up_kernel(x: mx.array, ids: mx.array, w1, w3, limit: float, shared=None) -> mx.array:
    """The Metal kernel experts_gate_up: h [N, k (+ 1 with shared = (w1s, w3s)), inter] float32."""
    N, k, d, inter = _check_gate_up(x, ids, w1, w3)
    if shared is not None:
        _check_shared_pair("w1", shared[0], inter, d)
        _check_shared_pair("w3", shared[1], inter, d)
    if not _kernel_ok(x, d, inter):
        raise ValueError(f"experts_gate_up kernel: x must be {KERNEL_DTYPES}, got {x.dtype} (or d inter < 256)")
    ks = k + (shared is not None)
    if N * k == 0:
        return mx.zeros((N, ks, inter), dtype=mx.float32)
    w1s, w3s = shared or (w1, w3)  # without the shared expert: placeholders the kernel never reads
    grid, tg = _grid(inter, N * ks)
    (h,) = registry.launch(
        "experts_gate_up", [x, ids, *w1, *w3, registry.constant(limit, mx.float32), *w1s, *w3s],
        template={"T": x.dtype, "D": d, "I": inter, "K": k, "SHARED": shared is not None}, grid=grid,
        threadgroup=tg, output_shapes=[(N, ks, inter)], output_dtypes=[mx.float32],
    )
    return h


def down_kernel(h: mx.array, ids: mx.array, weights: mx.array, w2, dtype: mx.Dtype, shared=None, lead=None,
                out: mx.Dtype = mx.float32) -> mx.array:
    """The Metal kernel experts_down: y [N, d] float32 (routing weights and the expert sum fused; with
    shared = w2s the shared expert's down projection of h's last slot added). lead: y's leading axes (default
    (N,)); out: y's dtype, the float32 sum rounded once (written by the kernel: no reshape or cast node)."""
    ks = ids.shape[-1] + (shared is not None)
    if h.ndim != 3 or ids.ndim != 2 or h.shape[:2] != (ids.shape[0], ks):
        raise ValueError(f"routed experts: h must be [N, k{' + 1' if shared is not None else ''}, inter] "
                         f"matching ids {ids.shape}, got {h.shape}")
    if weights.shape != ids.shape:
        raise ValueError(f"routed experts: weights must be [N, k] like ids {ids.shape}, got {weights.shape}")
    N, k, inter = ids.shape[0], ids.shape[1], h.shape[2]
    _, d, _ = _check_pair("w2", w2, None, None, inter)
    if shared is not None:
        _check_shared_pair("w2", shared, d, inter)
    if dtype not in KERNEL_DTYPES or inter % GROUP or d * inter < 256:
        raise ValueError(f"experts_down kernel: dtype must be one of {KERNEL_DTYPES}, got {dtype} (or d inter < 256)")
    lead = (N,) if lead is None else tuple(lead)
    if N * k == 0:
        return mx.zeros((*lead, d), dtype=out)
    w2s = shared or w2  # a placeholder the kernel never reads without the shared expert
    grid, tg = _grid(d, N)
    (y,) = registry.launch(
        "experts_down", [h.astype(mx.float32), ids, weights.astype(mx.float32), *w2, *w2s],
        template={"T": dtype, "D": d, "I": inter, "K": k, "SHARED": shared is not None}, grid=grid,
        threadgroup=tg, output_shapes=[(*lead, d)], output_dtypes=[out],
    )
    return y


def routed_experts(x: mx.array, ids: mx.array, weights: mx.array, w1, w3, w2, limit: float,
                   shared=None, dtype: mx.Dtype = mx.float32) -> mx.array:
    """y [..., d] (x's leading axes) in `dtype` (the float32 sum rounded once), + the shared expert when given:
    the two kernels on Metal, the reference elsewhere (or for other dtypes)."""
    N, k, d, inter = _check(x, ids, weights, w1, w3, w2, shared)
    gu, down = (None, None) if shared is None else (shared[:2], shared[2])
    if registry.use_kernels() and _kernel_ok(x, d, inter):
        return down_kernel(gate_up_kernel(x, ids, w1, w3, limit, gu), ids, weights, w2, x.dtype, down, x.shape[:-1],
                           dtype)
    return routed_experts_reference(x, ids, weights, w1, w3, w2, limit, shared, dtype)
