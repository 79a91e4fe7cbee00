"""Per-layer decode state: the whole memory of one attention layer lives here, never on modules.

One `LayerCache` per backbone layer holds
- the sliding window: the last `window_size` K=V rows, in position order;
- the compressed entries (ratio 4 or 128) and, for ratio 4, the indexer keys, in growable buffers;
- the compressor states: leftover rows of the current unfinished window (a, g before ape) and, for the
  ratio-4 overlap, the first-half features of the previous complete window.
Prefill may start at any offset and come in chunks of any size; batch rows share one offset.
`state` / `from_state` make it round-trip through mlx-lm's prompt-cache files.
"""

from __future__ import annotations

import mlx.core as mx
import mlx_lm.models.cache as _mlx_lm_cache

from .kvstore import Rows, make_rows


class CompressorState:
    """Rolling state of one Compressor: leftover rows and (overlap only) the previous window.

    Leftover rows (a and g, float32, g before ape) are kept as a list of per-call pieces and joined only when
    a window completes, so a decode step that completes none copies nothing (on Metal: no launch)."""

    FIELDS = ("rows_kv", "rows_gate", "prev_kv", "prev_gate")
    __slots__ = ("_kv", "_gate", "prev_kv", "prev_gate", "recent")

    def __init__(self):
        self._kv, self._gate = [], []
        self.prev_kv = self.prev_gate = None
        self.recent = None  # (a, g) rows of the last call: what a rollback rebuilds the state from

    def checkpoint(self) -> tuple:
        return list(self._kv), list(self._gate), self.prev_kv, self.prev_gate

    def rollback(self, ck: tuple, start: int, keep: int, ratio: int) -> None:
        """Undo the last call (which fed rows from absolute position `start`) but its first `keep`
        rows. Entries of windows completed by kept rows stay valid (a window pools only its own
        rows and, with the overlap, the previous window's), so only the leftovers and the overlap
        half are rebuilt, from the checkpointed rows plus the kept ones."""
        kv, gate, prev_kv, prev_gate = ck
        a, g = self.recent
        rows_kv, rows_gate = kv + [a[:, :keep]], gate + [g[:, :keep]]
        all_kv, all_gate = mx.concatenate(rows_kv, axis=1), mx.concatenate(rows_gate, axis=1)
        base, end = start - start % ratio, start + keep  # all_* hold positions [base, end)
        cut = end - end % ratio - base
        self._kv = [all_kv[:, cut:]] if end % ratio else []
        self._gate = [all_gate[:, cut:]] if end % ratio else []
        self.prev_kv, self.prev_gate = prev_kv, prev_gate
        if ratio == 4 and end // ratio > start // ratio:  # the last kept complete window is the overlap half
            D = all_kv.shape[-1] // 2
            self.prev_kv, self.prev_gate = all_kv[:, cut - ratio : cut, :D], all_gate[:, cut - ratio : cut, :D]
        self.recent = None

    @property
    def pending(self) -> int:
        return sum(r.shape[1] for r in self._kv)

    def add(self, a: mx.array, g: mx.array) -> None:
        self._kv.append(a)
        self._gate.append(g)

    def joined(self, a: mx.array, g: mx.array) -> tuple[mx.array, mx.array]:
        """The pending rows followed by a / g, in one copy each; the pending list empties."""
        ka, kg = self._kv + [a], self._gate + [g]
        self._kv, self._gate = [], []
        return (ka[0], kg[0]) if len(ka) == 1 else (mx.concatenate(ka, axis=1), mx.concatenate(kg, axis=1))

    def _get(self, parts: list) -> mx.array | None:
        if len(parts) > 1:
            parts[:] = [mx.concatenate(parts, axis=1)]
        return parts[0] if parts else None

    rows_kv = property(lambda self: self._get(self._kv), lambda self, v: setattr(self, "_kv", [] if v is None else [v]))
    rows_gate = property(lambda self: self._get(self._gate),
                         lambda self, v: setattr(self, "_gate", [] if v is None else [v]))

    def arrays(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS}

    @classmethod
    def from_arrays(cls, d: dict) -> "CompressorState":
        s = cls()
        for k in cls.FIELDS:
            v = d.get(k)
            setattr(s, k, v if v is None or v.size else None)
        return s


