"""Tiny DeepSeek-V4 models of the real architecture: the trained one shipped in the package
(`load("tiny")`, made by mlx_dsv4/train_tiny.py) and random ones for tests (`load("tiny-random")`).

`tiny_hf_config()` is an official-style config.json dict (all three layer types, hash and learned
routing, mHC, MTP) with the real 129,280-token vocabulary, so the real tokenizer works with it.
`random_weights()` draws weights in the official tensor layout (names, shapes, per-expert tensors).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mlx.utils import tree_flatten

SCHEDULES = {
    # backbone compress ratios; the MTP layer's trailing 0 is appended
    "flash": [0, 0, 4, 128, 4],
    "pro": [128, 128, 4, 128, 4],
}


def trained_tiny_path() -> Path:
    """The trained tiny checkpoint inside the package (official layout: FP8 weights, FP4 experts)."""
    return Path(__file__).parent / "tiny_model"


def tiny_hf_config(kind: str = "flash", **overrides) -> dict:
    if kind not in SCHEDULES:
        raise ValueError(f"unknown tiny schedule {kind!r}; choose from {sorted(SCHEDULES)}")
    ratios = overrides.pop("compress_ratios", None) or SCHEDULES[kind] + [0]
    cfg = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": 129280,
        "hidden_size": 64,
        "num_hidden_layers": len(ratios) - 1,
        "num_nextn_predict_layers": 1,
        "num_hash_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "qk_rope_head_dim": 16,
        "q_lora_rank": 32,
        "o_groups": 2,
        "o_lora_rank": 32,
        "sliding_window": 128,
        "compress_ratios": ratios,
        "rope_theta": 10000,
        "compress_rope_theta": 160000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16,
                         "original_max_position_embeddings": 65536, "type": "yarn"},
        "max_position_embeddings": 1048576,
        "index_n_heads": 32,
        "index_head_dim": 32,
        "index_topk": 16,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "swiglu_limit": 10.0,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-06,
        "rms_norm_eps": 1e-06,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
        "initializer_range": 0.02,
        "use_cache": True,
    }
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown tiny config field(s): {sorted(unknown)}")
    cfg.update(overrides)
    return cfg


def bench_hf_config() -> dict:
    """The real V4-Flash layer schedule (43 layers + MTP) and attention geometry (head_dim 512,
    rope 64, indexer keys 128 wide, window 128), with narrow everything else: its cache holds
    exactly as many bytes per token as the real Flash's, while it runs on a laptop CPU."""
    return tiny_hf_config(
        "flash", compress_ratios=[0, 0] + [4, 128] * 20 + [4] + [0], hidden_size=256, num_attention_heads=4,
        head_dim=512, qk_rope_head_dim=64, q_lora_rank=64, o_lora_rank=64, index_n_heads=8, index_head_dim=128,
        index_topk=512, n_routed_experts=8, moe_intermediate_size=64)


def _official_shapes(args) -> dict[str, tuple[tuple[int, ...], str]]:
    """Official tensor names -> (shape, dtype name) derived from the MLX module tree."""
    from .load import official_items
    from .model import Model

    model = Model(args)
    out = {}
    for name, p in tree_flatten(model.parameters()):
        for oname, w in official_items(name, p):  # one tensor per expert; a compressor's wkv and wgate
            out[oname] = (tuple(w.shape), "int64" if name.endswith("tid2eid") else "float32")
    return out


def random_weights(args, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in the official layout, scaled so activations stay O(1) through the stack."""
    rng = np.random.default_rng(seed)
    w = {}
    for name, (shape, dt) in _official_shapes(args).items():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("tid2eid"):
            # k distinct experts per token: the first k of a random permutation of each row
            perm = np.argsort(rng.random((shape[0], args.n_routed_experts)), axis=1)
            w[name] = perm[:, : shape[1]].astype(np.int64)
        elif leaf == "weight" and name.endswith(("norm.weight",)):
            w[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif name.endswith("embed.weight"):
            w[name] = rng.standard_normal(shape).astype(np.float32)
        elif leaf == "weight":
            w[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        elif leaf.endswith("_fn"):
            w[name] = (rng.standard_normal(shape) * 0.5 / np.sqrt(shape[-1])).astype(np.float32)
        elif leaf.endswith("_scale"):
            w[name] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        elif leaf.endswith("_base"):
            w[name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        elif leaf == "attn_sink":
            w[name] = rng.standard_normal(shape).astype(np.float32)
        elif leaf == "ape":
            w[name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        elif leaf == "bias":
            w[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            raise AssertionError(f"no random init rule for {name}")
    return w
