"""One official weight (+ its E8M0 scale) -> MLX arrays in a chosen format, as lazy MLX ops.

The converter evaluates these one tensor at a time; the on-the-fly loader leaves them lazy so
nothing is read from disk before the model needs it. The lossless paths are pure byte moves:
- FP4 experts: the official bytes (low nibble = element 2k) are exactly MLX's mxfp4 packing, so
  the int8 [out, in/2] data is viewed as uint32 [out, in/8] and the [out, in/32] scales are used as is.
- FP8: e4m3 bytes viewed as uint32 [out, in/4]; each 128x128 block scale is repeated to the
  [out, in/32] groups of mxfp8 (4 groups per block column, 128 rows per block row).
- FP4 -> mxfp8: every e2m1 value is an e4m3 value, so codes map through a 16-entry table.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..formats import e2m1_to_float, e4m3_to_float, e8m0_to_float, float_to_e4m3, unpack_fp4
from .official import FP4_GROUP, FP8_BLOCK
from .policy import MX_GROUP, quant_params

_E2M1_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)
_E2M1_TO_E4M3 = float_to_e4m3(mx.array(_E2M1_VALUES))


def to_mx(a: np.ndarray, sdtype: str) -> mx.array:
    """numpy storage (as read by safetensors_io) -> MLX array of the logical dtype (copies)."""
    x = mx.array(np.ascontiguousarray(a))
    return x.view(mx.bfloat16) if sdtype == "BF16" else x


def to_numpy(x: mx.array) -> np.ndarray:
    """MLX array -> numpy storage for writing (bf16 as its uint16 bit pattern)."""
    return np.array(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)


def expand_block_scales(s: mx.array, out: int, inp: int) -> mx.array:
    """E8M0 [ceil(out/128), ceil(in/128)] -> [out, in/32] (mxfp8 groups); lossless repetition."""
    s = mx.repeat(s, FP8_BLOCK, axis=0)[:out]
    return mx.repeat(s, FP8_BLOCK // MX_GROUP, axis=1)[:, : inp // MX_GROUP]


def dequantize(source: str, w: mx.array, s: mx.array | None, shape: tuple[int, int]) -> mx.array:
    """The official values of one weight, float32 [out, in] (exact: power-of-two scales)."""
    if source == "fp8":
        out, inp = shape
        scale = mx.repeat(mx.repeat(e8m0_to_float(s), FP8_BLOCK, axis=0)[:out], FP8_BLOCK, axis=1)[:, :inp]
        return e4m3_to_float(w) * scale
    if source == "fp4":
        return e2m1_to_float(unpack_fp4(w)) * mx.repeat(e8m0_to_float(s), FP4_GROUP, axis=1)
    return w.astype(mx.float32)


def convert(source: str, fmt: str, w: mx.array, s: mx.array | None, shape: tuple[int, ...],
            group_size: int) -> dict[str, mx.array]:
    """One weight in `fmt` (a concrete format from policy.target) -> {suffix: array}, suffixes
    in policy.output_tensors order. `shape` is the logical [out, in] shape."""
    if source == "i64":
        return {"weight": w.astype(mx.int32)}
    if fmt == "mxfp4" and source == "fp4":
        return {"weight": w.view(mx.uint32), "scales": s}
    if fmt == "mxfp8" and source == "fp8":
        return {"weight": w.view(mx.uint32), "scales": expand_block_scales(s, *shape)}
    if fmt == "mxfp8" and source == "fp4":
        codes = mx.take(_E2M1_TO_E4M3, unpack_fp4(w).astype(mx.uint32))
        return {"weight": codes.view(mx.uint32), "scales": s}
    x = dequantize(source, w, s, shape)
    if fmt == "fp32":
        return {"weight": x}
    if fmt == "bf16":
        return {"weight": x.astype(mx.bfloat16)}
    q = quant_params(fmt, group_size)
    parts = mx.quantize(x.astype(mx.bfloat16), group_size=q["group_size"], bits=q["bits"], mode=q["mode"])
    return dict(zip(("weight", "scales", "biases"), parts))
