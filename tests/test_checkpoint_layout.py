"""The official layout: expected_tensors reproduces the published facts of the real checkpoints,
and the test writer produces exactly that layout (checked with a separate minimal reader)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from ckpt_util import E2M1, bf16, dequant_fp4, dequant_fp8, e8m0, read_raw, shard_files, small_config

from mlx_dsv4.checkpoint.official import expected_tensors
from mlx_dsv4.checkpoint.safetensors_io import nbytes
from mlx_dsv4.checkpoint.writer_official import quantize_fp4_weight, random_official_weights, write_official_checkpoint


def _cfg(data_dir, name):
    return json.loads((data_dir / "configs" / f"DeepSeek-V4-{name}.config.json").read_text())


def test_flash_inventory_matches_the_published_index(data_dir):
    """reference/README.md: 69,187 tensors, dtype counts, total_size 159,609,485,896 B; MTP 1,575."""
    t = expected_tensors(_cfg(data_dir, "Flash"))
    assert len(t) == 69_187
    assert Counter(dt for dt, _ in t.values()) == {"BF16": 433, "F32": 417, "F8_E4M3": 375, "F8_E8M0": 34_167,
                                                   "I8": 33_792, "I64": 3}
    assert sum(nbytes(*s) for s in t.values()) == 159_609_485_896
    assert sum(n.startswith("mtp.0.") for n in t) == 1_575
    # spot checks against the spec's table (section 7.1)
    assert t["layers.5.attn.wo_a.weight"] == ("F8_E4M3", (8192, 4096))
    assert t["layers.5.attn.wo_a.scale"] == ("F8_E8M0", (64, 32))
    assert t["layers.7.ffn.experts.255.w2.weight"] == ("I8", (4096, 1024))
    assert t["layers.7.ffn.experts.255.w2.scale"] == ("F8_E8M0", (4096, 64))
    assert t["layers.2.ffn.gate.tid2eid"] == ("I64", (129_280, 6)) and "layers.3.ffn.gate.tid2eid" not in t
    assert t["layers.2.attn.compressor.ape"] == ("F32", (4, 1024))
    assert t["layers.3.attn.compressor.ape"] == ("F32", (128, 512))
    assert "layers.1.attn.compressor.ape" not in t and "layers.3.attn.indexer.wq_b.weight" not in t


def test_pro_and_flash0731_inventories(data_dir):
    assert len(expected_tensors(_cfg(data_dir, "Pro"))) == 145_116
    # Flash-0731: 72,317 tensors and 166,878,536,440 B, of which the DSpark mtp.* namespace (skipped)
    # holds 4,705 tensors and 10,862,838,300 B.
    t = expected_tensors(_cfg(data_dir, "Flash-0731"))
    assert len(t) == 72_317 - 4_705
    assert sum(nbytes(*s) for s in t.values()) == 166_878_536_440 - 10_862_838_300


@pytest.mark.parametrize("kind, expert_dtype", [("flash", "fp4"), ("pro", "fp4"), ("flash", "fp8")])
def test_writer_produces_the_official_layout(tmp_path, kind, expert_dtype):
    cfg = small_config(kind, expert_dtype=expert_dtype if expert_dtype == "fp4" else None)
    w = random_official_weights(cfg, seed=3)
    root = write_official_checkpoint(tmp_path / "ck", cfg, w, max_shard_bytes=300_000)
    files = shard_files(root)
    assert len(files) > 1
    raw = {}
    for f in files:
        raw.update(read_raw(f))
    expected = expected_tensors(cfg)
    assert {k: (dt, tuple(shape)) for k, (dt, shape, _) in raw.items()} == expected
    index = json.loads((root / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == sum(nbytes(*s) for s in expected.values())
    assert json.loads((root / "config.json").read_text()) == cfg
    assert (root / "tokenizer.json").is_file() and (root / "tokenizer_config.json").is_file()
    # stored values decode (independently) to the given weights within the format's rounding
    for name, x in w.items():
        dt, shape, data = raw[name]
        stored = np.frombuffer(data, {"BF16": np.uint16, "F32": np.float32, "I64": np.int64,
                                      "F8_E4M3": np.uint8, "I8": np.int8}[dt]).reshape(shape)
        if dt in ("F8_E4M3", "I8"):
            s = np.frombuffer(raw[name[:-6] + "scale"][2], np.uint8).reshape(raw[name[:-6] + "scale"][1])
            y = dequant_fp8(stored, s) if dt == "F8_E4M3" else dequant_fp4(stored, s)
            # round to nearest: half an e4m3 step (2^-4 relative; 2^-10 of the scale when subnormal)
            # or half an e2m1 step (2^-2 relative; 0.25 of the scale when subnormal)
            scale = np.repeat(np.repeat(e8m0(s), 128, 0), 128, 1)[: x.shape[0], : x.shape[1]] \
                if dt == "F8_E4M3" else np.repeat(e8m0(s), 32, 1)
            rel, sub = (2.0**-4, 2.0**-10) if dt == "F8_E4M3" else (2.0**-2, 0.25)
            assert (np.abs(y - x) <= np.maximum(np.abs(x) * rel, scale * sub) * (1 + 1e-9)).all(), name
            assert np.abs(y - x).max() > 0 or not np.any(x), name  # really quantized
        elif dt == "BF16":
            assert np.array_equal(bf16(stored), x), name  # random weights are bf16-representable
        else:
            assert np.array_equal(stored, x), name


def test_tid2eid_rows_are_distinct_valid_experts():
    cfg = small_config()
    t = random_official_weights(cfg, seed=0)["layers.0.ffn.gate.tid2eid"]
    assert t.dtype == np.int64 and t.shape == (512, 2)
    assert t.min() >= 0 and t.max() < 8 and all(len(set(r)) == 2 for r in t)


def test_random_weights_are_deterministic_per_tensor():
    a = random_official_weights(small_config(), seed=7)
    b = random_official_weights(small_config(num_hidden_layers=2, compress_ratios=[0, 4, 0]), seed=7)
    c = random_official_weights(small_config(), seed=8)
    assert all(np.array_equal(a[k], b[k]) for k in b if k in a and a[k].shape == b[k].shape)
    assert not np.array_equal(a["embed.weight"], c["embed.weight"])
    assert a["layers.1.attn_norm.weight"].mean() == pytest.approx(1, abs=0.05)


def test_fp4_nibble_order_hand_built():
    """Row [0.5, -6, 0 x 30]: codes 1 and 15, so the first byte is 0xF1 (element 0 low nibble)."""
    x = np.zeros((1, 32), np.float32)
    x[0, :2] = (0.5, -6.0)
    w, s = quantize_fp4_weight(x)
    assert w.view(np.uint8)[0, 0] == 0xF1 and s[0, 0] == 127  # amax 6 -> scale 2^0
    assert E2M1[w.view(np.uint8)[0, 0] & 15] == 0.5 and E2M1[w.view(np.uint8)[0, 0] >> 4] == -6
