"""Tensor mode's plan, in one process: the split of groups / experts / shared rows, the loaders that
read only a rank's experts, the refusals, and the per-rank bytes the README's memory table quotes.
(The numerics across real ranks are in test_distributed.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from ckpt_util import small_config

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
