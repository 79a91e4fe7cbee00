"""Open a checkpoint directory: read its config, tell official from converted, and for an official
one validate every shard header against the layout the config implies, before any data is read."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointConfigError, CheckpointError
from .official import Spec, check_inventory, detect_expert_dtype, model_args, skip_reason
from .safetensors_io import ShardSet

CONVERTED_KEY = "mlx_dsv4"  # config.json key our converter writes


def read_config(root: str | Path) -> dict:
    p = Path(root) / "config.json"
    if not p.is_file():
        raise CheckpointConfigError("no config.json in the checkpoint directory", p)
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointConfigError(f"not valid JSON ({e})", p) from None
    if not isinstance(cfg, dict):
        raise CheckpointConfigError("must hold a JSON object", p)
    return cfg


def is_converted(cfg: dict) -> bool:
    return CONVERTED_KEY in cfg


@dataclass
class OfficialCheckpoint:
    root: Path
    config: dict
    shards: ShardSet
    expert_dtype: str  # as stored: fp4 | fp8
    expected: dict[str, Spec]
    notes: list[str] = field(default_factory=list)


def open_official(root: str | Path, config: dict | None = None) -> OfficialCheckpoint:
    """Validate an official checkpoint (shards present and complete, every tensor known, shaped
    and typed as config.json implies). Raises the specific CheckpointError otherwise."""
    root = Path(root)
    cfg = read_config(root) if config is None else config
    if is_converted(cfg):
        raise CheckpointError("already converted to the MLX layout; load it directly", root / "config.json")
    try:
        model_args(cfg)  # validate the config before its fields size anything
    except CheckpointConfigError as e:
        raise CheckpointConfigError(str(e), root / "config.json") from None
    shards = ShardSet(root, ignore=lambda n: skip_reason(n, cfg) is not None)
    expert_dtype = detect_expert_dtype(shards, cfg)
    expected, skipped = check_inventory(shards, cfg, expert_dtype)
    notes = []
    stated = cfg.get("expert_dtype")
    if stated != expert_dtype and not (stated is None and expert_dtype == "fp8"):
        notes.append(f"config.json expert_dtype is {stated!r} but the experts are stored as {expert_dtype}")
    reasons = Counter(skip_reason(n, cfg) for n in {**shards.ignored, **skipped})
    notes += [f"skipped {k} tensors: {r}" for r, k in reasons.items()]
    return OfficialCheckpoint(root, cfg, shards, expert_dtype, expected, notes)
