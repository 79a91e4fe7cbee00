"""One typed config for every DeepSeek-V4 checkpoint, read from the official HF config.json.

Field names follow the official inference code's ModelArgs (dim, n_heads, ...), so the
modules read like the paper. Every value comes from the file: ModelArgs' own defaults differ
from the release (compress_rope_theta, rope_factor, original_seq_len) and are never used.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that this runtime cannot serve; the message names the field."""


SUPPORTED_RATIOS = (0, 4, 128)


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    head_dim: int
    rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window_size: int
    compress_ratios: tuple[int, ...]  # one per backbone layer, then one per MTP layer
    rope_theta: float
    compress_rope_theta: float
    rope_factor: float
    original_seq_len: int
    beta_fast: float
    beta_slow: float
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    n_shared_experts: int
    n_activated_experts: int
    moe_inter_dim: int
    route_scale: float
    swiglu_limit: float
    n_hash_layers: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    norm_eps: float
    n_mtp_layers: int = 1
    max_position_embeddings: int = 1048576
    bos_token_id: int = 0
    eos_token_id: int = 1
    expert_dtype: str | None = None
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    def ratio(self, layer: int) -> int:
        """Compress ratio of backbone layer `layer`, or of MTP layer `layer - n_layers`."""
        return self.compress_ratios[layer]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _req(cfg: dict, key: str, kind=(int,)):
    if key not in cfg:
        raise ConfigError(f"config.json: missing required field '{key}'")
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, kind):
        raise ConfigError(f"config.json: field '{key}' has the wrong type ({type(v).__name__}: {v!r})")
    return v


def _pos(cfg: dict, key: str, kind=(int,)):
    v = _req(cfg, key, kind)
    if v <= 0:
        raise ConfigError(f"config.json: field '{key}' must be positive, got {v!r}")
    return v


def from_hf_config(cfg: dict) -> ModelArgs:
    """Validate an official (HF-style) DeepSeek-V4 config.json dict and map it to ModelArgs."""
    if not isinstance(cfg, dict):
        raise ConfigError("config.json must hold a JSON object")
    mt = cfg.get("model_type")
    if mt != "deepseek_v4":
        hint = " (V4.1 is a different architecture: vision tower, Engram memory)" if mt == "deepseek_v41" else ""
        raise ConfigError(f"config.json: field 'model_type' is {mt!r}; only 'deepseek_v4' is supported{hint}")
    num = (int, float)
    n_layers = _pos(cfg, "num_hidden_layers")
    n_mtp = _req(cfg, "num_nextn_predict_layers")
    ratios = _req(cfg, "compress_ratios", (list,))
    notes: list[str] = []
    if "dspark_block_size" in cfg:  # Flash-0731: mtp.* holds DSpark drafter stages, not a V4 MTP block
        notes.append("DSpark drafter stages (mtp.0..) are recognised and skipped; speculative decoding with "
                     "them is not implemented yet")
        n_mtp = 0
    if len(ratios) < n_layers + n_mtp:
        raise ConfigError(
            f"config.json: field 'compress_ratios' has {len(ratios)} entries, need num_hidden_layers + "
            f"num_nextn_predict_layers = {n_layers + n_mtp}"
        )
    if len(ratios) > n_layers + n_mtp:
        if "dspark_block_size" not in cfg:
            raise ConfigError(f"config.json: field 'compress_ratios' has {len(ratios)} entries, expected "
                              f"{n_layers + n_mtp} (num_hidden_layers + num_nextn_predict_layers)")
        ratios = ratios[: n_layers + n_mtp]
    for i, r in enumerate(ratios):
        if r not in SUPPORTED_RATIOS:
            raise ConfigError(f"config.json: field 'compress_ratios[{i}]' is {r!r}; expected one of {SUPPORTED_RATIOS}")
    if n_mtp > 0 and any(ratios[n_layers:]):
        raise ConfigError("config.json: field 'compress_ratios' must be 0 for the MTP layers")

    rs = cfg.get("rope_scaling") or {}
    if not isinstance(rs, dict):
        raise ConfigError("config.json: field 'rope_scaling' must be an object")
    rs_type = rs.get("type", rs.get("rope_type", "yarn" if rs else None))
    if rs and rs_type != "yarn":
        raise ConfigError(f"config.json: field 'rope_scaling.type' is {rs_type!r}; only 'yarn' is supported")
    if any(r for r in ratios) and not rs:
        raise ConfigError("config.json: field 'rope_scaling' is required for compressed layers (YaRN)")

    if _req(cfg, "num_key_value_heads") != 1:
        raise ConfigError("config.json: field 'num_key_value_heads' must be 1 (single shared K=V head)")
    if cfg.get("scoring_func", "sqrtsoftplus") != "sqrtsoftplus":
        raise ConfigError(f"config.json: field 'scoring_func' is {cfg['scoring_func']!r}; expected 'sqrtsoftplus'")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: field 'hidden_act' is {cfg['hidden_act']!r}; expected 'silu'")
    if cfg.get("tie_word_embeddings", False):
        raise ConfigError("config.json: field 'tie_word_embeddings' must be false for DeepSeek-V4")

    a = ModelArgs(
        vocab_size=_pos(cfg, "vocab_size"),
        dim=_pos(cfg, "hidden_size"),
        n_layers=n_layers,
        n_heads=_pos(cfg, "num_attention_heads"),
        head_dim=_pos(cfg, "head_dim"),
        rope_head_dim=_pos(cfg, "qk_rope_head_dim"),
        q_lora_rank=_pos(cfg, "q_lora_rank"),
        o_groups=_pos(cfg, "o_groups"),
        o_lora_rank=_pos(cfg, "o_lora_rank"),
        window_size=_pos(cfg, "sliding_window"),
        compress_ratios=tuple(ratios),
        rope_theta=float(_pos(cfg, "rope_theta", num)),
        compress_rope_theta=float(_pos(cfg, "compress_rope_theta", num)),
        rope_factor=float(rs.get("factor", 1.0)),
        original_seq_len=int(rs.get("original_max_position_embeddings", 0)),
        beta_fast=float(rs.get("beta_fast", 32)),
        beta_slow=float(rs.get("beta_slow", 1)),
        index_n_heads=_pos(cfg, "index_n_heads"),
        index_head_dim=_pos(cfg, "index_head_dim"),
        index_topk=_pos(cfg, "index_topk"),
        n_routed_experts=_pos(cfg, "n_routed_experts"),
        n_shared_experts=_pos(cfg, "n_shared_experts"),
        n_activated_experts=_pos(cfg, "num_experts_per_tok"),
        moe_inter_dim=_pos(cfg, "moe_intermediate_size"),
        route_scale=float(_pos(cfg, "routed_scaling_factor", num)),
        swiglu_limit=float(_pos(cfg, "swiglu_limit", num)),
        n_hash_layers=_req(cfg, "num_hash_layers"),
        hc_mult=_pos(cfg, "hc_mult"),
        hc_sinkhorn_iters=_pos(cfg, "hc_sinkhorn_iters"),
        hc_eps=float(_pos(cfg, "hc_eps", num)),
        norm_eps=float(_pos(cfg, "rms_norm_eps", num)),
        n_mtp_layers=n_mtp,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 1048576)),
        bos_token_id=int(cfg.get("bos_token_id", 0)),
        eos_token_id=int(cfg.get("eos_token_id", 1)),
        expert_dtype=cfg.get("expert_dtype"),
        notes=tuple(notes),
    )
    _check_consistency(a)
    for n in notes:
        warnings.warn(n, stacklevel=2)
    return a


