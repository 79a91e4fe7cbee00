"""The whole tiny model with every Metal kernel executed through the CPU harness vs the reference path.

Tiny Flash schedule [0, 0, 4, 128, 4] (sliding, CSA, HCA), trained-format simulation off (dense
cache) and on (the compact FP8 / FP4 cache, read in place), routed experts in mxfp4 and shared experts
in mxfp8, batch 2: a 300-token prefill (longer than the 128-token window; 75 CSA entries against a
top-k of 16, so the sparse path runs) and four decode steps. Every kernel in metal_kernels/ must run at
least once.

Tolerance: 1e-5 of max |logit|, fp32. The kernels sum the same fp32 terms in other orders than
MLX (each op within a few ulp, ~1e-7 relative); through 5 layers, 4 streams and the head the
measured difference is ~1e-6. A single wrong index or mask moves logits by > 1e-3 (the negative
control). Discrete choices are the exception: a near-tie in the indexer's top-k or the experts'
routing can resolve the other way under a 1e-7 perturbation, and one flipped entry then moves all
later logits of that sequence by ~1e-4 (seen once a top-k kernel joined). So the reference run
records every selection, and the kernel run compares its own selection with the record (the
kernels' sets must agree on at least 99% of rows: a wrong top-k or router kernel disagrees on most)
and continues with the recorded one wherever a row differs, so no flip can propagate.

The same holds for the trained-format rounding (FP8 window / compressed entries, FP4 indexer), which
cannot be recorded: a value within 1e-7 of an FP8 rounding boundary lands on the other neighbour,
a step of ~6%, and moves that sequence's later logits by ~1e-4 (1.7e-4 measured). With the
simulation on the model is therefore compared at 1e-3; subtle bugs stay far above it (the decode
window off by one: 0.28; FP8 rounding fed 0.1% too large: 0.37). Without the simulation the fp32
bound is 1e-5 (measured ~1e-6). bf16 is not compared here: on this random tiny model bf16 rounding alone moves the
reference by ~0.5 of max |logit| (bf16 vs fp32 reference), so per-kernel bf16 tolerances live in
the per-kernel tests.
"""

import contextlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from kernel_util import needs_cxx, variant
from mlx_lm.models.switch_layers import SwitchLinear
from tinymodels import mlx_model, rel_err, tokens

from mlx_dsv4 import indexer
from mlx_dsv4.compiled_step import CompiledDecode
from mlx_dsv4.kernels import moe_router as router, registry
from mlx_dsv4.kernels.registry import available_kernels, load_spec
from mlx_dsv4.kernels.sim import kernels_on_cpu

PREFILL, DECODE = 300, 4


def tolerance(m) -> float:
    """1e-5 of max |logit| in fp32; 1e-3 with the trained-format simulation (see the module docstring)."""
    return 1e-3 if m.simulate_qat else 1e-5


class Selections:
    """Records the indexer's top-k ids and the router's (weights, ids) on the reference run; on the
    kernel run counts rows whose id set differs from the record and replays the record for those calls."""

    def __init__(self, mp):
        self.log, self.replay, self.at, self.rows, self.differ = [], False, 0, 0, 0
        mp.setattr(indexer, "top_k_visible", self._wrap(indexer.top_k_visible, lambda out: out))
        mp.setattr(router, "moe_router", self._wrap(router.moe_router, lambda out: out[1]))

    def start_replay(self):
        self.replay, self.at, self.rows, self.differ = True, 0, 0, 0

    def _wrap(self, fn, ids_of):
        def wrapped(*args, **kw):
            out = fn(*args, **kw)
            if not self.replay:
                self.log.append(out)
                return out
            want = self.log[self.at]
            self.at += 1
            got, exp = (np.sort(np.array(ids_of(o)), axis=-1) for o in (out, want))
            rows = (got != exp).any(axis=-1)
            self.rows, self.differ = self.rows + rows.size, self.differ + int(rows.sum())
            return want if rows.any() else out
        return wrapped


@pytest.fixture(scope="module", params=[False, True], ids=["sim_off", "sim_on"])
def model(request):
    m = mlx_model("flash", simulate_qat=request.param)
    nn.quantize(m, class_predicate=lambda _p, mod: isinstance(mod, SwitchLinear), group_size=32, bits=4,
                mode="mxfp4")
    nn.quantize(m, class_predicate=lambda p, mod: "shared_experts" in p and isinstance(mod, nn.Linear),
                group_size=32, bits=8, mode="mxfp8")  # as converted: the shared expert runs in the expert kernels
    return m


@contextlib.contextmanager
def reference_path(on: bool = True):
    with pytest.MonkeyPatch.context() as env:
        if on:
            env.setenv(registry.REFERENCE_ENV, "1")
        yield


