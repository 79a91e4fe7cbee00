"""The CPU harness for Metal kernels: MLX's generated text, thread ids, SIMD lockstep, barriers, types.

Oracles: MLX's own generator output (printed with verbose=True), numpy / MLX computations of the
same quantities, and closed forms (counts, sums of integers, which are exact in float).
"""

import os

import mlx.core as mx
import numpy as np
import pytest
from kernel_util import needs_cxx, spec

from mlx_dsv4.kernels.registry import load_spec
from mlx_dsv4.kernels.sim import MetalSimError, SimCompileError, SimRaceError, generated_source, run_metal_kernel_on_cpu

F32 = np.float32


def _mlx_printed(capfd, s, inputs, template, output_dtypes, output_shapes) -> str:
    """What MLX prints for this call (tracing under export_function builds the source on any backend)."""
    k = mx.fast.metal_kernel(name=s.name, input_names=list(s.inputs), output_names=list(s.outputs), source=s.source,
                             header=s.header, ensure_row_contiguous=s.ensure_row_contiguous,
                             atomic_outputs=s.atomic_outputs)

    def f(*xs):
        kw = {"template": template} if template else {}
        return k(inputs=list(xs), grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=output_shapes,
                 output_dtypes=output_dtypes, verbose=True, **kw)

    capfd.readouterr()
    mx.export_function(os.devnull, f, *inputs)
    out = capfd.readouterr().out
    return out.split("```\n", 1)[1].rsplit("\n```", 1)[0]