def _check_consistency(a: ModelArgs) -> None:
    def bad(field_name: str, why: str):
        raise ConfigError(f"config.json: field '{field_name}' is inconsistent: {why}")

    if a.rope_head_dim % 2 or a.rope_head_dim > a.head_dim:
        bad("qk_rope_head_dim", f"{a.rope_head_dim} must be even and <= head_dim {a.head_dim}")
    if a.n_heads % a.o_groups:
        bad("o_groups", f"num_attention_heads {a.n_heads} is not divisible by o_groups {a.o_groups}")
    if a.n_activated_experts > a.n_routed_experts:
        bad("num_experts_per_tok", f"{a.n_activated_experts} > n_routed_experts {a.n_routed_experts}")
    if a.n_hash_layers > a.n_layers:
        bad("num_hash_layers", f"{a.n_hash_layers} > num_hidden_layers {a.n_layers}")
    if a.n_shared_experts != 1:
        bad("n_shared_experts", "exactly one shared expert is supported")
    if any(a.compress_ratios) and a.index_head_dim & (a.index_head_dim - 1):
        bad("index_head_dim", f"{a.index_head_dim} must be a power of two (Hadamard transform)")
    if a.index_head_dim < a.rope_head_dim:
        bad("index_head_dim", f"{a.index_head_dim} < qk_rope_head_dim {a.rope_head_dim}")
    if a.expert_dtype not in (None, "fp4", "fp8"):
        bad("expert_dtype", f"{a.expert_dtype!r} is not one of fp4, fp8")
    if not math.isfinite(a.hc_eps) or not math.isfinite(a.norm_eps):
        bad("hc_eps", "must be finite")


def load_config(path: str | Path) -> tuple[ModelArgs, dict]:
    """Read `path` (a config.json or a directory holding one) -> (ModelArgs, raw dict)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"no config.json at {p}")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    return from_hf_config(raw), raw
