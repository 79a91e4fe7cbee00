"""Small official-style configs (same keys as the HF config.json files) and helpers for the
checkpoint tests."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float64)


def small_config(kind: str = "flash", **overrides) -> dict:
    """Flash-shaped: sliding, CSA and HCA layers plus a hash layer; Pro-shaped: no sliding
    backbone layer. FP8 blocks are 128x128, so most tensors here have partial blocks."""
    ratios = {"flash": [0, 4, 128, 4, 0], "pro": [128, 128, 4, 128, 0]}[kind]
    cfg = {
        "architectures": ["DeepseekV4ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 0, "eos_token_id": 1, "expert_dtype": "fp4", "hc_eps": 1e-06, "hc_mult": 4,
        "hc_sinkhorn_iters": 20, "head_dim": 64, "hidden_act": "silu", "hidden_size": 64,
        "index_head_dim": 32, "index_n_heads": 4, "index_topk": 8, "initializer_range": 0.02,
        "max_position_embeddings": 1048576, "model_type": "deepseek_v4", "moe_intermediate_size": 32,
        "n_routed_experts": 8, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 4,
        "num_experts_per_tok": 2, "num_hidden_layers": len(ratios) - 1, "num_hash_layers": 1,
        "num_key_value_heads": 1, "num_nextn_predict_layers": 1, "o_groups": 2, "o_lora_rank": 32,
        "q_lora_rank": 32, "qk_rope_head_dim": 16,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16,
                         "original_max_position_embeddings": 65536, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus", "sliding_window": 128,
        "swiglu_limit": 10.0, "tie_word_embeddings": False, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "transformers_version": "4.57.1", "use_cache": True, "vocab_size": 512, "compress_rope_theta": 160000,
        "compress_ratios": ratios,
    }
    for k, v in overrides.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg


# ---- independent numpy decoders (straight from the format definitions) ------------------------

def e8m0(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b).astype(np.float64)
    return np.where(b == 255, np.nan, np.exp2(b - 127))


def e4m3(b: np.ndarray) -> np.ndarray:
    """e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal; S.1111.111 NaN."""
    b = np.asarray(b).astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    e, m = (b >> 3) & 0xF, b & 7
    mag = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * np.exp2(e - 7.0))
    return np.where((b & 0x7F) == 0x7F, np.nan, sign * mag)


def dequant_fp8(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    out, inp = w.shape
    full = np.repeat(np.repeat(e8m0(s), 128, 0), 128, 1)[:out, :inp]
    return e4m3(w.view(np.uint8)) * full


def dequant_fp4(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    b = w.view(np.uint8)
    codes = np.empty((b.shape[0], b.shape[1] * 2), np.uint8)
    codes[:, 0::2], codes[:, 1::2] = b & 15, b >> 4
    return E2M1[codes] * np.repeat(e8m0(s), 32, 1)


def bf16(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def read_raw(path: Path) -> dict[str, tuple[str, list, bytes]]:
    """A second, minimal safetensors reader (no validation) for cross-checking ours."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    hdr = json.loads(data[8:8 + n])
    hdr.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], data[8 + n + v["data_offsets"][0]: 8 + n + v["data_offsets"][1]])
            for k, v in hdr.items()}


def shard_files(root: Path) -> list[Path]:
    return sorted(Path(root).glob("*.safetensors"))


def write_raw(path: Path, entries: dict[str, tuple[str, list, bytes]], metadata: dict | None = None) -> None:
    """Write a safetensors file from raw pieces, in the given order (no validation: used to
    fabricate broken files)."""
    hdr, off = ({"__metadata__": metadata} if metadata else {}), 0
    for k, (dt, shape, data) in entries.items():
        hdr[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    raw = json.dumps(hdr).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, _, data in entries.values():
            f.write(data)


def shard_of(root: Path, tensor: str) -> Path:
    wmap = json.loads((Path(root) / "model.safetensors.index.json").read_text())["weight_map"]
    return Path(root) / wmap[tensor]


def no_leftovers(parent: Path, name: str) -> bool:
    """Neither the output nor any hidden temporary sibling of it exists."""
    return not any(p.name == name or p.name.startswith(f".{name}.") for p in Path(parent).iterdir())
