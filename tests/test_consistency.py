"""One prefill, chunked prefill and token-by-token decode give the same logits (fp32).

Tolerance 1e-5 of the largest |logit|: the three paths differ only in summation order (query
blocks, concatenation of window and compressed keys); observed ~1e-6. With the trained-format
simulation on, rounding happens on identical values in every path, so the bound is the same.
300 tokens cross the 128 window, two ratio-128 boundaries and 75 ratio-4 boundaries.
"""

import numpy as np
import pytest

from tinymodels import mlx_model, rel_err, run_chunked, tokens

TOL = 1e-5


@pytest.fixture(scope="module", params=[False, True], ids=["sim_off", "sim_on"])
def setup(request):
    m = mlx_model("flash", simulate_qat=request.param)
    toks = tokens(300, batch=2, seed=3)
    return m, toks, run_chunked(m, toks, toks.shape[1])


@pytest.mark.parametrize("chunk", [1, 3, 64, 129])
def test_chunked_equals_full(setup, chunk):
    m, toks, full = setup
    assert rel_err(run_chunked(m, toks, chunk), full) <= TOL


def test_prefill_from_offset_then_decode(setup):
    """A cache saved mid-window (offset 130: ratio-4 and ratio-128 windows open) keeps going exactly."""
    import mlx.core as mx

    m, toks, full = setup
    cache = m.make_cache()
    mx.eval(m(mx.array(toks[:, :130]), cache))
    cache = [c.copy() for c in cache]
    out = np.array(m(mx.array(toks[:, 130:200]), cache))
    assert rel_err(out, full[:, 130:200]) <= TOL


def test_batch_rows_are_independent(setup):
    m, toks, full = setup
    single = run_chunked(m, toks[1:2], 150)
    assert rel_err(single, full[1:2]) <= TOL
