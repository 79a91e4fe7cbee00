"""The trained-format (compact) cache: lossless against the simulated dense cache, real nbytes."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_dsv4.cache_size import cache_bytes, layer_bytes
from mlx_dsv4.config import from_hf_config
from mlx_dsv4.formats import fp8_block_roundtrip, indexer_roundtrip
from mlx_dsv4.kvstore import FP4Rows, FP8Rows
from tinymodels import mlx_model, tokens


def _run(model, toks, chunk, compact):
    cache = model.make_cache(compact=compact)
    outs = []
    for s in range(0, toks.shape[1], chunk):
        outs.append(np.array(model(mx.array(toks[:, s : s + chunk]), cache)))
    return np.concatenate(outs, axis=1), cache


def test_compact_equals_dense_bit_exact():
    """fp32 compute, simulation on: the compact cache must change nothing at all."""
    m = mlx_model("flash", simulate_qat=True)
    toks = tokens(260, batch=2, seed=21)
    dense, _ = _run(m, toks, 37, compact=False)
    compact, cache = _run(m, toks, 37, compact=True)
    assert np.array_equal(dense, compact)
    assert cache[2].compressed_store.kind == "fp8" and cache[2]._index.kind == "fp4"


def test_row_stores_read_back_the_simulated_values():
    x = mx.random.normal((2, 9, 64), key=mx.random.key(0)) * 3
    sim = fp8_block_roundtrip(x, block=64, dims=48)
    rows = FP8Rows(48)
    rows.append(sim[:, :5])
    rows.append(sim[:, 5:])
    assert np.array_equal(np.array(rows.view(mx.float32)), np.array(sim))
    ids = mx.array([[[3, 0], [8, 8]], [[1, 2], [5, 7]]])
    assert np.array_equal(np.array(rows.take(ids, mx.float32)),
                          np.array(mx.take_along_axis(sim[:, None], ids[..., None], axis=2)))
    k = indexer_roundtrip(mx.random.normal((1, 7, 32), key=mx.random.key(1)))
    keys = FP4Rows()
    keys.append(k)
    assert np.array_equal(np.array(keys.view(mx.float32)), np.array(k.astype(mx.float32)))


def test_negative_control_storage_that_rounds_is_caught():
    """Storing the unsimulated values compactly is lossy: the store only works on rounded values."""
    x = mx.random.normal((1, 4, 64), key=mx.random.key(2))
    rows = FP8Rows(48)
    rows.append(x)
    assert not np.array_equal(np.array(rows.view(mx.float32)), np.array(x))
    with pytest.raises(ValueError, match="simulate_qat"):
        mlx_model("flash", simulate_qat=False).make_cache(compact=True)


def test_nbytes_per_token_matches_analytic():
    """bf16 model, compact cache: growth of nbytes over 512 tokens equals the analytic figure."""
    m = mlx_model("flash", simulate_qat=True, dtype=mx.bfloat16)
    a = m.args
    toks = tokens(1024 + 512, seed=5)
    cache = m.make_cache()
    mx.eval(m(mx.array(toks[:, :1024]), cache, last_only=True))
    before = [c._comp.nbytes + c._index.nbytes for c in cache]
    mx.eval(m(mx.array(toks[:, 1024:]), cache, last_only=True))
    for i, c in enumerate(cache):
        grown = c._comp.nbytes + c._index.nbytes - before[i]
        lb = layer_bytes(a, a.ratio(i), "compact")
        assert grown == lb.per_token * 512, (i, grown, lb)


def test_calculator_real_configs(data_dir):
    def args(name):
        return from_hf_config(json.loads((data_dir / "configs" / f"{name}.config.json").read_text()))

    flash, pro = args("DeepSeek-V4-Flash"), args("DeepSeek-V4-Pro")
    M = 1_048_576
    # the reference bf16 figures in the spec (section 4.4)
    assert cache_bytes(flash, M, "bf16")["compressed"] == 7_214_202_880
    assert cache_bytes(pro, M, "bf16")["compressed"] == 10_326_376_448
    assert cache_bytes(flash, M)["compressed"] <= 3.5 * 2**30
    assert cache_bytes(pro, M)["compressed"] <= 5 * 2**30
    assert round(cache_bytes(flash, M)["per_token"]) == 3509 and round(cache_bytes(pro, M)["per_token"]) == 5024
