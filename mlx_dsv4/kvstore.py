"""Append-only row stores for compressed KV entries and indexer keys, dense or in the trained formats.

With the trained-format simulation on, every stored value is already an FP8 (main entries,
non-RoPE channels) or FP4 (indexer keys) number times a power-of-two block scale, so keeping the
codes and exponent bytes is lossless: reads give back bit-identical values at about half
(entries: 448 + 7 + 2*64 = 583 B instead of 1,024) or a quarter (keys: 64 + 4 = 68 B instead of
256) of the bf16 size. RoPE channels stay in the model dtype.
"""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np

from .formats import fp4_block_dequantize, fp8_block_dequantize, unpack_fp4
from .kernels.store_encode import fp4_encode, fp8_encode

_STEP = 256  # growth granularity (amortises reallocation at decode)


class Rows:
    """[B, n, D] rows in named component arrays that grow together along axis 1."""

    kind = "dense"

    def __init__(self):
        self.parts: dict[str, mx.array] = {}
        self.n = 0

    # subclasses: encode rows -> parts, decode parts -> rows
    def encode(self, rows: mx.array) -> dict[str, mx.array]:
        return {"rows": rows}

    def decode(self, parts: dict[str, mx.array], dtype) -> mx.array:
        return parts["rows"].astype(dtype) if dtype is not None else parts["rows"]

    def append(self, rows: mx.array) -> None:
        k = rows.shape[1]
        if k == 0:
            return
        enc = self.encode(rows)
        for name, v in enc.items():
            buf = self.parts.get(name)
            if buf is None or self.n + k > buf.shape[1]:
                cap = ((self.n + k + _STEP - 1) // _STEP) * _STEP
                new = mx.zeros((v.shape[0], cap, *v.shape[2:]), dtype=v.dtype)
                if self.n:
                    new[:, : self.n] = buf[:, : self.n]
                buf = new
            buf[:, self.n : self.n + k] = v
            self.parts[name] = buf
        self.n += k

    def view(self, dtype=None) -> mx.array | None:
        if not self.n:
            return None
        return self.decode({k: v[:, : self.n] for k, v in self.parts.items()}, dtype)

    def take(self, ids: mx.array, dtype=None) -> mx.array:
        """Rows ids [B, L, k] (>= 0) -> [B, L, k, D]; only the selected rows are decoded."""
        B = ids.shape[0]
        sel = {}
        for name, v in self.parts.items():
            cap = v.shape[1]
            first = mx.array(np.arange(B, dtype=np.int32) * cap)  # a constant: no arange in a compiled step
            flat_ids = (ids + first.reshape(B, *([1] * (ids.ndim - 1)))).reshape(-1)
            rows = mx.take(v.reshape(B * cap, *v.shape[2:]), flat_ids, axis=0)  # whole-row copies
            sel[name] = rows.reshape(*ids.shape, *v.shape[2:])
        return self.decode(sel, dtype)

    @property
    def nbytes(self) -> int:
        return sum(v[:, : self.n].nbytes for v in self.parts.values()) if self.n else 0

    def arrays(self) -> dict:
        return {"kind": self.kind, "n": self.n, **{k: v[:, : self.n] for k, v in self.parts.items()}} if self.n \
            else {"kind": self.kind, "n": 0}

    def holding(self, parts: dict[str, mx.array], n: int) -> "Rows":
        """A store of this one's kind and settings (its FP8 split, FP4 decoded dtype) over `parts`, n rows valid."""
        r = copy.copy(self)
        r.parts, r.n = dict(parts), n
        return r

    @staticmethod
    def from_arrays(d: dict, **kw) -> "Rows":
        r = make_rows(d.get("kind", "dense"), **kw)
        r.n = int(d.get("n", 0))
        r.parts = {k: v for k, v in d.items() if k not in ("kind", "n")} if r.n else {}
        return r


class FP8Rows(Rows):
    """Main compressed entries: e4m3 codes + E8M0 exponents on the first `nope` channels."""

    kind = "fp8"

    def __init__(self, nope: int, block: int = 64):
        super().__init__()
        self.nope, self.block = nope, block

    def encode(self, rows):
        codes, exps, rope = fp8_encode(rows, self.nope, self.block, rest=True)
        return {"codes": codes, "exps": exps, "rope": rope}

    def decode(self, p, dtype):
        dtype = dtype or p["rope"].dtype
        nope = fp8_block_dequantize(p["codes"], p["exps"], block=self.block, out_dtype=dtype)
        return mx.concatenate([nope, p["rope"].astype(dtype)], axis=-1)


class FP4Rows(Rows):
    """Indexer keys: e2m1 codes packed two per byte + E8M0 exponents per 32 channels."""

    kind = "fp4"

    def __init__(self, block: int = 32):
        super().__init__()
        self.block = block
        self.dtype = None

    def encode(self, rows):
        self.dtype = self.dtype or rows.dtype
        packed, exps = fp4_encode(rows, self.block)
        return {"packed": packed, "exps": exps}

    def decode(self, p, dtype):
        return fp4_block_dequantize(unpack_fp4(p["packed"]), p["exps"], block=self.block,
                                    out_dtype=dtype or self.dtype or mx.float32)


def make_rows(kind: str, nope: int | None = None) -> Rows:
    if kind == "dense":
        return Rows()
    if kind == "fp8":
        return FP8Rows(nope)
    if kind == "fp4":
        return FP4Rows()
    raise ValueError(f"unknown row storage {kind!r}")
