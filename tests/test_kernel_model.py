"""The whole tiny model with every Metal kernel executed through the CPU harness vs the reference path.

Tiny Flash schedule [0, 0, 4, 128, 4] (sliding, CSA, HCA), trained-format simulation on with the
compact FP8 / FP4 cache, routed experts quantized to mxfp4, batch 2: a 300-token prefill (longer
than the 128-token window; 75 CSA entries against a top-k of 16, so the sparse path runs) and four
decode steps. Every kernel in metal_kernels/ must run at least once.

Tolerance: 1e-5 of max |logit|, fp32. The kernels sum the same fp32 terms in other orders than
MLX (each op within a few ulp, ~1e-7 relative); through 5 layers, 4 streams and the head the
measured difference is ~1e-6. A single wrong index or mask moves logits by > 1e-3 (the negative
control). bf16 is not compared here: on this random tiny model bf16 rounding alone moves the
reference by ~0.5 of max |logit| (bf16 vs fp32 reference), so per-kernel bf16 tolerances live in
the per-kernel tests.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from kernel_util import needs_cxx, variant
from mlx_lm.models.switch_layers import SwitchLinear
from tinymodels import mlx_model, rel_err, tokens

from mlx_dsv4.kernels import registry
from mlx_dsv4.kernels.registry import available_kernels, load_spec
from mlx_dsv4.kernels.sim import kernels_on_cpu

PREFILL, DECODE, TOL = 300, 4, 1e-5


@pytest.fixture(scope="module")
def model():
    m = mlx_model("flash", simulate_qat=True)
    nn.quantize(m, class_predicate=lambda _p, mod: isinstance(mod, SwitchLinear), group_size=32, bits=4,
                mode="mxfp4")
    return m


def _run(m, toks):
    cache = m.make_cache()
    assert cache[2]._comp.kind == "fp8" and cache[2]._index.kind == "fp4"  # compact stores, read in place
    outs = [m(mx.array(toks[:, :PREFILL]), cache)]
    outs += [m(mx.array(toks[:, i : i + 1]), cache) for i in range(PREFILL, toks.shape[1])]
    mx.eval(outs)
    return np.concatenate([np.array(o) for o in outs], axis=1)


@pytest.fixture(scope="module")
def reference(model, monkeypatch_module):
    monkeypatch_module.setenv(registry.REFERENCE_ENV, "1")
    toks = tokens(PREFILL + DECODE, batch=2)
    return toks, _run(model, toks)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@needs_cxx
def test_every_kernel_through_the_harness_matches_the_reference(model, reference, monkeypatch):
    monkeypatch.delenv(registry.REFERENCE_ENV, raising=False)
    toks, ref = reference
    with kernels_on_cpu(schedules=("forward",)) as calls:
        out = _run(model, toks)
    # The fused hc_pre kernel does the Sinkhorn split itself for hc = 4, so sinkhorn_split is left only to
    # hc_pre's fallback (hc != 4, other dtypes): never in this model; test_kernel_mhc.py covers it.
    expected = set(available_kernels()) - {"sinkhorn_split"}
    assert set(calls) == expected, f"kernels that never ran: {expected - set(calls)}"
    assert calls["sparse_attention_decode"] == 5 * DECODE and calls["experts_gate_up"] == 5 * DECODE
    assert rel_err(out, ref) <= TOL
    assert rel_err(out[:, PREFILL:], ref[:, PREFILL:]) <= TOL  # the decode steps on their own


@needs_cxx
def test_a_broken_kernel_in_the_model_is_caught(model, reference, monkeypatch):
    """Negative control: the decode attention's window reaches one row too far back."""
    monkeypatch.delenv(registry.REFERENCE_ENV, raising=False)
    toks, ref = reference
    spec = load_spec("sparse_attention_decode")
    broken = variant(spec, "t - WINDOW + 1", "t - WINDOW")
    with kernels_on_cpu({"sparse_attention_decode": broken}, schedules=("forward",)):
        out = _run(model, toks)
    assert rel_err(out[:, :PREFILL], ref[:, :PREFILL]) <= TOL  # prefill does not use it
    assert rel_err(out[:, PREFILL:], ref[:, PREFILL:]) > 1e-3