def test_generated_source_equals_mlx(capfd):
    """Our generator reproduces MLX 0.32's text exactly: template kinds (negative int, bool, dtype),
    header, scalar and small (constant) inputs, shape/strides/ndim parameters, attributes, atomics."""
    s = spec("uint i = thread_position_in_grid.x + a_shape[0] + c_strides[0] + c_ndim + thread_index_in_simdgroup;\n"
             "threadgroup float q[4];", "a: float; b: int32; c: bfloat16; s: float", "o: float; p: bfloat16",
             header="inline float helper(float x) { return x; }", template="T: type; N: int; F: bool",
             row_contiguous="false", name="gen")
    args = [mx.zeros((3, 5)), mx.zeros((7,), dtype=mx.int32), mx.zeros((4, 6), dtype=mx.bfloat16)[:, ::2], mx.array(1.5)]
    tmpl = [("T", mx.float16), ("N", -7), ("F", True)]
    ours = generated_source(s, args, dict(tmpl), [mx.float32, mx.bfloat16])
    assert ours == _mlx_printed(capfd, s, args, tmpl, [mx.float32, mx.bfloat16], [(4,), (2,)])

    s2 = spec("out[0] = x[0];", "x: float", "out: float", atomic_outputs="true", name="plain")
    x = [mx.zeros((9,))]
    assert generated_source(s2, x, None, [mx.int32]) == _mlx_printed(capfd, s2, x, None, [mx.int32], [(1,)])

    for name, args, tmpl, odt, oshape in [
        ("sinkhorn_split", [mx.zeros((5, 24)), mx.zeros((3,)), mx.zeros((24,)), mx.array(1e-6)], [("ITERS", 20)],
         [mx.float32] * 3, [(5, 4), (5, 4), (5, 4, 4)]),
        ("hc_pre", [mx.zeros((3, 4, 40), mx.bfloat16), mx.zeros((24, 160)), mx.zeros((3,)), mx.zeros((24,)),
                    mx.array(1e-6), mx.array(1e-6), mx.zeros((40,)), mx.array(1e-6), mx.zeros((3, 40), mx.bfloat16),
                    mx.zeros((3, 4)), mx.zeros((3, 4, 4))],
         [("T", mx.bfloat16), ("D", 40), ("ITERS", 20), ("NORM", True), ("POST", True)],
         [mx.bfloat16, mx.float32, mx.float32, mx.bfloat16], [(3, 40), (3, 4), (3, 4, 4), (3, 4, 40)]),
        ("hc_post", [mx.zeros((3, 40), mx.float16), mx.zeros((3, 4, 40), mx.float16), mx.zeros((3, 4)),
                     mx.zeros((3, 4, 4))], [("T", mx.float16), ("D", 40)], [mx.float16], [(3, 4, 40)]),
        ("indexer_score", [mx.zeros((2, 1, 64, 128), mx.bfloat16), mx.zeros((2, 9, 128), mx.bfloat16),
                           mx.zeros((8,), mx.uint8), mx.zeros((2, 1, 64)), mx.zeros((2,), mx.int32),
                           mx.array(9, mx.int32)],
         [("T", mx.bfloat16), ("H", 64), ("DQ", 128), ("RATIO", 4), ("FP4", False)], [mx.float32], [(2, 1, 9)]),
        ("indexer_score", [mx.zeros((2, 3, 64, 128)), mx.zeros((2, 256, 64), mx.uint8),
                           mx.zeros((2, 256, 4), mx.uint8), mx.zeros((2, 3, 64)), mx.zeros((2,), mx.int32),
                           mx.array(41, mx.int32)],
         [("T", mx.float32), ("H", 64), ("DQ", 128), ("RATIO", 4), ("FP4", True)], [mx.float32], [(2, 3, 41)]),
        ("experts_gate_up", [mx.zeros((2, 96), mx.bfloat16), mx.zeros((2, 3), mx.uint32),
                             *[mx.zeros((5, 64, 12), mx.uint32), mx.zeros((5, 64, 3), mx.uint8)] * 2, mx.array(7.0),
                             *[mx.zeros((64, 24), mx.uint32), mx.zeros((64, 3), mx.uint8)] * 2],
         [("T", mx.bfloat16), ("D", 96), ("I", 64), ("K", 3), ("SHARED", True)], [mx.float32], [(2, 4, 64)]),
        ("experts_gate_up", [mx.zeros((2, 96)), mx.zeros((2, 3), mx.int32),
                             *[mx.zeros((5, 64, 12), mx.uint32), mx.zeros((5, 64, 3), mx.uint8)] * 2, mx.array(7.0),
                             *[mx.zeros((5, 64, 12), mx.uint32), mx.zeros((5, 64, 3), mx.uint8)] * 2],
         [("T", mx.float32), ("D", 96), ("I", 64), ("K", 3), ("SHARED", False)], [mx.float32], [(2, 3, 64)]),
        ("experts_down", [mx.zeros((2, 4, 64)), mx.zeros((2, 3), mx.int32), mx.zeros((2, 3)),
                          mx.zeros((5, 96, 8), mx.uint32), mx.zeros((5, 96, 2), mx.uint8),
                          mx.zeros((96, 16), mx.uint32), mx.zeros((96, 2), mx.uint8)],
         [("T", mx.float16), ("D", 96), ("I", 64), ("K", 3), ("SHARED", True)], [mx.float32], [(2, 96)]),
        ("index_finish", [mx.zeros((1, 1, 64, 128), mx.bfloat16), mx.zeros((32,)), mx.zeros((32,)),
                          mx.zeros((2,), mx.int32), mx.zeros((2,))],
         [("T", mx.bfloat16), ("D", 128), ("R2", 32), ("NORM", False), ("QAT", True)], [mx.bfloat16],
         [(1, 1, 64, 128)]),
        ("index_finish", [mx.zeros((2, 3, 1, 32)), mx.zeros((8,)), mx.zeros((32,)), mx.zeros((2,), mx.int32),
                          mx.zeros((2,))],
         [("T", mx.float32), ("D", 32), ("R2", 8), ("NORM", True), ("QAT", False)], [mx.float32], [(2, 3, 1, 32)]),
        ("compressor_pool", [mx.zeros((2, 3, 4, 256)), mx.zeros((2, 3, 4, 256)), mx.zeros((2, 4, 128)),
                             mx.zeros((2, 4, 128)), mx.zeros((1,), mx.int32)],
         [("RATIO", 4), ("OVERLAP", True), ("HAS_PREV", True), ("RING", False)], [mx.float32], [(2, 3, 128)]),
        ("compressor_pool", [mx.zeros((2, 8, 256)), mx.zeros((2, 8, 256)), mx.zeros((2, 8, 256)),
                             mx.zeros((2, 8, 256)), mx.zeros((1,), mx.int32)],
         [("RATIO", 4), ("OVERLAP", True), ("HAS_PREV", False), ("RING", True)], [mx.float32], [(2, 1, 128)]),
        ("rows_finish", [mx.zeros((2, 1, 64, 512), mx.bfloat16), mx.zeros((512,), mx.bfloat16), mx.zeros((32,)),
                         mx.zeros((2,), mx.int32), mx.array(1e-6)],
         [("T", mx.bfloat16), ("D", 512), ("R", 64), ("NOPE", 448), ("NORM", True), ("WEIGHT", True),
          ("INVERSE", False)], [mx.bfloat16], [(2, 1, 64, 512)]),
        ("rows_finish", [mx.zeros((1, 3, 1, 40)), mx.zeros((4,)), mx.zeros((4,)), mx.zeros((2,), mx.int32),
                         mx.array(1e-6)], [("T", mx.float16), ("D", 40), ("R", 8), ("NOPE", 0), ("NORM", False),
                                           ("WEIGHT", False), ("INVERSE", True)], [mx.float16], [(1, 3, 1, 40)]),
        ("sparse_attention_decode", [mx.zeros((1, 1, 64, 512), mx.bfloat16), mx.zeros((1, 128, 512), mx.bfloat16),
                                     mx.zeros((1, 256, 448), mx.uint8), mx.zeros((1, 256, 7), mx.uint8),
                                     mx.zeros((1, 256, 64), mx.bfloat16), mx.zeros((1, 1, 512), mx.int32),
                                     mx.zeros((64,)), mx.zeros((4,), mx.int32), mx.array(0.04)],
         [("T", mx.bfloat16), ("D", 512), ("NOPE", 448), ("HT", 2), ("FP8", True), ("CSA", True), ("WINDOW", 128),
          ("RATIO", 4)], [mx.bfloat16], [(1, 1, 64, 512)]),
        ("sparse_attention_prefill", [mx.zeros((1, 8, 8, 64)), mx.zeros((1, 8, 64)), mx.zeros((1, 256, 64)),
                                      mx.zeros((8,), mx.uint8), mx.zeros((8,)), mx.zeros((1, 8, 8), mx.int32),
                                      mx.zeros((8,)), mx.zeros((3,), mx.int32), mx.array(0.125)],
         [("T", mx.float32), ("D", 64), ("NOPE", 64), ("HT", 8), ("FP8", False), ("CSA", False), ("WINDOW", 8),
          ("RATIO", 128)], [mx.float32], [(1, 8, 8, 64)]),
        ("moe_router", [mx.zeros((2, 64), mx.bfloat16), mx.zeros((256, 64), mx.bfloat16), mx.zeros((256,)),
                        mx.zeros((2,), mx.int32), mx.array(1.5)],
         [("D", 64), ("E", 256), ("K", 6), ("HASHED", False)], [mx.int32, mx.float32], [(2, 6), (2, 6)]),
        ("moe_router", [mx.zeros((3, 64)), mx.zeros((8, 64)), mx.zeros((40, 2), mx.int32),
                        mx.zeros((3,), mx.int32), mx.array(1.5)],
         [("D", 64), ("E", 8), ("K", 2), ("HASHED", True)], [mx.int32, mx.float32], [(3, 2), (3, 2)]),
        ("indexer_topk", [mx.zeros((2, 3, 40)), mx.zeros((2,), mx.int32), mx.array(16, mx.int32)], [("RATIO", 4)],
         [mx.int32], [(2, 3, 16)]),
        ("store_encode", [mx.zeros((2, 512), mx.bfloat16)], [("D", 512), ("N", 448), ("FP4", False)],
         [mx.uint8, mx.uint8, mx.bfloat16], [(2, 448), (2, 7), (2, 64)]),
        ("store_encode", [mx.zeros((3, 48))], [("D", 48), ("N", 48), ("FP4", True)], [mx.uint8, mx.uint8, mx.float32],
         [(3, 24), (3, 2), (1,)]),
    ]:
        ks = load_spec(name)
        assert generated_source(ks, args, dict(tmpl), odt) == _mlx_printed(capfd, ks, args, tmpl, odt, oshape)


