"""Hub repo ids (with a local stand-in for huggingface_hub) and Flash-0731-style DSpark checkpoints:
only the needed files are fetched, and the drafter stages are skipped with a note."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import pytest
from ckpt_util import read_raw, shard_of, small_config, write_raw

from mlx_dsv4.checkpoint import (
    CheckpointNotFoundError,
    convert,
    load_weights,
    random_official_weights,
    write_official_checkpoint,
)


def _dspark_checkpoint(root: Path) -> Path:
    """Layout of Flash-0731 in miniature: three trailing zero ratios, dspark_* keys, an mtp.*
    namespace of a different architecture partly in a shared shard and partly in its own shard."""
    cfg = small_config("flash", compress_ratios=[0, 4, 128, 4, 0, 0, 0], dspark_block_size=5,
                       dspark_target_layer_ids=[1, 2, 3])
    ck = write_official_checkpoint(root, cfg, random_official_weights(cfg, seed=4), max_shard_bytes=200_000)
    write_raw(ck / "model-dspark.safetensors", {"mtp.1.markov_w1.weight": ("BF16", [4, 4], b"\0" * 32),
                                                "mtp.2.e_proj.weight": ("F8_E4M3", [4, 4], b"\0" * 16)})
    shared = shard_of(ck, "head.weight")
    entries = read_raw(shared)
    entries["mtp.0.stage0_proj.weight"] = ("BF16", [2, 2], b"\0" * 8)
    write_raw(shared, entries)
    idx = json.loads((ck / "model.safetensors.index.json").read_text())
    idx["weight_map"] |= {"mtp.1.markov_w1.weight": "model-dspark.safetensors",
                          "mtp.2.e_proj.weight": "model-dspark.safetensors", "mtp.0.stage0_proj.weight": shared.name}
    (ck / "model.safetensors.index.json").write_text(json.dumps(idx))
    return ck


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """repo id -> a local 'remote' directory; records what was asked for."""
    remotes, log = {}, {"files": [], "patterns": []}

    def hf_hub_download(repo_id, filename, revision=None, **_):
        if repo_id not in remotes:
            raise OSError(f"404 Client Error: Repository Not Found for url: https://huggingface.co/{repo_id}")
        src = remotes[repo_id] / filename
        if not src.exists():
            raise huggingface_hub.errors.EntryNotFoundError(f"404 {filename}")
        log["files"].append(filename)
        return str(src)

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **_):
        log["patterns"] = list(allow_patterns)
        snap = tmp_path / "hub-cache" / repo_id.replace("/", "--")
        snap.mkdir(parents=True, exist_ok=True)
        for f in remotes[repo_id].iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copyfile(f, snap / f.name)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return remotes, log


def test_hub_repo_dspark_fetches_only_needed_shards(tmp_path, fake_hub):
    remotes, log = fake_hub
    remotes["org/tiny-0731"] = _dspark_checkpoint(tmp_path / "remote")
    (remotes["org/tiny-0731"] / "README.md").write_text("not needed")
    out = convert("org/tiny-0731", tmp_path / "mlx", progress=False)
    snap = tmp_path / "hub-cache" / "org--tiny-0731"
    assert not (snap / "model-dspark.safetensors").exists() and not (snap / "README.md").exists()
    assert "model-dspark.safetensors" not in log["patterns"] and "config.json" in log["patterns"]
    cfg, W = load_weights(out)
    assert not any(k.startswith("mtp.") for k in W) and "layers.3.ffn.experts.w1.weight" in W
    assert any("skipped 3 tensors: DSpark" in n for n in cfg["mlx_dsv4"]["notes"])
    cfg2, W2 = load_weights("org/tiny-0731")  # the same through the lazy path
    assert set(W2) == set(W) and mx.array_equal(W2["embed.weight"], W["embed.weight"]).item()


def test_hub_failure_names_the_repo(tmp_path, fake_hub):
    with pytest.raises(CheckpointNotFoundError, match="org/absent") as e:
        convert("org/absent", tmp_path / "mlx", progress=False)
    assert "Repository Not Found" in str(e.value) and not (tmp_path / "mlx").exists()
