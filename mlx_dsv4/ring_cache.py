"""Decode state of one layer in buffers of fixed size, so that a whole decode step is one compiled graph.

A LayerCache grows: its window is re-sliced, its stores append, its compressor keeps a list of pending
rows, and its counts are Python integers, so every step is a graph of its own. A RingCache holds the
same state in arrays whose shapes do not change from step to step, and the position of the token fed is
an array (`pos`), not a Python integer (compiled_step.py):
- window: the last window_size + SPARE positions' rows, position p in row p % (window_size + SPARE) (a step
  writes one row: no shift, no copy);
- compressed entries / indexer keys: the LayerCache's own store formats (kvstore), `capacity // ratio`
  rows; entry j is written at row j by the step that completes its window (`ends_window`: a compiled step
  is specialised on it, so the other steps neither pool nor write), and a query sees rows j < (pos + 1) // ratio;
- compressor rows: a ring of one window (two with the ratio-4 overlap: the previous window's rows are
  the pooling's other half; before the first window that half holds a = 0, g = -inf, as the pooling takes
  it), position p in slot p % size, each slot [a | g] as the compressor projects it (one write per step).
Nothing is overwritten that the state SPARE steps back needs, so a decoder can end on that state
(`to_layer(lc, P, fed)`): a pipelined decoder's last step fed one token too many.
`from_layer` / `to_layer` convert from and to a LayerCache exactly (the same arrays, bit for bit).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .cache import CompressorState, LayerCache
from .kvstore import Rows, make_rows

SPARE = 1  # steps that can be undone: a pipelined decoder feeds one token ahead


def _store(lc_store: Rows, entries: int, B: int, width: int, dtype) -> tuple[Rows, dict]:
    """(an empty store of lc_store's kind, its capacity-sized parts holding lc_store's rows)."""
    kind, nope = lc_store.kind, getattr(lc_store, "nope", None)
    like = make_rows(kind, nope)
    shapes = {k: (v.shape[2:], v.dtype) for k, v in like.encode(mx.zeros((B, 1, width), dtype)).items()}
    parts = {}
    for k, (shape, dt) in shapes.items():
        buf = mx.zeros((B, entries, *shape), dt)
        if lc_store.n:
            buf[:, : lc_store.n] = lc_store.parts[k][:, : lc_store.n]
        parts[k] = buf
    return like, parts


class RingCache:
    """One layer's decode state in fixed-size buffers (see the module docstring). `arrays` is everything
    a step reads and rewrites; the rest is fixed for the cache's life. `pos` is set by the step."""

    def __init__(self, ratio: int, window_size: int, stores: dict, arrays: dict):
        self.ratio, self.window_size = ratio, window_size
        self.stores = stores  # "comp" / "index": an empty Rows of the kind the parts are in
        self.arrays = arrays
        self.pos = None
        self.ends_window = False  # whether the step's position completes one of this layer's compressor windows

    @property
    def meta(self) -> tuple:
        """What a compiled step is specialised on, besides the arrays' shapes."""
        return (self.ratio, self.window_size, *((k, s.kind, getattr(s, "nope", None)) for k, s in self.stores.items()
                                                if k in self.arrays))

    def with_arrays(self, arrays: dict, pos: mx.array) -> RingCache:
        r = RingCache(self.ratio, self.window_size, self.stores, dict(arrays))
        r.pos, r.ends_window = pos, self.ends_window
        return r

    def store(self, name: str) -> Rows:
        """The store `name` over its whole capacity (rows past the visible ones are masked by the reader), with the
        settings of the LayerCache's (an FP4 store's decoded dtype: the kernels read it in place only in q's)."""
        parts = self.arrays[name]
        return self.stores[name].holding(parts, next(iter(parts.values())).shape[1])

    def push_window(self, kv: mx.array) -> tuple[mx.array, mx.array]:
        """Write kv [B, 1, D] (position pos) into the window; returns the window [B, R, D], positions pos - R + 1 ..
        pos in rows p % R, and the oldest one's position (an array; rows of positions before 0 are zeros)."""
        w = self.arrays["window"]
        R = w.shape[1]
        w = self.arrays["window"] = mx.slice_update(w, kv, (self.pos % R).reshape(1), axes=(1,))
        return w, self.pos - R + 1

    def write(self, name: str, rows: mx.array, j: mx.array) -> None:
        """Store entry j (an array) of `name` from rows [B, 1, width], in the store's format."""
        enc = self.stores[name].encode(rows)
        at = j.reshape(1)
        self.arrays[name] = {k: mx.slice_update(self.arrays[name][k], v, at, axes=(1,)) for k, v in enc.items()}

    @classmethod
    def from_layer(cls, lc: LayerCache, capacity: int, dtype, width: int, index_width: int | None) -> RingCache:
        """The ring form of `lc` with room for `capacity` tokens (a multiple of the ratio). dtype: the model's;
        width: head_dim; index_width: the indexer's head_dim (ratio 4)."""
        m, W, P = lc.ratio, lc.window_size, lc.offset
        B = 1 if lc.window is None else lc.window.shape[0]
        if m and capacity % m:
            raise ValueError(f"capacity {capacity} is not a multiple of the ratio {m}")
        if capacity < P:
            raise ValueError(f"capacity {capacity} is below the {P} tokens the cache holds")
        R = W + SPARE
        win = mx.zeros((B, R, width), dtype if lc.window is None else lc.window.dtype)
        if lc.window is not None:
            win[:, mx.array(np.arange(P - lc.window.shape[1], P) % R)] = lc.window
        arrays, stores = {"window": win}, {}
        for name, rows, state, D, on in (("comp", lc.compressed_store, lc.comp_state, width, m > 0),
                                         ("index", lc.index_store, lc.index_state, index_width, m == 4)):
            if not on:
                stores[name] = make_rows(rows.kind, getattr(rows, "nope", None))
                continue
            stores[name], arrays[name] = _store(rows, capacity // m, B, D, dtype)
            arrays[f"{name}_rows"] = _ring_rows(state, P, m, B, D)
        return cls(m, W, stores, arrays)

    def to_layer(self, lc: LayerCache, P: int, fed: int) -> None:
        """Make `lc` (of the same layer) what the plain path would have left after P tokens, from this cache
        after `fed` tokens (P <= fed <= P + SPARE)."""
        if not P <= fed <= P + SPARE:
            raise ValueError(f"a ring cache fed {fed} tokens cannot go back to {P}")
        m, W, a = self.ratio, self.window_size, self.arrays
        R = a["window"].shape[1]
        w = min(P, W)  # positions P - w .. P - 1, in rows p % R (fed - P <= SPARE later ones wrote none of them)
        comp = self.stores.get("comp")
        state = {"meta": {"ratio": m, "window_size": W, "offset": P, "nope": getattr(comp, "nope", None)},
                 "window": a["window"][:, mx.array(np.arange(P - w, P) % R)] if w else None}
        for name, key in (("comp", "compressed"), ("index", "index_keys")):
            n = P // m if name in a else 0
            state[key] = {"kind": self.stores[name].kind, "n": n}
            if name in a:
                state[key].update({k: v[:, :n] for k, v in a[name].items()} if n else {})
                state[f"{name}_state"] = _state(a[f"{name}_rows"], P, m)
        lc.state = state


def _ring_rows(state: CompressorState, P: int, m: int, B: int, D: int) -> mx.array:
    """The compressor's ring [B, size, 2 coff D] ([a | g] per slot) from its state at offset P: the pending rows
    of the current window and, with the overlap, the first halves of the previous window's rows."""
    size, coff = (2 * m, 2) if m == 4 else (m, 1)
    F = coff * D  # a's width, then g's
    ring = mx.zeros((B, size, 2 * F), mx.float32)
    pending, prev = _slots(P, m, size)
    if pending is not None:
        ring[:, pending] = mx.concatenate([state.rows_kv, state.rows_gate], axis=-1)
    if prev is not None and state.prev_kv is not None:
        ring[:, prev, :D], ring[:, prev, F : F + D] = state.prev_kv, state.prev_gate
    if m == 4 and P < m:  # before the first window the previous one is a = 0, g = -inf (weight 0 in the pooling)
        ring[:, m:, F : F + D] = -mx.inf
    return ring


def _slots(P: int, m: int, size: int) -> tuple[mx.array | None, mx.array | None]:
    """The ring slots, at offset P, of the current window's pending rows and (overlap) of the previous window's
    rows; None where there are none."""
    base = P - P % m
    pending = mx.array(np.arange(base, P) % size) if P % m else None
    prev = mx.array(np.arange(base - m, base) % size) if m == 4 and base else None
    return pending, prev


def _state(ring: mx.array, P: int, m: int) -> dict:
    """CompressorState.arrays() of the compressor whose ring is `ring` ([a | g] per slot), at offset P."""
    s = dict.fromkeys(CompressorState.FIELDS)
    pending, prev = _slots(P, m, ring.shape[1])
    F = ring.shape[-1] // 2
    if pending is not None:
        s["rows_kv"], s["rows_gate"] = ring[:, pending, :F], ring[:, pending, F:]
    if prev is not None:
        D = F // 2
        s["prev_kv"], s["prev_gate"] = ring[:, prev, :D], ring[:, prev, F : F + D]
    return s
