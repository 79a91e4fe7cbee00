"""End to end on tiny official-layout checkpoints: the converted MLX checkpoint holds exactly the
official values (decoded independently in numpy), in the naming contract the model uses, and the
converter's streamed output equals the lazy on-the-fly loader's."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from ckpt_util import bf16, dequant_fp4, dequant_fp8, no_leftovers, read_raw, shard_files, small_config

from mlx_dsv4.checkpoint import (
    CheckpointError,
    OutputExistsError,
    convert,
    load_weights,
    random_official_weights,
    write_official_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
conv = importlib.import_module("mlx_dsv4.checkpoint.convert")  # the package attribute is the function


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """Tiny checkpoints: Flash-shaped with FP4 experts, Pro-shaped, and FP8 experts (no expert_dtype)."""
    base = tmp_path_factory.mktemp("official")
    out = {}
    for key, cfg in {"flash": small_config("flash"), "pro": small_config("pro"),
                     "fp8": small_config("flash", expert_dtype=None)}.items():
        out[key] = write_official_checkpoint(base / key, cfg, random_official_weights(cfg, seed=1),
                                             max_shard_bytes=250_000)
    return out


def _official_values(root: Path) -> dict[str, np.ndarray]:
    """Every official weight decoded to float64 by the numpy reference decoders."""
    raw = {}
    for f in shard_files(root):
        raw.update(read_raw(f))
    out = {}
    for name, (dt, shape, data) in raw.items():
        if name.endswith(".scale"):
            continue
        a = np.frombuffer(data, {"F8_E4M3": np.uint8, "I8": np.int8, "BF16": np.uint16, "F32": np.float32,
                                 "I64": np.int64}[dt]).reshape(shape)
        if dt in ("F8_E4M3", "I8"):
            _, sshape, sdata = raw[name[:-6] + "scale"]
            s = np.frombuffer(sdata, np.uint8).reshape(sshape)
            out[name] = dequant_fp8(a, s) if dt == "F8_E4M3" else dequant_fp4(a, s)
        else:
            out[name] = bf16(a) if dt == "BF16" else a
    return out


def _mlx_values(cfg: dict, W: dict[str, mx.array]) -> dict[str, np.ndarray]:
    """Converted weights back to floats through MLX's own dequantize, per the recorded config."""
    q = cfg.get("quantization", {})
    out = {}
    for name, w in W.items():
        base = name.rsplit(".", 1)[0]
        if name.endswith((".scales", ".biases")):
            continue
        if name.endswith(".weight") and base in q:
            p = q[base]
            w = mx.dequantize(w, W[f"{base}.scales"], W.get(f"{base}.biases"), p["group_size"], p["bits"],
                              mode=p["mode"], dtype=mx.float32)
        out[name] = np.array(w.astype(mx.float32) if w.dtype == mx.bfloat16 else w)
    return out


def _official_name(mlx_name: str, e: int | None = None) -> str:
    return re.sub(r"\.ffn\.experts\.", f".ffn.experts.{e}.", mlx_name) if e is not None else mlx_name


@pytest.mark.parametrize("key", ["flash", "pro", "fp8"])
def test_lossless_conversion_is_exact(official, tmp_path, key):
    out = convert(official[key], tmp_path / "mlx", progress=False)
    cfg, W = load_weights(out)
    ref, got = _official_values(official[key]), _mlx_values(cfg, W)
    n_exp = cfg["n_routed_experts"]
    covered = set()
    for name, v in got.items():
        if ".ffn.experts." in name:
            assert v.shape[0] == n_exp
            for e in range(n_exp):  # expert e lands in slot e
                assert np.array_equal(v[e], ref[_official_name(name, e)].astype(np.float32), equal_nan=True), name
                covered.add(_official_name(name, e))
        else:
            assert np.array_equal(v, ref[name].astype(v.dtype), equal_nan=True), name
            covered.add(name)
    assert covered == set(ref)  # nothing lost, nothing invented
    # formats: experts and FP8 weights quantized (mx), small tensors at their stored precision
    q = cfg["quantization"]
    want = "mxfp4" if key != "fp8" else "mxfp8"
    assert q["layers.1.ffn.experts.w2"] == {"group_size": 32, "bits": 4 if want == "mxfp4" else 8, "mode": want}
    assert q["layers.1.attn.wq_a"]["mode"] == "mxfp8" and "embed" not in q
    assert W["layers.1.attn_norm.weight"].dtype == mx.bfloat16 and W["layers.1.hc_attn_fn"].dtype == mx.float32
    assert W["layers.0.ffn.gate.tid2eid"].dtype == mx.int32 and W["embed.weight"].dtype == mx.bfloat16
    assert "quantization_config" not in cfg and cfg["mlx_dsv4"]["source_quantization_config"]["fmt"] == "e4m3"
    assert cfg["mlx_dsv4"]["source_expert_dtype"] == ("fp8" if key == "fp8" else "fp4")


