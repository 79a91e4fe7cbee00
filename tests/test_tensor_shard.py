"""Tensor mode's plan, in one process: the split of groups / experts / shared rows, the loaders that
read only a rank's experts, the refusals, and the per-rank bytes the README's memory table quotes.
(The numerics across real ranks are in test_distributed.py.)"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from ckpt_util import small_config
from mlx.utils import tree_flatten
from tinymodels import rel_err

from mlx_dsv4.checkpoint import convert, load_weights, write_random_official_checkpoint
from mlx_dsv4.checkpoint.official import expected_tensors
from mlx_dsv4.checkpoint.safetensors_io import nbytes
from mlx_dsv4.config import from_hf_config
from mlx_dsv4.distributed import even_split, plan_tensor, shard_bytes

ROOT = Path(__file__).resolve().parents[1]
STACKED = re.compile(r"\.ffn\.experts\.w[123]\.(weight|scales|biases)$")


class Rank:
    """Size and rank of a group, for planning without one."""

    def __init__(self, n: int, r: int):
        self.n, self.r = n, r

    def size(self) -> int:
        return self.n

    def rank(self) -> int:
        return self.r


@pytest.mark.parametrize("total", [1, 2, 4, 7, 8, 16, 384])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_even_split_is_contiguous_and_balanced(total, n):
    parts = [even_split(total, n, r) for r in range(n)]
    assert [i for p in parts for i in p] == list(range(total))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [len(p) for p in parts] == sorted((len(p) for p in parts), reverse=True), "the first ranks take more"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("tensor_shard")
    official = write_random_official_checkpoint(base / "official", small_config(), seed=0)
    return {"official": official, "converted": convert(official, base / "converted", progress=False)}


@pytest.mark.parametrize("kind", ["official", "converted"])
def test_loader_reads_only_a_ranks_experts(ckpts, kind):
    """load_weights(experts=...) gives exactly the whole load's rows of every stacked expert tensor
    (official: only those per-expert tensors are stacked; converted: only those rows are read)."""
    cfg, full = load_weights(ckpts[kind])
    own = range(3, 6)
    _, part = load_weights(ckpts[kind], experts=own)
    assert set(part) == set(full)
    stacked = [k for k in full if STACKED.search(k)]
    assert len(stacked) >= 3 * 2 * (small_config()["num_hidden_layers"] + 1)  # w1..w3, weight + scales
    for k, v in full.items():
        expect = v[own.start : own.stop] if k in stacked else v
        assert part[k].shape == expect.shape and np.array_equal(np.array(part[k].view(mx.uint8) if part[k].dtype
                                                                   == mx.bfloat16 else part[k]),
                                                          np.array(expect.view(mx.uint8) if expect.dtype
                                                                   == mx.bfloat16 else expect)), k


def test_tensor_sharding_refuses_more_ranks_than_output_groups():
    args = from_hf_config(small_config())  # 2 output groups
    with pytest.raises(ValueError, match="tensor sharding needs an output group and a routed expert per rank: "
                                         "this model has 2 groups and 8 experts, not enough for 3 ranks"):
        plan_tensor(Rank(3, 0), args, None, 1.0)


def test_select_refuses_to_cut_inside_a_quantization_group():
    """Shared expert cut in units of 1 (no quantization given) while its w2 is packed: rank 0's
    slice [0, 11) of 32 columns falls inside a scale group, which must be an error, not a wrong slice."""
    args = from_hf_config(small_config())
    shard = plan_tensor(Rank(3, 0), from_hf_config(small_config(o_groups=4)), None, 1.0)
    assert shard.shared == range(0, 11)
    w = {"layers.0.ffn.shared_experts.w2.scales": mx.zeros((args.dim, 1), mx.uint8)}
    with pytest.raises(ValueError, match="cannot cut 1 entries along axis -1 into 32 parts"):
        shard.select(w)
    quant = plan_tensor(Rank(3, 0), from_hf_config(small_config(o_groups=4)),
                        {"layers.0.ffn.shared_experts.w2": {"group_size": 32, "bits": 8, "mode": "mxfp8"}}, 1.0)
    assert quant.shared == range(0, 32), "one group of 32 rows: all on rank 0"
    assert quant.select(w)["layers.0.ffn.shared_experts.w2.scales"].shape == (args.dim, 1)
    assert "layers.0.ffn.shared_experts.w2.scales" not in plan_tensor(
        Rank(3, 1), from_hf_config(small_config(o_groups=4)),
        {"layers.0.ffn.shared_experts.w2": {"group_size": 32}}, 1.0).select(w), "rank 1 holds none of it"


# split tensors in official names, written here independently of distributed._SPLIT
SPLIT = re.compile(r"\.attn\.(wq_b|wo_a|wo_b|attn_sink)\b|\.ffn\.(experts\.\d+|shared_experts)\.")


@pytest.mark.parametrize("name", ["DeepSeek-V4-Pro", "DeepSeek-V4-Flash"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_per_rank_bytes_partition_the_split_tensors(name, n):
    """Sum over ranks = checkpoint + (N-1) x replicated part: each split tensor is held exactly once."""
    cfg = json.loads((ROOT / "tests/data/configs" / f"{name}.config.json").read_text())
    args = from_hf_config(cfg)
    sizes = {k: nbytes(dt, s) for k, (dt, s) in expected_tensors(cfg).items()}
    rep = sum(v for k, v in sizes.items() if not SPLIT.search(k))
    held = [shard_bytes(sizes, plan_tensor(Rank(n, r), args, None, 1.0)) for r in range(n)]
    assert sum(held) == sum(sizes.values()) + (n - 1) * rep
    # uneven by at most one expert and one output group per layer (worst: Flash on 3, 86/85/85 experts and
    # 3/3/2 groups, 2.0%)
    assert max(held) - min(held) <= 0.025 * max(held), held


# ---- the split is exact: partial outputs of all ranks add up to the whole layer's, in one process ---------


@pytest.fixture(scope="module")
def trained():
    """The trained tiny model (official FP8 / FP4 read as mxfp8 / mxfp4: quantized slices) and what it
    was built from, so each simulated rank builds its own slice from the same lazy tensors."""
    from mlx_dsv4.load import build_model, load, to_model_layout
    from mlx_dsv4.tiny import trained_tiny_path

    model, _ = load("tiny")
    cfg, w = load_weights(trained_tiny_path())
    weights = to_model_layout(w, model.args)

    def ranks(n: int):
        out = []
        for r in range(n):
            shard = plan_tensor(Rank(min(n, 2), min(r, 1)), model.args, cfg["quantization"], 60.0)
            if n > 2:  # more ranks than the 2 output groups: split the MoE only (every rank keeps both groups)
                unit = shard.shared.stop - shard.shared.start  # 2 units of 32 rows each on 2 ranks
                u = even_split(model.args.moe_inter_dim // (unit // 2), n, r)
                shard = replace(shard, o_groups=range(2), experts=even_split(model.args.n_routed_experts, n, r),
                                shared=range(u.start * unit // 2, u.stop * unit // 2))
            shard.all_sum = lambda x: x  # each rank's partial, summed by the test instead of the ring
            out.append(build_model(model.args, weights, mx.float32, True, cfg["quantization"], stage=shard))
        return out

    return model, ranks


@pytest.mark.parametrize("n", [2, 5])
def test_moe_partials_add_up_to_the_whole(trained, n):
    """Routed (8 experts: 4/4 or 2/2/2/1/1) and shared expert (4 units of 32 rows: 2/2 or 1/1/1/1/0, the
    fifth rank holding none), prefill-sized (sorted) and decode-sized rows; float32, so only the order
    of the additions differs (tolerance 1e-5 of the largest output)."""
    model, ranks = trained
    parts = ranks(n)
    assert [len(p.layers[3].ffn.shared_experts.w1.weight) if "shared_experts" in p.layers[3].ffn else 0
            for p in parts][-1] == (0 if n == 5 else 64)
    rng = np.random.default_rng(0)
    for L in (40, 1):
        x = mx.array(rng.standard_normal((1, L, model.args.dim)).astype(np.float32))
        toks = mx.array(rng.integers(0, 1000, (1, L)).astype(np.int32))
        for i in (0, 3):  # a hash-routed and a learned-routed layer
            whole = np.array(model.layers[i].ffn(x, toks))
            partial = [np.array(p.layers[i].ffn(x, toks)) for p in parts]
            assert rel_err(sum(partial), whole) <= 1e-5, (L, i)
            assert rel_err(sum(partial[1:]), whole) > 1e-3, "rank 0's share (experts and shared rows) must matter"


def test_attention_partials_add_up_and_caches_stay_whole(trained):
    """2 ranks, one output group each: the partial attention outputs add up to the whole layer's through a
    prefill and decode steps, and each rank's cache equals the single model's (KV is replicated)."""
    model, ranks = trained
    parts = ranks(2)
    rng = np.random.default_rng(1)
    for i in range(model.args.n_layers):
        caches = [model.make_cache()[i]] + [p.make_cache()[i] for p in parts]
        for L in (150, 1, 1):
            x = mx.array(rng.standard_normal((1, L, model.args.dim)).astype(np.float32))
            outs = [np.array(m.layers[i].attn(x, c, m.simulate_qat)) for m, c in zip([model, *parts], caches)]
            assert rel_err(outs[1] + outs[2], outs[0]) <= 1e-5, (i, L)
            assert rel_err(outs[1], outs[0]) > 1e-3, "one rank's share alone is not the output"
        whole = tree_flatten(caches[0].state)
        for c in caches[1:]:
            for (ka, a), (kb, b) in zip(tree_flatten(c.state), whole, strict=True):
                same = np.array_equal(np.array(a), np.array(b)) if isinstance(a, mx.array) else a == b
                assert ka == kb and same, f"layer {i}: the cache must be replicated ({ka})"
