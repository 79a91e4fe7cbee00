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