def test_fp4_experts_are_a_pure_byte_repack(official, tmp_path):
    out = convert(official["flash"], tmp_path / "mlx", progress=False)
    _, W = load_weights(out)
    raw = {}
    for f in shard_files(official["flash"]):
        raw.update(read_raw(f))
    stacked = np.array(W["layers.2.ffn.experts.w3.weight"]).tobytes()
    assert stacked == b"".join(raw[f"layers.2.ffn.experts.{e}.w3.weight"][2] for e in range(8))
    scales = np.array(W["layers.2.ffn.experts.w3.scales"]).tobytes()
    assert scales == b"".join(raw[f"layers.2.ffn.experts.{e}.w3.scale"][2] for e in range(8))


@pytest.mark.parametrize("mode, overrides", [("lossless", None), ("affine8", None), ("affine4", {"experts": "affine4"}),
                                             ("bf16", None), ("lossless", {"experts": "mxfp8", "head": "mxfp8"})])
def test_streamed_conversion_equals_lazy_load(official, tmp_path, monkeypatch, mode, overrides):
    """Two code paths (row-chunked streaming with byte copies vs. lazy MLX graphs) agree bit for bit;
    the tiny CHUNK_BYTES forces the row-chunking path on every tensor with more than 128 rows."""
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1)
    out = convert(official["flash"], tmp_path / "mlx", quant_mode=mode, group_size=32, overrides=overrides,
                  progress=False)
    c1, A = load_weights(out)
    c2, B = load_weights(official["flash"], quant_mode=mode, group_size=32, overrides=overrides)
    assert set(A) == set(B) and c1.get("quantization") == c2.get("quantization")
    for k in A:
        assert A[k].dtype == B[k].dtype and A[k].shape == B[k].shape, k
        assert mx.array_equal(A[k], B[k], equal_nan=True).item(), k


def test_options_are_recorded_and_fallbacks_noted(official, tmp_path):
    out = convert(official["flash"], tmp_path / "mlx", quant_mode="affine8", group_size=64,
                  overrides={"router": "affine4"}, progress=False)
    cfg, W = load_weights(out)
    meta, q = cfg["mlx_dsv4"], cfg["quantization"]
    assert meta["quant_mode"] == "affine8" and meta["formats"]["router"] == "affine4"
    assert q["embed"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert q["layers.3.ffn.gate"]["bits"] == 4 and q["layers.1.ffn.experts.w1"]["mode"] == "mxfp4"
    # wq_b has 32 inputs: not a multiple of 64, so it stays exact (bf16) and the note says so
    assert "layers.1.attn.wq_b" not in q and W["layers.1.attn.wq_b.weight"].dtype == mx.bfloat16
    assert any(n.startswith("layers.1.attn.wq_b.weight: input dim 32") for n in meta["notes"])


def test_shards_index_tokenizer(official, tmp_path):
    out = convert(official["pro"], tmp_path / "mlx", max_shard_gb=150e3 / 1e9, progress=False)
    files = shard_files(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and set(index["weight_map"].values()) == {f.name for f in files}
    seen = {}
    for f in files:
        hdr = read_raw(f)
        payload = sum(len(d) for _, _, d in hdr.values())
        assert payload <= 150e3 or len({k.rsplit(".", 1)[0] for k in hdr}) == 1  # one oversized unit alone
        seen.update({k: f.name for k in hdr})
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(len(d) for f in files for _, _, d in read_raw(f).values())
    for t in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / t).read_bytes() == (official["pro"] / t).read_bytes()


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))}