def decode_plain(m, cache, toks):
    return [m(mx.array(toks[:, i : i + 1]), cache) for i in range(PREFILL, toks.shape[1])]


def decode_ring(m, cache, toks):
    """The decode steps through the ring caches of the compiled decode step (compiled_step.py), run eagerly:
    the harness executes each launch on concrete inputs, which a trace does not have."""
    cd = CompiledDecode(m, cache, DECODE, compiled=False)
    return [cd(mx.array(toks[:, i : i + 1]))[:, None] for i in range(PREFILL, toks.shape[1])]


def _run(m, toks, decode=decode_plain, reference_prefill=False):
    """Logits of a 300-token prefill and the decode steps; reference_prefill: the prefill on the reference path
    whatever dispatch is active (for tests about decoding: the harness's prefill is the slow part)."""
    cache = m.make_cache()
    # with the simulation on, the compact FP8 / FP4 stores (read in place by the kernels)
    assert (cache[2]._comp.kind, cache[2]._index.kind) == (("fp8", "fp4") if m.simulate_qat else ("dense", "dense"))
    with reference_path(reference_prefill):
        outs = [m(mx.array(toks[:, :PREFILL]), cache)]
    outs += decode(m, cache, toks)
    mx.eval(outs)
    return np.concatenate([np.array(o) for o in outs], axis=1)


@pytest.fixture(scope="module")
def reference(model):
    mp = pytest.MonkeyPatch()
    sel = Selections(mp)
    toks = tokens(PREFILL + DECODE, batch=2)
    with reference_path():
        out = _run(model, toks)
    yield toks, out, sel
    mp.undo()


# Kernels that only a prefill launches (the ring case prefills on the reference path; the plain case runs them).
PREFILL_ONLY = {"sparse_attention_prefill"}


@needs_cxx
@pytest.mark.parametrize("decode", [decode_plain, decode_ring], ids=["plain", "ring"])
def test_every_kernel_through_the_harness_matches_the_reference(model, reference, monkeypatch, decode):
    """ring: the decode steps through the compiled step's ring caches (the position an input array of every
    kernel), against the same reference (the reference path's plain decode), after a reference prefill."""
    monkeypatch.delenv(registry.REFERENCE_ENV, raising=False)
    toks, ref, sel = reference
    sel.start_replay()
    with kernels_on_cpu(schedules=("forward",)) as calls:
        out = _run(model, toks, decode, reference_prefill=decode is decode_ring)
    assert sel.at == len(sel.log) and sel.differ <= 0.01 * sel.rows, (sel.differ, sel.rows)
    # The fused hc_pre kernel does the Sinkhorn split itself for hc = 4, so sinkhorn_split is left only to
    # hc_pre's fallback (hc != 4, other dtypes): never in this model; test_kernel_sinkhorn_split.py covers it.
    expected = set(available_kernels()) - {"sinkhorn_split"}
    if not model.simulate_qat:  # store_encode encodes the compact cache's rows: only with the simulation on
        expected -= {"store_encode"}
    if decode is decode_ring:
        expected -= PREFILL_ONLY
    assert set(calls) == expected, f"kernels that never ran: {expected - set(calls)}"
    assert calls["sparse_attention_decode"] == 5 * DECODE and calls["experts_gate_up"] == 5 * DECODE
    assert rel_err(out, ref) <= tolerance(model)
    assert rel_err(out[:, PREFILL:], ref[:, PREFILL:]) <= tolerance(model)  # the decode steps on their own


@needs_cxx
@pytest.mark.parametrize("model", [True], ids=["sim_on"], indirect=True)
def test_a_broken_kernel_in_the_model_is_caught(model, reference, monkeypatch):
    """Negative control: the decode attention's window reaches one row too far back (with the simulation
    on, as users run it: the comparison above is the same code with the simulation off). The prefill runs
    on the reference path (the broken kernel is a decode kernel; the test above runs the prefill's)."""
    monkeypatch.delenv(registry.REFERENCE_ENV, raising=False)
    toks, ref, sel = reference
    sel.start_replay()
    broken = variant(load_spec("sparse_attention_decode"), "t - WINDOW + 1", "t - WINDOW")
    with kernels_on_cpu({"sparse_attention_decode": broken}, schedules=("forward",)) as calls:
        out = _run(model, toks, reference_prefill=True)
    assert calls["sparse_attention_decode"] == 5 * DECODE
    assert rel_err(out[:, :PREFILL], ref[:, :PREFILL]) <= tolerance(model)  # the reference prefill, as recorded
    assert rel_err(out[:, PREFILL:], ref[:, PREFILL:]) > 10 * tolerance(model)
