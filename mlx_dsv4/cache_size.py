"""Analytic KV-cache size of a DeepSeek-V4 config at N tokens, per layer type and storage format.

"bf16": what the reference stores (every compressed entry and indexer key in bf16).
"compact": the trained formats this runtime stores with simulate_qat on: FP8 e4m3 + one E8M0
byte per 64 channels for the non-RoPE part of each entry, the RoPE part in bf16, and indexer
keys as packed FP4 + one E8M0 byte per 32 channels. Both are exact for a simulated model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ModelArgs

FORMATS = ("bf16", "compact")


@dataclass(frozen=True)
class LayerBytes:
    entry: int  # bytes of one compressed entry (0 for sliding layers)
    key: int  # bytes of one indexer key (CSA only)
    per_token: float  # (entry + key) / ratio
    window: int  # the fixed sliding-window ring
    state_max: int  # largest compressor state (leftover rows + previous window), fp32


def layer_bytes(args: ModelArgs, ratio: int, fmt: str = "compact", dtype_bytes: int = 2) -> LayerBytes:
    if fmt not in FORMATS:
        raise ValueError(f"unknown cache format {fmt!r}; choose from {FORMATS}")
    D, r, Di = args.head_dim, args.rope_head_dim, args.index_head_dim
    window = args.window_size * D * dtype_bytes
    if ratio == 0:
        return LayerBytes(0, 0, 0.0, window, 0)
    nope = D - r
    entry = D * dtype_bytes if fmt == "bf16" else nope + math.ceil(nope / 64) + r * dtype_bytes
    key = 0
    if ratio == 4:
        key = Di * dtype_bytes if fmt == "bf16" else Di // 2 + math.ceil(Di / 32)
    coff = 2 if ratio == 4 else 1
    state = 2 * (ratio - 1) * coff * D * 4 + (2 * ratio * D * 4 if coff == 2 else 0)
    if ratio == 4:
        state += 2 * (ratio - 1) * 2 * Di * 4 + 2 * ratio * Di * 4
    return LayerBytes(entry, key, (entry + key) / ratio, window, state)


def cache_bytes(args: ModelArgs, n_tokens: int, fmt: str = "compact", dtype_bytes: int = 2) -> dict:
    """Bytes of one sequence's cache at n_tokens: per-token part, fixed rings, states, total."""
    growing = rings = states = 0
    by_type: dict[int, float] = {}
    for i in range(args.n_layers):
        m = args.ratio(i)
        lb = layer_bytes(args, m, fmt, dtype_bytes)
        g = (n_tokens // m) * (lb.entry + lb.key) if m else 0
        growing += g
        by_type[m] = by_type.get(m, 0) + lb.per_token
        rings += min(n_tokens, args.window_size) * args.head_dim * dtype_bytes
        states += lb.state_max
    return {"tokens": n_tokens, "format": fmt, "compressed": growing, "rings": rings, "states_max": states,
            "total": growing + rings + states, "per_token": sum(by_type.values()),
            "per_token_by_ratio": by_type}


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def table(args: ModelArgs, tokens=(1024, 4096, 16384, 65536, 262144, 1048576)) -> str:
    rows = ["| tokens | bf16 (reference) | compact (trained formats) |", "|---:|---:|---:|"]
    for t in tokens:
        rows.append(f"| {t:,} | {_gib(cache_bytes(args, t, 'bf16')['total'])} | "
                    f"{_gib(cache_bytes(args, t, 'compact')['total'])} |")
    return "\n".join(rows)