IDS = """
uint3 p = thread_position_in_grid;
uint o = ((p.z * threads_per_grid.y + p.y) * threads_per_grid.x + p.x) * 16;
uint3 g = threadgroup_position_in_grid, t = thread_position_in_threadgroup, n = threads_per_threadgroup;
uint v[16] = {p.x, p.y, p.z, g.x, g.y, g.z, t.x, t.y, t.z, n.x, n.y, n.z, thread_index_in_threadgroup,
              simdgroup_index_in_threadgroup, thread_index_in_simdgroup, threadgroups_per_grid.x};
for (int i = 0; i < 16; ++i) {
  out[o + i] = v[i];
}
"""


@needs_cxx
def test_thread_ids_on_a_ragged_3d_grid():
    """Every grid position runs once with Metal's ids; edge threadgroups are smaller (non-uniform)."""
    grid, tg = (37, 5, 3), (16, 2, 2)
    (out,) = run_metal_kernel_on_cpu(spec(IDS, "x: float", "out: uint32"), [np.zeros(8, F32)], None, grid, tg,
                                     [(3, 5, 37, 16)], [np.uint32])
    z, y, x = np.meshgrid(*(np.arange(n) for n in grid[::-1]), indexing="ij")
    pos = np.stack([x, y, z])
    g, t = pos // np.array(tg)[:, None, None, None], pos % np.array(tg)[:, None, None, None]
    n = np.minimum(np.array(tg)[:, None, None, None], np.array(grid)[:, None, None, None] - g * np.array(tg)[:, None, None, None])
    lin = t[0] + n[0] * (t[1] + n[1] * t[2])
    expect = np.concatenate([pos, g, t, n, lin[None], lin[None] // 32, lin[None] % 32, np.full((1, *x.shape), 3)])
    np.testing.assert_array_equal(out, np.moveaxis(expect, 0, -1))


SIMD = """
uint i = thread_position_in_grid.x, lane = thread_index_in_simdgroup;
float x = inp[i];
float r[14] = {simd_sum(x), simd_max(x), simd_min(x), simd_prefix_exclusive_sum(x), simd_prefix_inclusive_sum(x),
               simd_shuffle(x, (lane * 7) % 32), simd_shuffle_xor(x, 5), simd_shuffle_up(x, 3),
               simd_shuffle_down(x, 3), simd_shuffle_rotate_down(x, 5), simd_broadcast(x, 2),
               simd_broadcast_first(x), float(simd_sum(int(x))), float(uint64_t(simd_ballot(x > 20.0f)) % 1000003)};
for (int j = 0; j < 14; ++j) {
  out[i * 16 + j] = r[j];
}
out[i * 16 + 14] = simd_any(x > 40.0f) + 2 * simd_all(x >= 0.0f);
out[i * 16 + 15] = simd_is_first();
"""


def _simd_oracle(x: np.ndarray) -> np.ndarray:
    """The same functions over each 32-lane group (the last one partial); NaN where a lane reads a
    lane that does not exist."""
    out = np.full((len(x), 16), np.nan, F32)
    for s0 in range(0, len(x), 32):
        v = x[s0 : s0 + 32]
        m = len(v)
        get = lambda j, v=v, m=m: v[j] if 0 <= j < m else np.nan
        for lane in range(m):
            r = out[s0 + lane]
            r[:5] = v.sum(), v.max(), v.min(), v[:lane].sum(), v[: lane + 1].sum()
            r[5], r[6] = get((lane * 7) % 32), get(lane ^ 5)
            r[7] = v[lane] if lane < 3 else get(lane - 3)
            r[8] = v[lane] if lane + 3 >= 32 else get(lane + 3)
            r[9], r[10], r[11], r[12] = get((lane + 5) % 32), get(2), v[0], v.astype(int).sum()
            r[13] = sum(1 << j for j in range(m) if v[j] > 20) % 1000003
            r[14] = (v > 40).any() + 2 * (v >= 0).all()
            r[15] = lane == 0
    return out


@needs_cxx
def test_simd_functions_over_full_and_partial_groups():
    x = np.random.default_rng(0).permutation(45).astype(F32)  # integers: every sum is exact
    (out,) = run_metal_kernel_on_cpu(spec(SIMD, "inp: float", "out: float"), [x], None, (45, 1, 1), (45, 1, 1),
                                     [(45, 16)], [F32])
    np.testing.assert_array_equal(out, _simd_oracle(x))


DIVERGE = """
uint lane = thread_index_in_simdgroup;
float half_sum = lane < 16 ? simd_sum(1.0f) : -1.0f;  // only lanes 0..15 take part
float loops = 0.0f;
for (uint k = 0; k <= lane % 3; ++k) {
  loops += simd_sum(1.0f);  // lanes still looping at iteration k
}
float after = simd_sum(1.0f);  // all lanes meet again after the loop
out[lane * 3] = half_sum;
out[lane * 3 + 1] = loops;
out[lane * 3 + 2] = after;
"""


@needs_cxx
def test_divergent_simd_calls_see_only_active_lanes_and_reconverge():
    (out,) = run_metal_kernel_on_cpu(spec(DIVERGE, "x: float", "out: float"), [np.zeros(8, F32)], None,
                                      (32, 1, 1), (32, 1, 1), [(32, 3)], [F32])
    lanes = np.arange(32)
    active = [(lanes % 3 >= k).sum() for k in range(3)]  # 32, 21, 10
    np.testing.assert_array_equal(out[:, 0], np.where(lanes < 16, 16, -1))
    np.testing.assert_array_equal(out[:, 1], [sum(active[: lane % 3 + 1]) for lane in lanes])
    np.testing.assert_array_equal(out[:, 2], 32)


REVERSE = """
threadgroup float buf[64];
uint t = thread_index_in_threadgroup, i = thread_position_in_grid.x, n = threads_per_threadgroup.x;
buf[t] = x[i];
threadgroup_barrier(mem_flags::mem_threadgroup);
y[i] = buf[n - 1 - t];
"""


@needs_cxx
def test_barrier_orders_threadgroup_memory_and_a_missing_one_is_a_race():
    x = np.arange(150, dtype=F32)
    good = spec(REVERSE, "x: float", "y: float")
    (y,) = run_metal_kernel_on_cpu(good, [x], None, (150, 1, 1), (64, 1, 1), [(150,)], [F32])
    np.testing.assert_array_equal(y, np.concatenate([x[:64][::-1], x[64:128][::-1], x[128:][::-1]]))
    broken = spec(REVERSE.replace("threadgroup_barrier(mem_flags::mem_threadgroup);", ""), "x: float", "y: float")
    with pytest.raises(SimRaceError, match="differs between the forward and reverse"):
        run_metal_kernel_on_cpu(broken, [x], None, (150, 1, 1), (64, 1, 1), [(150,)], [F32])
    # one schedule alone: the first SIMD group reads slots the second has not written (0xFF = NaN)
    (y,) = run_metal_kernel_on_cpu(broken, [x], None, (150, 1, 1), (64, 1, 1), [(150,)], [F32], schedules=["forward"])
    assert np.isnan(y[:32]).all()


BARRIER_MISUSE = """
uint t = thread_index_in_threadgroup;
if (mode == 0 && t >= 40) {
  return;  // early exit, then a barrier the others wait at forever on a GPU
}
if (mode == 1 && t % 2 == 0) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
} else {
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
y[t] = 1.0f;
"""


@needs_cxx
def test_barrier_divergence_is_an_error():
    s = spec(BARRIER_MISUSE, "mode: int32", "y: float")
    run = lambda mode: run_metal_kernel_on_cpu(s, [np.int32(mode)], None, (64, 1, 1), (64, 1, 1), [(64,)], [F32])
    np.testing.assert_array_equal(run(2)[0], 1.0)
    with pytest.raises(MetalSimError, match="24 threads of the threadgroup have returned"):
        run(0)
    with pytest.raises(MetalSimError, match="different threadgroup_barrier calls"):
        run(1)


TYPES = """
uint i = thread_position_in_grid.x;
bfloat16_t b = x[i];
half h = x[i];
bf[i] = x[i];
hf[i] = x[i];
prod[i] = b * bfloat16_t(y[i]);  // bfloat x bfloat -> bfloat
mixed[i] = h * y[i];              // half x float -> float
"""


@needs_cxx
def test_bfloat_and_half_round_to_nearest_even():
    """Stores round like MLX's bfloat16 and numpy's float16 (independent implementations): ties to
    even, NaN, infinities, overflow, subnormals, signed zero."""
    specials = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4e38, -3.4e38, 65519.0, 65520.0, 2.0**-24, 2.0**-25,
                3 * 2.0**-26, 1e-40, -0.0, np.inf, -np.inf, np.nan, 1 + 2**-11, 1 + 3 * 2**-11]
    rng = np.random.default_rng(1)
    x = np.concatenate([specials, rng.standard_normal(200) * 10.0 ** rng.integers(-8, 8, 200)]).astype(F32)
    y = rng.standard_normal(len(x)).astype(F32)
    n = len(x)
    bf, hf, prod, mixed = run_metal_kernel_on_cpu(
        spec(TYPES, "x: float; y: float", "bf: bfloat16; hf: float16; prod: bfloat16; mixed: float"), [x, y], None,
        (n, 1, 1), (64, 1, 1), [(n,)] * 4, [mx.bfloat16, np.float16, mx.bfloat16, F32])
    xb, yb = mx.array(x).astype(mx.bfloat16), mx.array(y).astype(mx.bfloat16)
    np.testing.assert_array_equal(bf, np.array(xb.astype(mx.float32)))
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(hf, x.astype(np.float16))
    np.testing.assert_array_equal(prod, np.array((xb * yb).astype(mx.float32)))
    with np.errstate(over="ignore", invalid="ignore"):
        np.testing.assert_array_equal(mixed, x.astype(np.float16).astype(F32) * y)


VECTORS = """
uint i = thread_position_in_grid.x;
float4 a = ((const device float4*)x)[i];
float4 b = float4(a.zw, a.xy);
float2 s = a.xy + a.zw * 2.0f;
half4 h = half4(a);
float3 c = float3(s, dot(a, b));
float4 r = select(b, float4(c, 0.0f), a > float4(0.0f));
r.xy = clamp(r.xy, -1.0f, 1.0f);
((device float4*)y)[i] = r + float4(h) * 0.0f;
"""


@needs_cxx
def test_vector_types_and_swizzles():
    x = np.random.default_rng(2).standard_normal((40, 4)).astype(F32)
    (y,) = run_metal_kernel_on_cpu(spec(VECTORS, "x: float", "y: float"), [x], None, (40, 1, 1), (32, 1, 1),
                                   [(40, 4)], [F32])
    b = np.concatenate([x[:, 2:], x[:, :2]], axis=1)
    s = x[:, :2] + x[:, 2:] * 2
    c = np.concatenate([s, (x * b).sum(1, keepdims=True), np.zeros((40, 1), F32)], axis=1)
    r = np.where(x > 0, c, b)
    r[:, :2] = np.clip(r[:, :2], -1, 1)
    np.testing.assert_allclose(y, r, rtol=1e-6, atol=1e-6)  # dot() sums in another order than numpy


@needs_cxx
def test_out_of_bounds_access_is_reported_with_the_buffer():
    x = np.arange(64, dtype=F32)  # 256 bytes: the next element sits on the guard page
    shift = spec("uint i = thread_position_in_grid.x;\ny[i] = x[i + 1];", "x: float", "y: float")
    with pytest.raises(MetalSimError, match=r"0 bytes past the end of input 'x' \(256 bytes\)"):
        run_metal_kernel_on_cpu(shift, [x], None, (64, 1, 1), (32, 1, 1), [(64,)], [F32])
    write = spec("uint i = thread_position_in_grid.x;\ny[i * 2] = x[i];", "x: float", "y: float")
    with pytest.raises(MetalSimError, match="past the end of output 'y'"):
        run_metal_kernel_on_cpu(write, [x], None, (64, 1, 1), (32, 1, 1), [(64,)], [F32])


@needs_cxx
def test_far_and_backward_accesses_are_caught_not_let_into_the_process():
    """A stray index far past a buffer's end or before its start faults in the 64 MiB guard regions (a single guard
    page let a larger stride write into the test process's own heap), and a write into the slack just before the
    start, which no guard page covers, fails the launch afterwards."""
    x = np.arange(64, dtype=F32)
    far = spec("uint i = thread_position_in_grid.x;\ny[i + 262144] = x[i];", "x: float", "y: float")  # 1 MiB on
    with pytest.raises(MetalSimError, match=r"1048320 bytes past the end of output 'y' \(256 bytes\)"):
        run_metal_kernel_on_cpu(far, [x], None, (64, 1, 1), (32, 1, 1), [(64,)], [F32])
    back = spec("int i = int(thread_position_in_grid.x);\ny[i] = x[i - 262144];", "x: float", "y: float")
    with pytest.raises(MetalSimError, match=r"1048576 bytes before the start of input 'x' \(256 bytes\)"):
        run_metal_kernel_on_cpu(back, [x], None, (64, 1, 1), (32, 1, 1), [(64,)], [F32])
    slack = spec("int i = int(thread_position_in_grid.x);\ny[i - 1] = x[i];", "x: float", "y: float")
    with pytest.raises(MetalSimError, match=r"a write 4 bytes before the start of output 'y' \(256 bytes\)"):
        run_metal_kernel_on_cpu(slack, [x], None, (64, 1, 1), (32, 1, 1), [(64,)], [F32])


@needs_cxx
def test_outputs_start_poisoned_unless_init_value():
    s = spec("uint i = thread_position_in_grid.x;\ny[2 * i] = x[i];", "x: float", "y: float")
    x = np.arange(8, dtype=F32)
    (y,) = run_metal_kernel_on_cpu(s, [x], None, (8, 1, 1), (8, 1, 1), [(16,)], [F32])
    assert np.isnan(y[1::2]).all() and (y[::2] == x).all()
    (y,) = run_metal_kernel_on_cpu(s, [x], None, (8, 1, 1), (8, 1, 1), [(16,)], [F32], init_value=3.0)
    assert (y[1::2] == 3).all()


@needs_cxx
def test_atomics_across_threadgroups_and_workers():
    s = spec("uint i = thread_position_in_grid.x;\n"
             "atomic_fetch_add_explicit(&counts[i % 5], 1u, memory_order_relaxed);", "x: float", "counts: uint32",
             atomic_outputs="true")
    (c,) = run_metal_kernel_on_cpu(s, [np.zeros(8, F32)], None, (3001, 1, 1), (256, 1, 1), [(5,)], [np.uint32],
                                   init_value=0, workers=2)
    np.testing.assert_array_equal(c, np.bincount(np.arange(3001) % 5))


@needs_cxx
def test_strided_input_with_elem_to_loc():
    s = spec("uint i = thread_position_in_grid.x;\ny[i] = x[elem_to_loc(int64_t(i), x_shape, x_strides, x_ndim)];",
             "x: float", "y: float", row_contiguous="false")
    base = np.arange(7 * 12, dtype=F32).reshape(7, 12)
    view = base[::-2, 3:11:3].T  # negative and non-unit strides
    (y,) = run_metal_kernel_on_cpu(s, [view], None, (view.size, 1, 1), (32, 1, 1), [(view.size,)], [F32])
    np.testing.assert_array_equal(y, view.reshape(-1))


@needs_cxx
def test_threadgroup_memory_over_32k_is_an_error():
    s = spec("threadgroup float big[8200];\nbig[thread_index_in_threadgroup] = 1.0f;\ny[0] = big[0];",
             "x: float", "y: float")
    with pytest.raises(MetalSimError, match="32800 bytes exceeds"):
        run_metal_kernel_on_cpu(s, [np.zeros(8, F32)], None, (32, 1, 1), (32, 1, 1), [(1,)], [F32])


@needs_cxx
def test_compile_errors_point_into_the_metal_source():
    s = spec("uint i = thread_position_in_grid.x;\ny[i] = undefined_thing;", "x: float", "y: float", name="bad")
    with pytest.raises(SimCompileError, match=r"<test:bad>:7:.*undefined_thing"):
        run_metal_kernel_on_cpu(s, [np.zeros(8, F32)], None, (8, 1, 1), (8, 1, 1), [(8,)], [F32])


def test_bad_calls_are_refused_with_a_message():
    s = spec("y[0] = x[0];", "x: float", "y: float", template="N: int")
    with pytest.raises(ValueError, match="missing \\['N'\\]"):
        run_metal_kernel_on_cpu(s, [np.zeros(8, F32)], {}, (8, 1, 1), (8, 1, 1), [(8,)], [F32])
    with pytest.raises(ValueError, match="N must be int"):
        run_metal_kernel_on_cpu(s, [np.zeros(8, F32)], {"N": 1.5}, (8, 1, 1), (8, 1, 1), [(8,)], [F32])
    with pytest.raises(ValueError, match="no Metal type.*double"):
        run_metal_kernel_on_cpu(s, [np.zeros(8)], {"N": 1}, (8, 1, 1), (8, 1, 1), [(8,)], [F32])
    with pytest.raises(ValueError, match="takes inputs"):
        run_metal_kernel_on_cpu(s, [], {"N": 1}, (8, 1, 1), (8, 1, 1), [(8,)], [F32])


@needs_cxx
def test_mlx_lm_metal_kernels_run_unchanged(monkeypatch):
    """External check: Metal kernels that mlx-lm ships (written for and run on Apple GPUs) go through
    the lint and the harness unchanged, through their own Python wrappers, and match float64 numpy
    (fp32 RMS norms; observed ~1e-6, bound 1e-5)."""
    import importlib
    import sys

    import mlx.nn as nn

    pytest.importorskip("mlx_lm.kernels")
    from mlx_dsv4.kernels.sim import CpuKernel

    names = ["mlx_lm.kernels.qk_norm", "mlx_lm.kernels.norm_add_norm"]
    with monkeypatch.context() as m:  # the module-level kernel objects are built at import
        m.setattr(mx.fast, "metal_kernel", CpuKernel.from_metal_kernel_args)
        qn, nan = (importlib.reload(sys.modules[n]) for n in names)
    try:
        rng = np.random.default_rng(0)
        HQ, HK, D = 3, 2, 72  # D not a multiple of 32
        x = rng.standard_normal((2, 5, 2 * (HQ + HK) * D))
        q, k = qn.qk_norm(mx.array(x, dtype=mx.float32), n_heads=HQ, n_kv_heads=HK, head_dim=D, eps=1e-6,
                          query_scale=0.125)
        h = x.reshape(2, 5, 2 * (HQ + HK), D)[:, :, : HQ + HK]
        y = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(np.array(q), y[:, :, :HQ] * 0.125, atol=1e-5)
        np.testing.assert_allclose(np.array(k), y[:, :, HQ:], atol=1e-5)

        D = 1000  # 96-thread rows: three SIMD groups, threadgroup memory and a barrier
        br, st, al, be, pw, nw = (rng.uniform(0.5, 1.5, (3, D)) for _ in range(6))
        norm = nn.RMSNorm(D, eps=1e-5)
        norm.weight = mx.array(nw[0], dtype=mx.float32)

        def f32(a):
            return mx.array(a, dtype=mx.float32)

        ns, normed = nan.norm_add_norm(f32(br), f32(st), alpha=f32(al[0]), beta=f32(be[0]), post_weight=f32(pw[0]),
                                       post_eps=1e-6, next_norm=norm)
        v = br * pw[0]
        s = al[0] * st + be[0] * v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(np.array(ns), s, atol=1e-5)
        np.testing.assert_allclose(np.array(normed), s / np.sqrt((s * s).mean(-1, keepdims=True) + 1e-5) * nw[0],
                                   atol=1e-5)
    finally:
        for n in names:  # back to the real mx.fast.metal_kernel objects
            importlib.reload(sys.modules[n])
