"""V4 split across ranks (mx.distributed, ring backend on loopback) against transformers.

Each launch starts N ranks with mlx.launch (3 for Flash, 2 for Pro: both rank counts and both schedules
at two launches' cost, the uneven 3-way splits on the main model) and runs both modes in turn: pipeline (5 layers
split unevenly into stages) and tensor (4 output groups split 2/1/1 over 3 ranks, 8 experts 3/3/2, the
shared expert's 32 rows 11/11/10). Every rank must return the oracle's logits (HF
DeepseekV4ForCausalLM, fp32) in a full prefill, a chunked prefill and a token-by-token decode;
tolerance 1e-4 of the largest |logit| as in test_parity (both sides fp32 with the same weights;
observed ~1e-6). 140 tokens cross the ratio-128 boundary in decode. The checkpoint is an
official-layout directory with a 512-token vocabulary, so the layers, not the embedding and head,
hold most bytes, as in the real models.
"""

import json
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from dist_util import launch
from mlx_dsv4.config import from_hf_config
from mlx_dsv4.tiny import random_weights, tiny_hf_config
from oracle import hf_logits, hf_model
from tinymodels import rel_err

TOL = 1e-4
N_TOKENS, PREFILL = 140, 120  # as in dist_worker.py
N_LAYERS = 5
# what tensor mode splits (written here independently of distributed._SPLIT): everything else is replicated
RANKS = {"flash": 3, "pro": 2}
SPLIT = re.compile(r"\.attn\.(wq_b|wo_a|wo_b|attn_sink)\b|\.ffn\.(experts\.\d+|shared_experts)\.")


@pytest.fixture(scope="module", params=["flash", "pro"])
def case(request, tmp_path_factory):
    kind = request.param
    cfg = tiny_hf_config(kind, vocab_size=512, o_groups=4)  # 4 groups of one head: uneven over 3 ranks
    w = random_weights(from_hf_config(cfg), seed=7)
    root = tmp_path_factory.mktemp(f"dist_{kind}")
    (root / "config.json").write_text(json.dumps(cfg))
    save_file(w, str(root / "model.safetensors"))
    toks = np.random.default_rng(3).integers(0, 512, (1, N_TOKENS)).astype(np.int32)
    total = sum(v.size for v in w.values())  # parameters
    replicated = sum(v.size for k, v in w.items() if not SPLIT.search(k))
    return kind, root, toks, hf_logits(hf_model(cfg, w), toks), total, replicated


def _run(case, n, work, shardings="pipeline,tensor", *extra):
    toks = case[2]
    np.save(work / "tokens.npy", toks)
    p = launch(n, ["python", "tests/dist_worker.py", str(case[1]), str(work), shardings, *extra], timeout=400)
    assert p.returncode == 0 and "WARN" not in p.stderr, p.stderr[-3000:]
    return {s: [dict(np.load(work / f"rank{r}.{s}.npz")) for r in range(n)] for s in shardings.split(",")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch per (schedule, ranks) computes both modes; the tests of each mode share it."""
    done = {}

    def get(case, n):
        if (case[0], n) not in done:
            done[case[0], n] = _run(case, n, tmp_path_factory.mktemp(f"run_{case[0]}_{n}"))
        return done[case[0], n]

    return get


def _check_logits(ranks, ref):
    for r, out in enumerate(ranks):
        assert rel_err(out["full"], ref) <= TOL, f"rank {r} full prefill"
        assert rel_err(out["chunked"], ref) <= TOL, f"rank {r} chunked prefill"
        assert rel_err(out["decode"], ref[:, PREFILL - 1 :]) <= TOL, f"rank {r} decode"
        assert np.array_equal(out["full"], ranks[0]["full"]), "every rank gets the very same logits"


def test_pipeline_matches_transformers(case, runs):
    kind, root, toks, ref, total, _ = case
    n = RANKS[kind]
    ranks = runs(case, n)["pipeline"]
    _check_logits(ranks, ref)
    layers = [[int(i) for i in out["layers"]] for out in ranks]
    assert sum(layers, []) == list(range(N_LAYERS)), f"stages must be contiguous and cover every layer: {layers}"
    assert all(out["cache_layers"] == len(out["layers"]) for out in ranks), "a rank caches only its layers"
    shares = [float(out["held"]) / total for out in ranks]
    print(f"{kind} pipeline N={n}: layers {layers}, parameter share per rank {[f'{s:.3f}' for s in shares]}")
    assert sum(shares) == pytest.approx(1.0), "pipeline replicates nothing"
    assert max(shares) <= 1.3 / n, shares


def test_tensor_matches_transformers(case, runs):
    kind, root, toks, ref, total, rep = case
    n = RANKS[kind]
    ranks = runs(case, n)["tensor"]
    _check_logits(ranks, ref)
    assert all(out["cache_layers"] == N_LAYERS for out in ranks), "every rank keeps the whole (replicated) cache"
    assert all(out["step_calls"] == 2 * N_LAYERS for out in ranks), "one all_sum after attention and MoE per layer"
    own = [int(out["held"]) - rep for out in ranks]  # split parameters each rank holds
    shares = [int(out["held"]) / total for out in ranks]
    print(f"{kind} tensor N={n}: parameter share per rank {[f'{s:.3f}' for s in shares]} "
          f"(replicated {rep / total:.3f})")
    assert sum(own) == total - rep, "the split tensors are partitioned: nothing held twice, nothing lost"
    assert max(own) <= 1.5 / n * (total - rep), own  # uneven: 2 of 4 groups on one of 3 ranks


@pytest.mark.parametrize("case", ["flash"], indirect=True)
def test_negative_controls(case, tmp_path):
    """Pipeline: streams halved on arrival at stage 2. Tensor: rank 1's output groups taken one group
    early (group 1 counted twice, group 3 missing). Every rank's logits must miss the oracle widely."""
    ref = case[3]
    for mode, ranks in _run(case, 2, tmp_path, "pipeline,tensor", "break").items():
        for r, out in enumerate(ranks):
            assert rel_err(out["full"], ref) > 100 * TOL, f"{mode} rank {r}: the break went unnoticed"
