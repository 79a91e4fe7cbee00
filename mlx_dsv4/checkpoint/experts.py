"""Routed experts read one at a time from the checkpoint files, for expert streaming.

A converted checkpoint stacks each layer's experts per projection ([E, ...] for weight, scales and
biases), so expert e is one contiguous byte range of each of those tensors. An official checkpoint
stores every expert as its own tensors (+ `.scale`), converted on read exactly as the lazy loader
converts them (for FP4 experts that is a byte view). Reads are positioned reads (os.pread) of just
those bytes: nothing stays mapped, and the GIL is released, so several experts load in parallel.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import CheckpointError, TruncatedFileError
from .official import EXPERT_RE
from .plan import build_plan
from .policy import output_tensors, quant_params
from .safetensors_io import DTYPES, ShardSet, TensorInfo
from .source import is_converted, open_official, read_config
from .transforms import convert as convert_tensor
from .transforms import to_mx

_STACKED = re.compile(r"^(?P<prefix>.+\.ffn\.experts)\.(?P<w>w[123])\.(?P<sfx>weight|scales|biases)$")


def pread(info: TensorInfo, start: int, nbytes: int, shape: tuple[int, ...]) -> np.ndarray:
    """Bytes [start, start + nbytes) of one tensor's data, as its numpy storage dtype."""
    fd = os.open(info.file, os.O_RDONLY)
    try:
        buf = os.pread(fd, nbytes, info.start + start)
    finally:
        os.close(fd)
    if len(buf) != nbytes:
        raise TruncatedFileError("file shrank while being read", info.file, info.name)
    return np.frombuffer(buf, DTYPES[info.dtype]).reshape(shape)


@dataclass
class LayerExpertFiles:
    """Where one layer's routed experts are: read_raw(e) gets expert e's bytes (plain I/O, safe in
    worker threads), decode(raw) turns them into {"w1.weight": mx.array, ...} in the MLX layout."""

    prefix: str  # layers.3.ffn.experts
    n_experts: int
    quantization: dict[str, dict | None]  # "w1" -> {group_size, bits, mode}, None when dense
    converted: bool
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # converted: "w1.weight" -> [E, ...]
    members: dict[str, list] = field(default_factory=dict)  # official: "w1" -> per expert (weight, scale) infos
    units: dict = field(default_factory=dict)  # official: "w1" -> plan.Unit (source, format, shape)
    group_size: int = 64

    def signature(self) -> tuple:
        """(tensor key, safetensors dtype, per-expert shape) of every tensor of one expert, and the
        projections' quantization: layers that share it can share one store's slots."""
        if self.converted:
            parts = [(k, t.dtype, t.shape[1:]) for k, t in self.tensors.items()]
        else:
            parts = [(f"{w}.{sfx}", dt, shape) for w, u in self.units.items()
                     for sfx, (dt, shape) in output_tensors(u.fmt, u.shape, self.group_size).items()]
        q = tuple((w, tuple(sorted(p.items())) if p else None) for w, p in sorted(self.quantization.items()))
        return tuple(sorted(parts)), q

    def read_raw(self, e: int) -> dict[str, np.ndarray]:
        if not 0 <= e < self.n_experts:
            raise IndexError(f"{self.prefix}: expert {e} of {self.n_experts}")
        out = {}
        if self.converted:
            for key, t in self.tensors.items():
                n = t.nbytes // self.n_experts
                out[key] = pread(t, e * n, n, t.shape[1:])
            return out
        for w, per in self.members.items():
            wi, si = per[e]
            out[f"{w}.weight"] = pread(wi, 0, wi.nbytes, wi.shape)
            if si is not None:
                out[f"{w}.scale"] = pread(si, 0, si.nbytes, si.shape)
        return out

    def decode(self, raw: dict[str, np.ndarray]) -> dict[str, mx.array]:
        if self.converted:
            return {k: to_mx(a, self.tensors[k].dtype) for k, a in raw.items()}
        out = {}
        for w, u in self.units.items():
            wi, si = self.members[w][0]
            s = to_mx(raw[f"{w}.scale"], si.dtype) if si is not None else None
            parts = convert_tensor(u.source, u.fmt, to_mx(raw[f"{w}.weight"], wi.dtype), s, u.shape, self.group_size)
            out.update({f"{w}.{sfx}": a for sfx, a in parts.items()})
        return out


def _converted(root: Path, cfg: dict) -> dict[str, LayerExpertFiles]:
    shards, q = ShardSet(root), cfg.get("quantization", {})
    layers: dict[str, LayerExpertFiles] = {}
    for name, info in shards.tensors.items():
        m = _STACKED.match(name)
        if not m:
            continue
        p = m["prefix"]
        if p not in layers:
            qs = {w: q.get(f"{p}.{w}") if isinstance(q.get(f"{p}.{w}"), dict) else None for w in ("w1", "w2", "w3")}
            layers[p] = LayerExpertFiles(p, info.shape[0], qs, converted=True)
        layers[p].tensors[f"{m['w']}.{m['sfx']}"] = info
    return layers


def _official(root: Path, cfg: dict, formats: dict[str, str], group_size: int) -> dict[str, LayerExpertFiles]:
    ck = open_official(root, cfg)
    layers: dict[str, LayerExpertFiles] = {}
    for u in build_plan(ck.expected, formats, group_size):
        if not u.stacked:
            continue
        m = EXPERT_RE.match(u.members[0][0])
        p, w = m["prefix"], m["w"]
        if p not in layers:
            layers[p] = LayerExpertFiles(p, len(u.members), {}, converted=False, group_size=group_size)
        layers[p].quantization[w] = quant_params(u.fmt, group_size)
        layers[p].units[w] = u
        layers[p].members[w] = [(ck.shards.tensors[wn], ck.shards.tensors[sn] if sn else None) for wn, sn in u.members]
    return layers


def expert_files(root: str | Path, loaded_cfg: dict) -> dict[str, LayerExpertFiles]:
    """prefix -> LayerExpertFiles for every block with routed experts. loaded_cfg is the config that
    load_weights returned (for an official checkpoint it records the formats of the lazy conversion)."""
    root = Path(root)
    if is_converted(read_config(root)):
        layers = _converted(root, loaded_cfg)
    else:
        meta = loaded_cfg.get("mlx_dsv4", {})
        layers = _official(root, read_config(root), meta.get("formats", {}), meta.get("group_size", 64))
    if not layers:
        raise CheckpointError("no routed experts found to stream", root)
    for lf in layers.values():
        want = {"w1", "w2", "w3"}
        have = {k.split(".")[0] for k in lf.tensors} if lf.converted else set(lf.members)
        if have != want:
            raise CheckpointError(f"{lf.prefix}: routed expert projections {sorted(have)}, expected {sorted(want)}",
                                  root)
    return layers
