"""Routed experts on mxfp4 weights: the pure-MLX reference and the Metal kernels
(metal_kernels/experts_gate_up.metal, metal_kernels/experts_down.metal).

x [N, d], ids [N, k], weights [N, k] float32 -> y [N, d] float32 = sum_j expert_{ids[n, j]}(x[n]):
h = silu(min(x w1^T, limit)) * clip(x w3^T, -limit, limit) in float32, then round_T(h * weight)
(T = x.dtype; the reference model scales before w2), then w2, summed over the k experts in float32.
Each projection is an mxfp4 pair (weight uint32 [E, out, in/8], 8 e2m1 codes per word, lowest
nibble first; scales uint8 [E, out, in/32], E8M0 2^(b-127)), as mlx-lm's QuantizedSwitchLinear
holds it with mode "mxfp4". Unlike the model's gather_qmm path, gate and up stay float32 for any T.
"""

from __future__ import annotations

import mlx.core as mx

from . import registry

KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
ROWS = 4  # output rows per SIMD group in both kernels (R in the .metal files)
GROUP = 32  # mxfp4 group size


def _swiglu(g: mx.array, u: mx.array, limit: float) -> mx.array:
    g = mx.minimum(g, limit)
    return g * mx.sigmoid(g) * mx.clip(u, -limit, limit)


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


def _check_gate_up(x, ids, w1, w3) -> tuple[int, int, int, int]:
    """(N, k, d, inter) after validating x, ids, w1 and w3."""
    if x.ndim != 2:
        raise ValueError(f"routed experts: x must be [N, d], got shape {x.shape}")
    N, d = x.shape
    if ids.ndim != 2 or ids.shape[0] != N or not mx.issubdtype(ids.dtype, mx.integer):
        raise ValueError(f"routed experts: ids must be integer [{N}, k], got {ids.dtype} {ids.shape}")
    E, inter, _ = _check_pair("w1", w1, None, None, d)
    _check_pair("w3", w3, E, inter, d)
    return N, ids.shape[1], d, inter


def _check(x, ids, weights, w1, w3, w2) -> tuple[int, int, int, int]:
    N, k, d, inter = _check_gate_up(x, ids, w1, w3)
    if weights.shape != ids.shape:
        raise ValueError(f"routed experts: weights must be [N, k] like ids {ids.shape}, got {weights.shape}")
    _check_pair("w2", w2, w1[0].shape[0], d, inter)
    return N, k, d, inter


def _qmm(x: mx.array, w, idx: mx.array) -> mx.array:
    return mx.gather_qmm(x, w[0], w[1], rhs_indices=idx, transpose=True, group_size=GROUP, bits=4, mode="mxfp4")


def gate_up_reference(x: mx.array, ids: mx.array, w1, w3, limit: float) -> mx.array:
    """h [N, k, inter] float32: the clamped SwiGLU of the selected experts' gate and up rows."""
    xe = x.astype(mx.float32)[:, None, None, :]  # [N, 1, 1, d] against ids [N, k]
    return _swiglu(_qmm(xe, w1, ids), _qmm(xe, w3, ids), limit).squeeze(-2)


def down_reference(h: mx.array, ids: mx.array, weights: mx.array, w2, dtype: mx.Dtype) -> mx.array:
    """y [N, d] float32 = sum_j w2_j . round_dtype(h_j * weight_j)."""
    hs = (h * weights.astype(mx.float32)[..., None]).astype(dtype).astype(mx.float32)
    return _qmm(hs[..., None, :], w2, ids).squeeze(-2).sum(axis=-2)


def routed_experts_reference(x: mx.array, ids: mx.array, weights: mx.array, w1, w3, w2, limit: float) -> mx.array:
    _check(x, ids, weights, w1, w3, w2)
    return down_reference(gate_up_reference(x, ids, w1, w3, limit), ids, weights, w2, x.dtype)


def _kernel_ok(x: mx.array, d: int, inter: int) -> bool:
    return x.dtype in KERNEL_DTYPES and d % GROUP == 0 and inter % GROUP == 0


def _grid(rows: int, y: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    gx = 32 * -(-rows // ROWS)
    return (gx, y, 1), (min(gx, 256), 1, 1)


def gate_up_kernel(x: mx.array, ids: mx.array, w1, w3, limit: float) -> mx.array:
    """The Metal kernel experts_gate_up: h [N, k, inter] float32."""
    N, k, d, inter = _check_gate_up(x, ids, w1, w3)
    if not _kernel_ok(x, d, inter):
        raise ValueError(f"experts_gate_up kernel: x must be {KERNEL_DTYPES}, got {x.dtype}")
    if N * k == 0:
        return mx.zeros((N, k, inter), dtype=mx.float32)
    grid, tg = _grid(inter, N * k)
    (h,) = registry.launch(
        "experts_gate_up", [x, ids, w1[0], w1[1], w3[0], w3[1], mx.array(limit, dtype=mx.float32)],
        template={"T": x.dtype, "D": d, "I": inter, "K": k}, grid=grid, threadgroup=tg,
        output_shapes=[(N, k, inter)], output_dtypes=[mx.float32],
    )
    return h


def down_kernel(h: mx.array, ids: mx.array, weights: mx.array, w2, dtype: mx.Dtype) -> mx.array:
    """The Metal kernel experts_down: y [N, d] float32 (routing weights and the expert sum fused)."""
    if h.ndim != 3 or h.shape[:2] != ids.shape or ids.ndim != 2:
        raise ValueError(f"routed experts: h must be [N, k, inter] matching ids {ids.shape}, got {h.shape}")
    if weights.shape != ids.shape:
        raise ValueError(f"routed experts: weights must be [N, k] like ids {ids.shape}, got {weights.shape}")
    N, k, inter = h.shape
    _, d, _ = _check_pair("w2", w2, None, None, inter)
    if dtype not in KERNEL_DTYPES or inter % GROUP:
        raise ValueError(f"experts_down kernel: dtype must be one of {KERNEL_DTYPES}, got {dtype}")
    if N * k == 0:
        return mx.zeros((N, d), dtype=mx.float32)
    grid, tg = _grid(d, N)
    (y,) = registry.launch(
        "experts_down", [h.astype(mx.float32), ids, weights.astype(mx.float32), w2[0], w2[1]],
        template={"T": dtype, "D": d, "I": inter, "K": k}, grid=grid, threadgroup=tg,
        output_shapes=[(N, d)], output_dtypes=[mx.float32],
    )
    return y


def routed_experts(x: mx.array, ids: mx.array, weights: mx.array, w1, w3, w2, limit: float) -> mx.array:
    """y [N, d] float32: the two kernels on Metal, the reference elsewhere (or for other dtypes)."""
    N, k, d, inter = _check(x, ids, weights, w1, w3, w2)
    if registry.use_kernels() and _kernel_ok(x, d, inter):
        return down_kernel(gate_up_kernel(x, ids, w1, w3, limit), ids, weights, w2, x.dtype)
    return down_reference(gate_up_reference(x, ids, w1, w3, limit), ids, weights, w2, x.dtype)
