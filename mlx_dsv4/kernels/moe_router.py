"""MoE router: the pure-MLX reference and the Metal kernel (metal_kernels/moe_router.metal).

x [N, d] (or any leading axes of N rows), gate weight [E, d] -> (weights [N, k] float32, ids [N, k]):
z = x . weight^T in float32, s = sqrt(softplus(z)); ids = tid2eid[tokens] (hashed layers) or the top-k of s + bias (the bias
steers selection only); weights = s[ids] / sum(s[ids]) * route_scale (spec §5). The order of the k
ids within a token is unspecified (the experts' sum does not depend on it).
"""

from __future__ import annotations

import mlx.core as mx

from . import fuse, registry

KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
MAX_EXPERTS = 1024  # threadgroup memory holds two floats per expert; a lane owns at most 32 candidates
MAX_K = 32  # one lane per pick
# Tokens up to which the kernel runs: it reads the whole gate matrix once per token (one
# threadgroup each), which at decode is the same bytes as the GEMV; beyond, a GEMM amortises
# the weight reads and the ~10 small ops are negligible per token.
KERNEL_TOKENS = 16


def _check(x, weight, k, bias, tid2eid, tokens) -> tuple[int, int, int]:
    """(N, E, d) after validating the arguments."""
    if x.ndim < 2 or weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"moe_router: want x [N, d] (or [..., d]) and weight [E, d]; got x {x.shape}, "
                         f"weight {weight.shape}")
    N, d = x.size // max(x.shape[-1], 1), x.shape[-1]
    E = weight.shape[0]
    if not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(f"moe_router: k must be an int in [1, {E}], got {k!r}")
    if (bias is None) == (tid2eid is None):
        raise ValueError("moe_router: pass exactly one of bias (top-k routing) and tid2eid (hashed routing)")
    if bias is not None and bias.shape != (E,):
        raise ValueError(f"moe_router: bias must be [{E}], got {bias.shape}")
    if tid2eid is not None:
        if tid2eid.ndim != 2 or tid2eid.shape[1] != k or not mx.issubdtype(tid2eid.dtype, mx.integer):
            raise ValueError(f"moe_router: tid2eid must be integer [vocab, {k}], got {tid2eid.dtype} {tid2eid.shape}")
        if tokens is None or tokens.shape != (N,) or not mx.issubdtype(tokens.dtype, mx.integer):
            got = None if tokens is None else f"{tokens.dtype} {tokens.shape}"
            raise ValueError(f"moe_router: hashed routing needs integer tokens [{N}], got {got}")
    return N, E, d


def moe_router_reference(x: mx.array, weight: mx.array, k: int, route_scale: float, *, bias: mx.array | None = None,
                    tid2eid: mx.array | None = None, tokens: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Pure MLX: (weights [N, k] float32, ids [N, k]; int32 when hashed, uint32 from argpartition);
    one fused piece (kernels/fuse.py)."""
    N, _, d = _check(x, weight, k, bias, tid2eid, tokens)
    sel = (bias,) if tid2eid is None else (tid2eid, tokens)
    x = x.reshape(N, d)
    return fuse.run(_route, (k, float(route_scale), tid2eid is not None), x, weight, *sel)


def _route(k, route_scale, hashed, x, weight, *sel):
    z = x.astype(mx.float32) @ weight.astype(mx.float32).T
    s = mx.sqrt(mx.logaddexp(z, 0.0))  # stable softplus
    if hashed:
        tid2eid, tokens = sel
        ids = tid2eid[tokens]
    else:
        biased = s + sel[0].astype(mx.float32)
        # selection carries no gradient (training goes through the selected scores only)
        ids = mx.stop_gradient(mx.argpartition(-biased, kth=k - 1, axis=-1)[:, :k])
    w = mx.take_along_axis(s, ids, axis=-1)
    return w / w.sum(axis=-1, keepdims=True) * route_scale, ids


def _geometry(N: int, E: int, k: int, hashed: bool) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    tg = 32 * min(32, k if hashed else E)
    return (tg * N, 1, 1), (tg, 1, 1)


def _kernel_ok(x: mx.array, weight: mx.array, k: int) -> bool:
    return (x.dtype in KERNEL_DTYPES and weight.dtype in KERNEL_DTYPES and weight.shape[0] <= MAX_EXPERTS
            and k <= MAX_K)


def moe_router_kernel(x: mx.array, weight: mx.array, k: int, route_scale: float, *, bias: mx.array | None = None,
                 tid2eid: mx.array | None = None, tokens: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """The Metal kernel: one threadgroup per token; ids int32 (ties: lowest index first)."""
    N, E, d = _check(x, weight, k, bias, tid2eid, tokens)
    if not _kernel_ok(x, weight, k):
        raise ValueError(f"moe_router kernel: x and weight must be {KERNEL_DTYPES}, E <= {MAX_EXPERTS} and "
                         f"k <= {MAX_K}; got {x.dtype}, {weight.dtype}, E={E}, k={k}")
    hashed = tid2eid is not None
    if bias is not None and bias.dtype not in KERNEL_DTYPES:
        raise ValueError(f"moe_router kernel: bias must be {KERNEL_DTYPES}, got {bias.dtype}")
    if N == 0:
        return mx.zeros((0, k), dtype=mx.float32), mx.zeros((0, k), dtype=mx.int32)
    sel = tid2eid if hashed else bias
    grid, tg = _geometry(N, E, k, hashed)
    ids, weights = registry.launch(  # top-k routing reads no tokens: any array stands in (no extra op)
        "moe_router", [x, weight, sel, sel if tokens is None else tokens, registry.constant(route_scale, mx.float32)],
        template={"D": d, "E": E, "K": k, "HASHED": hashed}, grid=grid, threadgroup=tg,
        output_shapes=[(N, k), (N, k)], output_dtypes=[mx.int32, mx.float32],
    )
    return weights, ids


def moe_router(x: mx.array, weight: mx.array, k: int, route_scale: float, *, bias: mx.array | None = None,
          tid2eid: mx.array | None = None, tokens: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """(weights [N, k] float32, ids [N, k]): the kernel on Metal for up to KERNEL_TOKENS tokens, the
    reference otherwise."""
    kw = dict(bias=bias, tid2eid=tid2eid, tokens=tokens)
    small = x.ndim >= 2 and x.size <= KERNEL_TOKENS * x.shape[-1]
    if registry.use_kernels() and small and _kernel_ok(x, weight, k) and (
            bias is None or bias.dtype in KERNEL_DTYPES):
        return moe_router_kernel(x, weight, k, route_scale, **kw)
    return moe_router_reference(x, weight, k, route_scale, **kw)
