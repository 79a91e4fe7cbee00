"""Attention.grouped_out with a quantized wo_a (as converted: mxfp8; affine too) against the block-diagonal
product of the dequantized weights, for a prefill and for decode rows (decode passes its own row indices).

Tolerance: the same fp32 products of the same dequantized values, summed in other orders: ~1e-6 of the
largest output; a wrong group or row moves outputs by O(1)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_dsv4.attention import Attention
from mlx_dsv4.config import from_hf_config
from mlx_dsv4.tiny import tiny_hf_config


def _attn(mode: str) -> Attention:
    a = Attention(from_hf_config(tiny_hf_config("flash", o_groups=4)), 0)
    mx.random.seed(3)
    a.update({"wo_a": {"weight": mx.random.normal(a.wo_a.weight.shape) * 0.1}})
    kw = {"mode": "mxfp8", "group_size": 32, "bits": 8} if mode == "mxfp8" else {"group_size": 32, "bits": 4}
    nn.quantize(a, class_predicate=lambda p, m: p == "wo_a", **kw)
    return a


@pytest.mark.parametrize("mode", ["mxfp8", "affine"])
@pytest.mark.parametrize("B, L", [(1, 5), (3, 1)], ids=["prefill", "decode rows"])
def test_quantized_grouped_out_is_the_block_diagonal_product(mode, B, L):
    a = _attn(mode)
    G, R = a.o_groups, a.args.o_lora_rank
    q = a.wo_a
    w = mx.dequantize(q.weight, q.scales, q.get("biases"), group_size=q.group_size, bits=q.bits,
                      mode=q.mode).astype(mx.float32)
    o = mx.random.normal((B, L, a.n_heads, a.args.head_dim))
    og = np.array(o).reshape(B, L, G, -1)
    wg = np.array(w).reshape(G, R, -1)
    want = a.wo_b(mx.array(np.einsum("blgi,gri->blgr", og, wg).reshape(B, L, G * R)))
    got = a.grouped_out(o)
    assert got.shape == want.shape
    assert np.abs(np.array(got) - np.array(want)).max() <= 1e-5 * np.abs(np.array(want)).max()


@pytest.mark.parametrize("mode", ["mxfp8", "affine"])
def test_grouped_quantization_is_the_files_rows_split_by_group(mode):
    """wo_a is held [G, R, in] (GroupedLinear); a converted checkpoint quantizes the file's [G R, in] as
    nn.QuantizedLinear does. Truth: that quantization, split by group, bit for bit (packing and scales run along
    the inputs), with the same group size, bits and mode."""
    wo_a = Attention(from_hf_config(tiny_hf_config("flash", o_groups=4)), 0).wo_a
    G, R, n = wo_a.weight.shape
    mx.random.seed(3)
    wo_a.weight = mx.random.normal((G, R, n)) * 0.1
    flat = nn.Linear(n, G * R, bias=False)
    flat.weight = wo_a.weight.reshape(G * R, n)
    kw = {"mode": "mxfp8", "group_size": 32, "bits": 8} if mode == "mxfp8" else {"group_size": 32, "bits": 4}
    want, got = flat.to_quantized(**kw), wo_a.to_quantized(**kw)
    assert (got.group_size, got.bits, got.mode) == (want.group_size, want.bits, want.mode)
    for k in ("weight", "scales", "biases"):
        assert (k in got) == (k in want), k
        if k in want:
            assert mx.array_equal(got[k], want[k].reshape(G, R, -1)).item(), k
