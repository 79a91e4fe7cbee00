"""Official FP8/FP4 checkpoints -> converter -> mlx_dsv4.load: the model runs on exactly the
official values.

Reference: the same model built from the exact fp32 dequantization of the official tensors
(load_weights(quant_mode="fp32"), checked bit-exact against numpy decoders in the checkpoint
tests). Tolerance 1e-5 of the largest |logit| (norm-relative): quantized matmuls (mxfp4 / mxfp8)
accumulate in another order than dense fp32 matmuls; observed ~5e-6.
"""

import mlx.core as mx
import numpy as np
import pytest

from ckpt_util import small_config
from mlx_dsv4.checkpoint import convert, load_weights, random_official_weights, write_official_checkpoint
from mlx_dsv4.config import from_hf_config
from mlx_dsv4.load import build_model, load, to_model_layout
from tinymodels import rel_err

TOL = 1e-5


@pytest.fixture(scope="module", params=["fp4", "fp8"], ids=["fp4_experts", "fp8_experts"])
def official(request, tmp_path_factory):
    cfg = small_config("flash", expert_dtype=request.param if request.param == "fp4" else None)
    root = tmp_path_factory.mktemp(f"official_{request.param}")
    write_official_checkpoint(root, cfg, random_official_weights(cfg, seed=3, expert_dtype=request.param),
                              expert_dtype=request.param)
    return cfg, root


def _reference(root):
    cfg, w = load_weights(root, quant_mode="fp32")
    args = from_hf_config(cfg)
    return build_model(args, to_model_layout(w, args), mx.float32, simulate_qat=False)


def test_converted_matches_dequantized(official, tmp_path):
    cfg, root = official
    out = tmp_path / "mlx"
    convert(root, out, progress=False)
    model, tok = load(out, dtype=mx.float32, simulate_qat=False)
    assert "scales" in model.layers[1].ffn.experts.w1 and "scales" in model.layers[1].attn.wo_a
    toks = mx.array(np.random.default_rng(0).integers(0, cfg["vocab_size"], (2, 150)))
    ref = np.array(_reference(root)(toks))
    assert rel_err(np.array(model(toks)), ref) <= TOL


def test_official_dir_loads_lazily_converted(official):
    cfg, root = official
    model, _ = load(root, dtype=mx.float32, simulate_qat=False)
    toks = mx.array(np.random.default_rng(1).integers(0, cfg["vocab_size"], (1, 140)))
    assert rel_err(np.array(model(toks)), np.array(_reference(root)(toks))) <= TOL


def test_unquantized_official_dir(tmp_path):
    """Issue 2's path: an official-layout directory holding bf16/fp32 tensors loads as they are."""
    from safetensors.numpy import save_file

    from mlx_dsv4.tiny import random_weights, tiny_hf_config
    import json

    cfg = tiny_hf_config("pro")
    args = from_hf_config(cfg)
    w = random_weights(args, 4)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v for k, v in w.items()}, str(tmp_path / "model.safetensors"))
    model, _ = load(tmp_path, dtype=mx.float32, simulate_qat=False)
    ref = build_model(args, to_model_layout({k: mx.array(v) for k, v in w.items()}, args), mx.float32, False)
    toks = mx.array(np.random.default_rng(2).integers(0, 129280, (1, 40)))
    assert rel_err(np.array(model(toks)), np.array(ref(toks))) == 0.0


def test_compressor_projections_fuse_losslessly(tmp_path):
    """A compressor's wkv and wgate (official names) are one projection in the model, wkv_gate: rows wkv, then
    wgate. Truth: the file's own tensors. Converted to affine8, the fused packed weight, scales and biases are
    the two files' rows bit for bit, and the fused projection of x is the two quantized matmuls of x side by side."""
    from mlx_dsv4.load import model_quantization

    cfg = small_config("flash")
    root = tmp_path / "official"
    write_official_checkpoint(root, cfg, random_official_weights(cfg, seed=5))
    out = convert(root, tmp_path / "mlx", overrides={"compressor": "affine8"}, group_size=32, progress=False)
    qcfg, files = load_weights(out)
    model, _ = load(out, dtype=mx.float32, simulate_qat=False)
    for prefix, comp in (("layers.1.attn.compressor", model.layers[1].attn.compressor),  # CSA: both compressors
                         ("layers.1.attn.indexer.compressor", model.layers[1].attn.indexer.compressor)):
        q = qcfg["quantization"][f"{prefix}.wkv"]
        assert model_quantization(qcfg["quantization"])[f"{prefix}.wkv_gate"] == q
        for part in ("weight", "scales", "biases"):
            both = mx.concatenate([files[f"{prefix}.wkv.{part}"], files[f"{prefix}.wgate.{part}"]])
            assert mx.array_equal(comp.wkv_gate[part], both).item(), part
        x = mx.array(np.random.default_rng(0).standard_normal((1, 3, cfg["hidden_size"])).astype(np.float32))
        halves = [mx.quantized_matmul(x, *(files[f"{prefix}.{w}.{p}"] for p in ("weight", "scales", "biases")),
                                      transpose=True, group_size=q["group_size"], bits=q["bits"]) for w in ("wkv", "wgate")]
        assert mx.array_equal(comp.project(x), mx.concatenate(halves, axis=-1)).item()


def test_model_layout_round_trips_and_names_a_missing_partner():
    """official_items inverts to_model_layout (experts unstacked, compressor pairs split): the same names and
    tensors bit for bit. A compressor tensor without its partner, or a pair quantized two ways, is refused
    with a message naming it."""
    from mlx_dsv4.load import WeightsError, model_quantization, official_items
    from mlx_dsv4.tiny import random_weights, tiny_hf_config

    args = from_hf_config(tiny_hf_config("flash"))
    w = {k: mx.array(v) for k, v in random_weights(args, 1).items()}
    model_w = to_model_layout(w, args)
    assert "layers.2.attn.compressor.wkv_gate.weight" in model_w
    back = dict(p for k, v in model_w.items() for p in official_items(k, v))
    assert back.keys() == w.keys()
    assert all(mx.array_equal(back[k], w[k].astype(back[k].dtype)).item() for k in w)
    lone = {k: v for k, v in w.items() if k != "layers.3.attn.compressor.wgate.weight"}
    with pytest.raises(WeightsError, match=r"layers\.3\.attn\.compressor\.wkv\.weight: its compressor's wgate"):
        to_model_layout(lone, args)
    q8, q4 = {"group_size": 32, "bits": 8, "mode": "affine"}, {"group_size": 32, "bits": 4, "mode": "affine"}
    with pytest.raises(WeightsError, match=r"compressor\.wgate is quantized"):
        model_quantization({"layers.3.attn.compressor.wkv": q8, "layers.3.attn.compressor.wgate": q4})
