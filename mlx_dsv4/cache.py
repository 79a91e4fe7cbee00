"""Per-layer decode state: the whole memory of one attention layer lives here, never on modules.

One `LayerCache` per backbone layer holds
- the sliding window: the last `window_size` K=V rows, in position order;
- the compressed entries (ratio 4 or 128) and, for ratio 4, the indexer keys, in growable buffers;
- the compressor states: leftover rows of the current unfinished window (a, g + ape) and, for the
  ratio-4 overlap, the first-half features of the previous complete window.
Prefill may start at any offset and come in chunks of any size; batch rows share one offset.
`state` / `from_state` make it round-trip through mlx-lm's prompt-cache files.
"""

from __future__ import annotations

import mlx.core as mx
import mlx_lm.models.cache as _mlx_lm_cache
from mlx_lm.models.cache import _BaseCache

_STEP = 256  # growth granularity of the compressed buffers (amortises copies at decode)


class CompressorState:
    """Rolling state of one Compressor: leftover rows and (overlap only) the previous window."""

    __slots__ = ("rows_kv", "rows_gate", "prev_kv", "prev_gate")

    def __init__(self):
        self.rows_kv = self.rows_gate = self.prev_kv = self.prev_gate = None

    def arrays(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_arrays(cls, d: dict) -> "CompressorState":
        s = cls()
        for k in cls.__slots__:
            v = d.get(k)
            setattr(s, k, v if v is None or v.size else None)
        return s


class _Buffer:
    """Append-only [B, n, D] rows with amortised growth."""

    __slots__ = ("data", "n")

    def __init__(self, data: mx.array | None = None, n: int = 0):
        self.data, self.n = data, n

    def append(self, rows: mx.array) -> None:
        k = rows.shape[1]
        if k == 0:
            return
        if self.data is None or self.n + k > self.data.shape[1]:
            B, _, D = rows.shape
            cap = ((self.n + k + _STEP - 1) // _STEP) * _STEP
            new = mx.zeros((B, cap, D), dtype=rows.dtype)
            if self.n:
                new[:, : self.n] = self.data[:, : self.n]
            self.data = new
        self.data[:, self.n : self.n + k] = rows
        self.n += k

    def view(self) -> mx.array | None:
        return None if self.data is None else self.data[:, : self.n]


class LayerCache(_BaseCache):
    def __init__(self, ratio: int, window_size: int):
        self.ratio = ratio
        self.window_size = window_size
        self.offset = 0
        self.window: mx.array | None = None
        self._comp = _Buffer()
        self._index = _Buffer()
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
    def compressed(self) -> mx.array | None:
        return self._comp.view()

    @property
    def index_keys(self) -> mx.array | None:
        return self._index.view()

    @property
    def n_compressed(self) -> int:
        return self._comp.n

    # -- mlx-lm cache protocol -----------------------------------------------------------------
    def empty(self) -> bool:
        return self.offset == 0

    def size(self) -> int:
        return self.offset

    def is_trimmable(self) -> bool:
        return False  # compressed entries cannot be un-pooled; prefix reuse snapshots instead

    @property
    def nbytes(self) -> int:
        arrays = [self.window, self.compressed, self.index_keys]
        for s in (self.comp_state, self.index_state):
            arrays += list(s.arrays().values())
        return sum(a.nbytes for a in arrays if a is not None)

    @property
    def state(self) -> dict:
        return {
            "meta": {"ratio": self.ratio, "window_size": self.window_size, "offset": self.offset},
            "window": self.window,
            "compressed": self.compressed,
            "index_keys": self.index_keys,
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
        comp, idx = arr(v.get("compressed")), arr(v.get("index_keys"))
        self._comp = _Buffer(comp, 0 if comp is None else comp.shape[1])
        self._index = _Buffer(idx, 0 if idx is None else idx.shape[1])
        self.comp_state = CompressorState.from_arrays(v.get("comp_state", {}))
        self.index_state = CompressorState.from_arrays(v.get("index_state", {}))

    @property
    def meta_state(self):
        return ""

    def copy(self) -> "LayerCache":
        return LayerCache.from_state(self.state)


# mlx-lm's load_prompt_cache resolves cache classes by name in its own module namespace.
_mlx_lm_cache.LayerCache = LayerCache
