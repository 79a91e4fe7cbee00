"""`mlx_dsv4 bench` on the bench-sized model: runs, writes JSON and PNG, and its measured cache
bytes per token equal the analytic calculator's (the bench model has the real Flash schedule and
attention geometry, so this is the real Flash cache layout)."""

import json

import pytest

from mlx_dsv4.bench import run
from mlx_dsv4.cache_size import cache_bytes
from mlx_dsv4.config import from_hf_config
from mlx_dsv4.tiny import bench_hf_config


def test_bench_measures_and_matches_the_calculator(tmp_path):
    pytest.importorskip("matplotlib")
    lines = []
    r = run("bench", contexts=(512,), gen_tokens=2, chunk=256, out_json=str(tmp_path / "b.json"),
            out_png=str(tmp_path / "b.png"), echo=lines.append)
    (run1,) = r["runs"]
    assert run1["cache_bytes_per_token_by_ratio"] == run1["analytic_bytes_per_token_by_ratio"]
    assert run1["prompt_tps"] > 0 and run1["generation_tps"] > 0 and run1["peak_memory_gb"] > 0
    assert json.loads((tmp_path / "b.json").read_text())["runs"][0]["context"] == 512
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith("| 512 |") for line in lines)
    # bf16 storage of the RoPE part: the bench model's layout is the real Flash's, 3,509 B/token
    assert round(cache_bytes(from_hf_config(bench_hf_config()), 1 << 20)["per_token"]) == 3509
