"""Official tensors -> MLX output tensors, decided from the config before any data is read.

A Unit is one MLX weight: a single official tensor (+ its `.scale`) or, for routed experts, the
E per-expert tensors of one layer and projection stacked on a new leading axis. Because every
output name, dtype and shape is known up front, the converter can write headers first and stream
each expert into its slot, so no layer ever has to be assembled in memory.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .official import EXPERT_RE, Spec
from .policy import output_tensors, quant_params, target, tensor_class
from .safetensors_io import nbytes

SOURCE = {"F8_E4M3": "fp8", "I8": "fp4", "BF16": "bf16", "F32": "f32", "I64": "i64"}


@dataclass
class Unit:
    name: str  # MLX name of the weight, e.g. layers.0.ffn.experts.w1.weight
    source: str  # fp8 | fp4 | bf16 | f32 | i64
    members: list[tuple[str, str | None]]  # official (tensor, scale) names; several when stacked
    shape: tuple[int, ...]  # logical shape of one member ([out, in] for weights)
    cls: str
    fmt: str  # concrete output format (mxfp4, mxfp8, affine8, bf16, fp32, int32)
    outputs: dict[str, tuple[str, str, tuple[int, ...]]] = field(default_factory=dict)  # suffix -> (name, dtype, shape)
    note: str | None = None
    in_bytes: int = 0

    @property
    def stacked(self) -> bool:
        return ".ffn.experts." in self.name

    @property
    def module(self) -> str:
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name


def _unit(name: str, members, expected: dict[str, Spec], formats: dict[str, str], group_size: int) -> Unit:
    dt, shape = expected[members[0][0]]
    source = SOURCE[dt]
    if source == "fp4":
        shape = (shape[0], shape[1] * 2)
    cls = tensor_class(name)
    in_bytes = sum(nbytes(*expected[n]) for m in members for n in m if n)
    if source == "i64":
        u = Unit(name, source, members, shape, cls, "int32", in_bytes=in_bytes)
        u.outputs = {"weight": (name, "I32", shape)}
        return u
    fmt, note = target(formats[cls], source, shape[-1], group_size)
    u = Unit(name, source, members, shape, cls, fmt, note=note, in_bytes=in_bytes)
    full = (len(members), *shape) if u.stacked else shape
    base = u.module
    u.outputs = {sfx: (name if sfx == "weight" else f"{base}.{sfx}", odt, oshape)
                 for sfx, (odt, oshape) in output_tensors(fmt, full, group_size).items()}
    return u


def build_plan(expected: dict[str, Spec], formats: dict[str, str], group_size: int) -> list[Unit]:
    """Units in checkpoint order (embed, layers 0.., head, MTP); experts become one unit per
    (layer, projection), placed where expert 0 was."""
    order: list[str] = []
    members: dict[str, list] = {}
    for name, (dt, _) in expected.items():
        if name.endswith(".scale"):
            continue
        scale = name[: -len("weight")] + "scale" if dt in ("F8_E4M3", "I8") else None
        m = EXPERT_RE.match(name)
        key = f"{m['prefix']}.{m['w']}.weight" if m else name
        if key not in members:
            order.append(key)
            members[key] = []
        members[key].append((name, scale))
    return [_unit(k, members[k], expected, formats, group_size) for k in order]


def quantization_config(units: list[Unit], group_size: int) -> dict:
    """MLX-style: per quantized module {group_size, bits, mode}, plus top-level defaults (the most
    common entry) for loaders that only read those."""
    per = {u.module: quant_params(u.fmt, group_size) for u in units if quant_params(u.fmt, group_size)}
    if not per:
        return {}
    common = Counter(tuple(sorted(p.items())) for p in per.values()).most_common(1)[0][0]
    return dict(common) | per


def plan_shards(units: list[Unit], max_bytes: int) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    """Greedy packing of output tensors into shards of at most max_bytes, a unit's tensors kept
    together; a unit larger than max_bytes gets a shard of its own (it cannot be split)."""
    shards, cur, size = [], [], 0
    for u in units:
        specs = list(u.outputs.values())
        n = sum(nbytes(dt, shape) for _, dt, shape in specs)
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.extend(specs)
        size += n
    if cur:
        shards.append(cur)
    return shards
