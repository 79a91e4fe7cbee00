"""Each kind of broken input gets its own error, naming the file and the tensor, raised before
anything is written: no output directory (or hidden temporary sibling) is left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from ckpt_util import no_leftovers, read_raw, shard_of, small_config, write_raw

from mlx_dsv4.checkpoint import (
    CheckpointConfigError,
    CheckpointNotFoundError,
    CorruptHeaderError,
    DtypeMismatchError,
    MissingShardError,
    MissingTensorError,
    ShapeMismatchError,
    TruncatedFileError,
    UnknownTensorError,
    convert,
    load_weights,
    random_official_weights,
    write_official_checkpoint,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    cfg = small_config("flash")
    return write_official_checkpoint(tmp_path_factory.mktemp("pristine") / "ck", cfg,
                                     random_official_weights(cfg, seed=2), max_shard_bytes=200_000)


@pytest.fixture
def ck(pristine, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(pristine, dst)
    return dst


def _edit(root: Path, tensor: str, fn, index_too: bool = False) -> Path:
    """Rewrite the shard holding `tensor`: fn(entries) edits {name: (dtype, shape, bytes)} in place."""
    path = shard_of(root, tensor)
    entries = read_raw(path)
    fn(entries)
    write_raw(path, entries)
    if index_too:
        idx_path = root / "model.safetensors.index.json"
        idx = json.loads(idx_path.read_text())
        wm = {k: v for k, v in idx["weight_map"].items() if v != path.name}
        wm.update({k: path.name for k in entries})
        idx["weight_map"] = wm
        idx_path.write_text(json.dumps(idx))
    return path


def _fails(ck: Path, tmp_path: Path, error: type, file: Path | str | None, tensor: str | None, match: str = ""):
    for attempt in (lambda: convert(ck, tmp_path / "out", progress=False), lambda: load_weights(ck)):
        with pytest.raises(error, match=match) as e:
            attempt()
        assert type(e.value) is error
        if file is not None:
            assert e.value.file == str(file) and str(file) in str(e.value)
        if tensor is not None:
            assert e.value.tensor == tensor and f"'{tensor}'" in str(e.value)
    assert no_leftovers(tmp_path, "out")


def test_pristine_checkpoint_converts(ck, tmp_path):
    """The control: the unedited copy converts, so each failure below is caused by its edit."""
    convert(ck, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "config.json").exists()


def test_missing_shard(ck, tmp_path):
    path = shard_of(ck, "layers.2.attn.wq_a.weight")
    path.unlink()
    listed = sorted(k for k, v in json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"].items()
                    if v == path.name)
    _fails(ck, tmp_path, MissingShardError, path, listed[0], "shard is missing")


def test_truncated_shard(ck, tmp_path):
    path = shard_of(ck, "layers.2.attn.wq_a.weight")
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # an interrupted download
    n = int.from_bytes(data[:8], "little")
    entries = {k: v for k, v in json.loads(data[8:8 + n]).items() if k != "__metadata__"}
    first_cut = min((k for k in entries if 8 + n + entries[k]["data_offsets"][1] > len(data) - 100),
                    key=lambda k: entries[k]["data_offsets"][0])
    _fails(ck, tmp_path, TruncatedFileError, path, first_cut, "incomplete download")


def test_corrupt_header(ck, tmp_path):
    path = shard_of(ck, "layers.2.attn.wq_a.weight")
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00garbag"  # JSON destroyed
    path.write_bytes(bytes(data))
    _fails(ck, tmp_path, CorruptHeaderError, path, None, "not valid JSON")


def test_shape_mismatch(ck, tmp_path):
    name = "layers.1.attn.kv_norm.weight"  # BF16 [64] -> [32], bytes consistent with the header
    path = _edit(ck, name, lambda e: e.__setitem__(name, ("BF16", [32], e[name][2][:64])))
    _fails(ck, tmp_path, ShapeMismatchError, path, name, r"shape \[32\], config.json implies \[64\]")


def test_fp4_scale_shape_mismatch(ck, tmp_path):
    name = "layers.3.ffn.experts.5.w2.scale"  # [64, 1] per 32 inputs -> claims [32, 2]
    path = _edit(ck, name, lambda e: e.__setitem__(name, ("F8_E8M0", [32, 2], e[name][2])))
    _fails(ck, tmp_path, ShapeMismatchError, path, name, "implies")


def test_dtype_mismatch(ck, tmp_path):
    name = "layers.2.attn.attn_sink"  # F32 stored as BF16 (byte count made consistent)
    path = _edit(ck, name, lambda e: e.__setitem__(name, ("BF16", e[name][1], e[name][2][:8])))
    _fails(ck, tmp_path, DtypeMismatchError, path, name, "dtype BF16, the official layout has F32")


def test_unknown_tensor(ck, tmp_path):
    name = "layers.1.attn.bogus.weight"
    path = _edit(ck, "layers.1.attn.wkv.weight", lambda e: e.__setitem__(name, ("BF16", [2], b"\0" * 4)), True)
    _fails(ck, tmp_path, UnknownTensorError, path, name, "not part of DeepSeek-V4")


def test_missing_tensor(ck, tmp_path):
    name = "layers.3.ffn.shared_experts.w2.weight"
    _edit(ck, name, lambda e: e.pop(name), index_too=True)
    _fails(ck, tmp_path, MissingTensorError, ck, name, "absent from every shard")


def test_index_lists_a_tensor_its_shard_lacks(ck, tmp_path):
    name = "layers.3.ffn.shared_experts.w2.weight"
    path = _edit(ck, name, lambda e: e.pop(name))  # the index still lists it
    _fails(ck, tmp_path, MissingTensorError, path, name, "listed in model.safetensors.index.json")


def test_bad_config(ck, tmp_path):
    cfg_path = ck / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(cfg | {"model_type": "deepseek_v41"}))
    _fails(ck, tmp_path, CheckpointConfigError, cfg_path, None, "model_type")
    cfg_path.unlink()
    _fails(ck, tmp_path, CheckpointConfigError, cfg_path, None, "no config.json")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="not a Hugging Face repo id"):
        convert(tmp_path / "missing dir", tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path, "out")
