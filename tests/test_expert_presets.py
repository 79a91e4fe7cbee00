"""Low-bit routed-expert presets (q3, q2 = gate/up 2-bit + down 3-bit, q2-all): each converts,
records its formats, loads, generates and streams; the stored codes are MLX's affine quantization
of the official FP4 values decoded independently (numpy), and everything but the routed experts
keeps its trained format."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from ckpt_util import dequant_fp4, read_raw, shard_files, small_config

from mlx_dsv4.checkpoint import convert, load_weights, random_official_weights, write_official_checkpoint
from mlx_dsv4.checkpoint.policy import resolve
from mlx_dsv4.generate import generate
from mlx_dsv4.load import load
from tinymodels import rel_err

CFG = small_config("flash", hidden_size=128, moe_intermediate_size=128)  # group 64 divides every expert input
BITS = {"q3": (3, 3), "q2": (2, 3), "q2-all": (2, 2)}  # (w1/w3, w2)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("presets")
    official = write_official_checkpoint(base / "official", CFG, random_official_weights(CFG, seed=5))
    out = {m: convert(official, base / m, quant_mode=m, progress=False) for m in (*BITS, "lossless")}
    return official, out


def test_part_overrides_take_precedence():
    assert resolve("q2")["experts_gate_up"] == "affine2" and resolve("q2")["experts_down"] == "affine3"
    assert resolve("q2", {"experts": "mxfp4"})["experts_down"] == "mxfp4"  # an explicit experts wins over the preset
    f = resolve("lossless", {"experts": "affine4", "experts_down": "affine8"})
    assert (f["experts_gate_up"], f["experts_down"]) == ("affine4", "affine8")
    with pytest.raises(ValueError, match="unknown format"):
        resolve("q2", {"experts_down": "int3"})


@pytest.mark.parametrize("mode", list(BITS))
def test_preset_formats_are_recorded(converted, mode):
    cfg, W = load_weights(converted[1][mode])
    q, gate_up, down = cfg["quantization"], *BITS[mode]
    for L in ("layers.0", "layers.2", "mtp.0"):
        for w, bits in (("w1", gate_up), ("w3", gate_up), ("w2", down)):
            assert q[f"{L}.ffn.experts.{w}"] == {"group_size": 64, "bits": bits, "mode": "affine"}
            assert W[f"{L}.ffn.experts.{w}.biases"].dtype == mx.bfloat16
        # the rest stays as trained: FP8 -> mxfp8 (shared expert, attention), bf16 as is
        assert q[f"{L}.ffn.shared_experts.w1"]["mode"] == "mxfp8" and q[f"{L}.attn.wq_a"]["mode"] == "mxfp8"
    assert "embed" not in q and W["embed.weight"].dtype == mx.bfloat16
    assert cfg["mlx_dsv4"]["quant_mode"] == mode and cfg["mlx_dsv4"]["formats"]["experts_down"] == f"affine{down}"


def test_codes_are_the_official_fp4_values_quantized(converted):
    """Requantized from the official FP4 values (decoded here in numpy), not from anything else."""
    official, out = converted
    raw = {}
    for f in shard_files(official):
        raw.update(read_raw(f))

    def fp4_values(e: int, w: str) -> np.ndarray:
        name = f"layers.1.ffn.experts.{e}.{w}"
        (_, ws, wd), (_, ss, sd) = raw[f"{name}.weight"], raw[f"{name}.scale"]
        return dequant_fp4(np.frombuffer(wd, np.int8).reshape(ws), np.frombuffer(sd, np.uint8).reshape(ss))

    _, W = load_weights(out["q2"])
    for w, bits in (("w1", 2), ("w2", 3)):
        parts = [W[f"layers.1.ffn.experts.{w}.{s}"][3] for s in ("weight", "scales", "biases")]  # expert 3
        stored = [np.array(a.astype(mx.float32)) for a in parts]
        x = mx.array(fp4_values(3, w).astype(np.float32)).astype(mx.bfloat16)  # exact: FP4 x 2^k fits bf16
        want = [np.array(a.astype(mx.float32)) for a in mx.quantize(x, group_size=64, bits=bits, mode="affine")]
        assert all(np.array_equal(a, b) for a, b in zip(stored, want)), w
        other = mx.array(fp4_values(4, w).astype(np.float32)).astype(mx.bfloat16)  # negative control
        assert not np.array_equal(stored[0], np.array(mx.quantize(other, group_size=64, bits=bits)[0]))
        # and the dequantized weights are within one step (+ bf16 rounding of scale and bias) of them: MLX
        # shifts the affine grid so that 0 is exact, which can leave a group's extreme a step away
        deq = np.array(mx.dequantize(*parts, group_size=64, bits=bits).astype(mx.float32))
        ref, scale = fp4_values(3, w), np.repeat(np.abs(stored[1]), 64, axis=1)
        slack = 2.0**-8 * (np.abs(np.repeat(stored[2], 64, axis=1)) + (2**bits - 1) * scale)
        assert (np.abs(deq - ref) <= scale + slack + 1e-12).all()
        assert np.abs(deq - ref).mean() < 0.5 * scale.mean()  # most values round to their nearest level


@pytest.mark.parametrize("mode", list(BITS))
def test_preset_loads_generates_and_streams(converted, mode):
    path = converted[1][mode]
    model, tok = load(path, dtype=mx.float32)
    assert model.layers[1].ffn.experts.w2.bits == BITS[mode][1]
    text = generate(model, tok, [0, 5, 9, 200], max_tokens=6)
    assert isinstance(text, str)
    toks = mx.array(np.random.default_rng(2).integers(0, CFG["vocab_size"], (1, 20)))
    ref = np.array(model(toks))
    assert np.isfinite(ref).all()
    per = 3 * 128 * 128 * 2 / 8  # a rough lower bound of one expert's bytes; half the experts of one layer
    streamed, _ = load(path, dtype=mx.float32, expert_memory_gb=4 * per / 1e9)
    assert np.array_equal(np.array(streamed(toks)), ref)
    assert streamed.expert_store.stats()["misses"] > 0


def test_fewer_bits_drift_further_from_lossless(converted):
    """A sanity check of the formats, not the quality measurement: on the same weights the 3-bit
    experts' logits stay closer to the lossless model's than either 2-bit preset's (q2 against q2-all
    is within noise on random weights: observed 0.34 vs 0.34, q3 0.19)."""
    toks = mx.array(np.random.default_rng(3).integers(0, CFG["vocab_size"], (1, 32)))
    ref = np.array(load(converted[1]["lossless"], dtype=mx.float32)[0](toks))
    err = {m: rel_err(np.array(load(converted[1][m], dtype=mx.float32)[0](toks)), ref) for m in BITS}
    assert 0 < err["q3"] < min(err["q2"], err["q2-all"]), err
