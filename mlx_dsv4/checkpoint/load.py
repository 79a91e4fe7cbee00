"""load_weights: a converted MLX directory, an official directory or a Hub repo id ->
(config dict, {MLX name: mx.array}).

Nothing is read eagerly. Converted shards go through mx.load, whose arrays are read on first use.
Official shards are opened the same way and the conversion (views, scale expansion, stacking of
experts) is returned as lazy MLX graphs, so only the tensors the model evaluates are ever read.
The returned config carries `quantization` exactly as a converted checkpoint's would, so the model
builds the same modules either way.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import mlx.core as mx

from .errors import CheckpointError
from .hub import resolve_source
from .plan import build_plan
from .policy import resolve
from .safetensors_io import ShardSet, read_rows, read_tensor
from .source import CONVERTED_KEY, is_converted, open_official, read_config
from .transforms import convert as convert_tensor
from .transforms import to_mx

log = logging.getLogger("mlx_dsv4.checkpoint")
_STACKED = re.compile(r"\.ffn\.experts\.w[123]\.(weight|scales|biases)$")  # converted: [E, ...] per projection


def _mx_load(path: Path, shards: ShardSet) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as e:  # an MLX build that rejects a dtype (F8_E8M0): read it ourselves, eagerly
        log.warning("mx.load(%s) failed (%s); reading it into memory instead", path.name, e)
        return {n: to_mx(read_tensor(i), i.dtype) for n, i in shards.tensors.items() if i.file == path}


def _lazy_official(root: Path, cfg: dict, quant_mode: str, overrides, group_size: int, experts: range | None):
    from .convert import mlx_config

    ck = open_official(root, cfg)
    formats = resolve(quant_mode, overrides)
    units = build_plan(ck.expected, formats, group_size)
    raw: dict[str, mx.array] = {}
    for f in ck.shards.files:
        raw.update(_mx_load(root / f, ck.shards))
    weights = {}
    for u in units:
        members = [u.members[i] for i in experts] if u.stacked and experts is not None else u.members
        parts = [convert_tensor(u.source, u.fmt, raw[w], raw[s] if s else None, u.shape, group_size)
                 for w, s in members]
        for sfx, (name, _, shape) in u.outputs.items():
            shape = (len(members), *shape[1:]) if u.stacked else shape
            arr = mx.stack([p[sfx] for p in parts]) if u.stacked else parts[0][sfx]
            if tuple(arr.shape) != tuple(shape):
                raise AssertionError(f"{name}: built {arr.shape}, planned {shape}")  # a planning bug
            weights[name] = arr
    return mlx_config(ck, units, formats, quant_mode, group_size, str(root)), weights


def load_weights(path: str | Path, quant_mode: str | None = None, overrides: dict[str, str] | None = None,
                 group_size: int = 64, revision: str | None = None,
                 experts: range | None = None) -> tuple[dict, dict[str, mx.array]]:
    """-> (config.json dict with `quantization` and `mlx_dsv4` entries, {name: lazy mx.array}).

    experts: keep only these routed experts in the stacked expert tensors (a tensor-parallel rank's).
    Official checkpoints stack only their per-expert tensors; converted ones read just their rows
    (at once: a contiguous slice of each stacked tensor), so a rank never reads the others'.

    For an official checkpoint, quant_mode/overrides choose the formats as in convert()
    (default lossless; 'fp32' gives the exact dequantized weights). A converted checkpoint is
    returned as stored: asking for another format there is an error (re-convert instead).
    """
    root = resolve_source(path, revision)
    cfg = read_config(root)
    if not is_converted(cfg):
        return _lazy_official(root, cfg, quant_mode or "lossless", overrides, group_size, experts)
    stored = cfg[CONVERTED_KEY].get("quant_mode")
    if (quant_mode and quant_mode != stored) or overrides:
        raise CheckpointError(f"already converted with quant mode {stored!r}; convert the official checkpoint "
                              "again to choose other formats", root / "config.json")
    shards = ShardSet(root)
    weights: dict[str, mx.array] = {}
    for f in shards.files:
        weights.update(_mx_load(root / f, shards))
    if experts is not None:
        for name in [n for n in weights if _STACKED.search(n)]:
            info = shards.tensors[name]
            weights[name] = to_mx(read_rows(info, experts.start, experts.stop), info.dtype)
    return cfg, weights
