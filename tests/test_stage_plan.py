"""The pipeline stage plan: contiguous, covering, at least one layer per rank, and optimal (checked
against brute force over every split); the per-Mac table for the official configs adds up."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from mlx_dsv4.checkpoint.official import expected_tensors
from mlx_dsv4.checkpoint.safetensors_io import nbytes
from mlx_dsv4.config import from_hf_config
from mlx_dsv4.distributed import plan_stages, stage_bytes, tensor_bytes

CONFIGS = Path(__file__).parent / "data" / "configs"


def _brute(first, layers, last, n):
    L = len(layers)
    best = None
    for cuts in itertools.combinations(range(1, L), n - 1):
        b = [0, *cuts, L]
        plan = [range(b[i], b[i + 1]) for i in range(n)]
        v = max(stage_bytes(first, layers, last, plan))
        best = v if best is None else min(best, v)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_plan_is_contiguous_and_optimal(seed):
    rng = np.random.default_rng(seed)
    L, n = int(rng.integers(2, 9)), int(rng.integers(1, 5))
    n = min(n, L)
    layers = [int(x) for x in rng.integers(1, 100, L)]
    first, last = int(rng.integers(0, 300)), int(rng.integers(0, 300))
    plan = plan_stages(first, layers, last, n)
    assert [i for r in plan for i in r] == list(range(L)) and all(len(r) for r in plan)
    assert max(stage_bytes(first, layers, last, plan)) == _brute(first, layers, last, n)


def test_plan_negative_control():
    """An even split by layer count is not what the plan gives when the first stage carries a
    large embedding: the plan moves layers off it (brute force agrees)."""
    plan = plan_stages(1000, [100] * 12, 0, 3)
    assert len(plan[0]) < 4 and max(stage_bytes(1000, [100] * 12, 0, plan)) == _brute(1000, [100] * 12, 0, 3)


def test_too_many_ranks_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot split 3 layers into 4 pipeline stages"):
        plan_stages(0, [1, 1, 1], 0, 4)


@pytest.mark.parametrize("name", ["DeepSeek-V4-Pro", "DeepSeek-V4-Flash"])
def test_official_inventory_splits_without_loss(name):
    cfg = json.loads((CONFIGS / f"{name}.config.json").read_text())
    sizes = {k: nbytes(dt, shape) for k, (dt, shape) in expected_tensors(cfg).items()}
    parts = tensor_bytes(sizes, from_hf_config(cfg).n_layers)
    for n in (2, 3, 4):
        per = stage_bytes(*parts, plan_stages(*parts, n))
        assert sum(per) == sum(sizes.values())
        assert max(per) <= 1.1 * sum(per) / n  # 61 / 43 layers: fine-grained enough to balance