def test_read_only_input_is_untouched(official, tmp_path, monkeypatch):
    """chmod a-w, and (since root ignores permissions) any attempt to open an input file for
    writing fails loudly; the files are byte-identical afterwards."""
    import builtins

    src = tmp_path / "ro"
    shutil.copytree(official["flash"], src)
    before = _tree_digest(src)
    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *a, **k):
        if str(file).startswith(str(src)) and any(c in mode for c in "wax+"):
            raise AssertionError(f"wrote to the input: {file}")
        return real_open(file, mode, *a, **k)

    def guarded_os_open(path, flags, *a, **k):
        if str(path).startswith(str(src)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise AssertionError(f"wrote to the input: {path}")
        return real_os_open(path, flags, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    for p in [src, *src.iterdir()]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        convert(src, tmp_path / "mlx", progress=False)
        _, W = load_weights(src)  # the lazy path reads the F8_E8M0 shards in place as well
        mx.eval(W["layers.1.attn.wq_a.scales"])
    finally:
        for p in [src, *src.iterdir()]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    monkeypatch.undo()
    assert _tree_digest(src) == before


def test_cli_matches_function_and_shows_progress(official, tmp_path):
    args = ["--hf-path", str(official["flash"]), "--attention", "affine8", "--group-size", "32"]
    r = subprocess.run([sys.executable, "convert.py", *args, "--mlx-path", str(tmp_path / "cli")],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "converting" in r.stderr and "B/s" in r.stderr and "<" in r.stderr  # bytes, rate, ETA
    convert(official["flash"], tmp_path / "fn", overrides={"attention": "affine8"}, group_size=32, progress=False)
    for f in shard_files(tmp_path / "fn"):
        assert (tmp_path / "cli" / f.name).read_bytes() == f.read_bytes()
    bad = subprocess.run([sys.executable, "convert.py", "--hf-path", str(tmp_path / "nowhere"), "--mlx-path",
                          str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 1 and "nowhere" in bad.stderr and not (tmp_path / "x").exists()


def test_interrupted_conversion_leaves_nothing(official, tmp_path, monkeypatch):
    real, calls = conv._write_unit, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 40:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(conv, "_write_unit", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(official["flash"], tmp_path / "mlx", progress=False, max_shard_gb=1e-4)
    assert len(calls) == 40 and no_leftovers(tmp_path, "mlx") and list(tmp_path.iterdir()) == []


def test_existing_output(official, tmp_path):
    out = tmp_path / "mlx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="mlx"):
        convert(official["flash"], out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert(official["flash"], out, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists() and no_leftovers(tmp_path, "none")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlx"]


def test_converted_dir_refuses_other_formats(official, tmp_path):
    out = convert(official["flash"], tmp_path / "mlx", progress=False)
    with pytest.raises(CheckpointError, match="already converted"):
        load_weights(out, quant_mode="bf16")
    with pytest.raises(CheckpointError, match="already converted"):
        convert(out, tmp_path / "again", progress=False)
    assert no_leftovers(tmp_path, "again")


def test_lazy_load_without_mx_load_support(official, monkeypatch):
    """An MLX build whose mx.load rejects F8_E8M0 still loads official shards (read by our own
    reader, in place) and gives the same arrays."""
    def bits(v):  # bf16 has no numpy dtype: compare its bit patterns
        return np.array(v.view(mx.uint16) if v.dtype == mx.bfloat16 else v)

    _, expect = load_weights(official["flash"])
    expect = {k: bits(v) for k, v in expect.items()}
    real, refused = mx.load, []

    def picky(path, *a, **k):
        if b"F8_E8M0" in Path(path).read_bytes()[:200_000]:
            refused.append(path)
            raise ValueError("[load_safetensors] Unsupported dtype F8_E8M0")
        return real(path, *a, **k)

    monkeypatch.setattr(mx, "load", picky)
    _, got = load_weights(official["flash"])
    assert refused and set(got) == set(expect)
    for k, v in got.items():
        assert np.array_equal(bits(v), expect[k]), k
