"""Tiny random models shared by the tests (cached per process: building them costs seconds)."""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

from mlx_dsv4.config import from_hf_config
from mlx_dsv4.load import build_model, to_model_layout
from mlx_dsv4.tiny import random_weights, tiny_hf_config


@functools.lru_cache(maxsize=None)
def tiny(kind: str = "flash", seed: int = 0):
    cfg = tiny_hf_config(kind)
    args = from_hf_config(cfg)
    return cfg, args, random_weights(args, seed)


def mlx_model(kind: str = "flash", simulate_qat: bool = False, seed: int = 0, dtype=mx.float32):
    cfg, args, w = tiny(kind, seed)
    return build_model(args, to_model_layout({k: mx.array(v) for k, v in w.items()}, args), dtype, simulate_qat)


def tokens(n: int, batch: int = 1, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 129280, (batch, n)).astype(np.int32)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: logits near zero make elementwise relative errors meaningless."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def run_chunked(model, toks: np.ndarray, chunk: int) -> np.ndarray:
    cache = model.make_cache()
    outs = []
    for s in range(0, toks.shape[1], chunk):
        y = model(mx.array(toks[:, s : s + chunk]), cache)
        mx.eval(y)
        outs.append(np.array(y))
    return np.concatenate(outs, axis=1)


def flat_state(cache) -> dict:
    """{path: numpy array or value} of every layer's cache state and offset: caches compared entry by entry."""
    out = {}
    for i, c in enumerate(cache):
        out[f"{i}.offset"] = c.offset
        stack = [(f"{i}", c.state)]
        while stack:
            k, v = stack.pop()
            if isinstance(v, dict):
                stack += [(f"{k}.{kk}", vv) for kk, vv in v.items()]
            elif isinstance(v, mx.array):
                out[k] = np.array(v)
            else:
                out[k] = v
    return out