class LayerCache:
    def __init__(self, ratio: int, window_size: int, compact: bool = False, nope: int | None = None):
        """compact: store compressed entries / indexer keys in the trained FP8 / FP4 formats
        (lossless only when the values were rounded to them, i.e. with simulate_qat on)."""
        self.ratio = ratio
        self.window_size = window_size
        self.offset = 0
        self.window: mx.array | None = None
        self._comp: Rows = make_rows("fp8" if compact else "dense", nope)
        self._index: Rows = make_rows("fp4" if compact else "dense")
        self.comp_state = CompressorState()
        self.index_state = CompressorState()

    # -- sliding window -------------------------------------------------------------------
    def push_window(self, kv: mx.array) -> None:
        full = kv if self.window is None else mx.concatenate([self.window, kv], axis=1)
        self.window = full[:, -self.window_size :]

    # -- compressed entries -----------------------------------------------------------------
    def push_compressed(self, c: mx.array) -> None:
        self._comp.append(c)

    def push_index_keys(self, k: mx.array) -> None:
        self._index.append(k)

    @property
    def compressed_store(self) -> Rows:
        return self._comp

    @property
    def compressed(self) -> mx.array | None:
        return self._comp.view()

    @property
    def index_store(self) -> Rows:
        return self._index

    @property
    def index_keys(self) -> mx.array | None:
        return self._index.view()

    @property
    def n_compressed(self) -> int:
        return self._comp.n

    # -- mlx-lm cache protocol -----------------------------------------------------------------
    # -- speculative decoding: undo the tail of a multi-token call ------------------------------
    def checkpoint(self) -> tuple:
        """What `rollback` needs to undo the next call: references only (arrays are immutable)."""
        return (self.offset, self.window, self._comp.n, self._index.n, self.comp_state.checkpoint(),
                self.index_state.checkpoint())

    def rollback(self, ck: tuple, keep: int) -> None:
        """Make this cache what it would be had the one call since `ck` fed only its first `keep`
        tokens: window rows, compressed entries, indexer keys and compressor states of the later
        tokens are dropped, at the cost of a few slices (no forward pass)."""
        offset, window, n_comp, n_index, comp_ck, index_ck = ck
        fed = self.offset - offset
        if not 0 <= keep <= fed:
            raise ValueError(f"rollback keeps {keep} of {fed} fed tokens")
        if fed > self.window_size:
            raise ValueError(f"rollback of a {fed}-token call exceeds the {self.window_size}-row window")
        if keep == fed:
            return
        W = self.window.shape[1]
        kept = self.window[:, W - fed : W - fed + keep]
        self.window = kept if window is None else mx.concatenate([window, kept], axis=1)[:, -self.window_size :]
        if self.window.shape[1] == 0:
            self.window = None
        end = offset + keep
        if self.ratio:
            self._comp.n = n_comp + end // self.ratio - offset // self.ratio
            self.comp_state.rollback(comp_ck, offset, keep, self.ratio)
        if self.ratio == 4:
            self._index.n = n_index + end // 4 - offset // 4
            self.index_state.rollback(index_ck, offset, keep, 4)
        self.offset = end

    def empty(self) -> bool:
        return self.offset == 0

    def size(self) -> int:
        return self.offset

    def is_trimmable(self) -> bool:
        return False  # compressed entries cannot be un-pooled; prefix reuse snapshots instead

    @property
    def live(self) -> list[mx.array]:
        """The arrays holding this cache's state, as they are: what to materialise after a step (`state`
        would first make views of them, a few more ops per layer to evaluate)."""
        out = [self.window, *self._comp.parts.values(), *self._index.parts.values()]
        for s in (self.comp_state, self.index_state):
            out += [*s._kv, *s._gate, s.prev_kv, s.prev_gate]
        return [a for a in out if a is not None]

    @property
    def nbytes(self) -> int:
        arrays = [self.window]
        for s in (self.comp_state, self.index_state):
            arrays += list(s.arrays().values())
        return self._comp.nbytes + self._index.nbytes + sum(a.nbytes for a in arrays if a is not None)

    @property
    def state(self) -> dict:
        return {
            "meta": {"ratio": self.ratio, "window_size": self.window_size, "offset": self.offset,
                     "nope": getattr(self._comp, "nope", None)},
            "window": self.window,
            "compressed": self._comp.arrays(),
            "index_keys": self._index.arrays(),
            "comp_state": self.comp_state.arrays(),
            "index_state": self.index_state.arrays(),
        }

    @state.setter
    def state(self, v: dict) -> None:
        meta = v["meta"]
        self.ratio, self.window_size, self.offset = (int(meta[k]) for k in ("ratio", "window_size", "offset"))

        def arr(a):
            return a if a is not None and a.size else None

        self.window = arr(v.get("window"))
        meta_nope = meta.get("nope")
        self._comp = Rows.from_arrays(v.get("compressed", {}), nope=None if meta_nope is None else int(meta_nope))
        self._index = Rows.from_arrays(v.get("index_keys", {}))
        self.comp_state = CompressorState.from_arrays(v.get("comp_state", {}))
        self.index_state = CompressorState.from_arrays(v.get("index_state", {}))

    @property
    def meta_state(self):
        return ""

    @classmethod
    def from_state(cls, state: dict) -> "LayerCache":
        """What mlx-lm's load_prompt_cache calls to rebuild a cache from its saved `state`."""
        c = cls.__new__(cls)
        c.state = state
        return c

    def copy(self) -> "LayerCache":
        return LayerCache.from_state(self.state)


# mlx-lm's load_prompt_cache resolves cache classes by name in its own module namespace.
_mlx_lm_cache.LayerCache = LayerCache
