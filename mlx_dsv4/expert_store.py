"""Routed experts streamed from the checkpoint files: an LRU of experts in memory, bounded in bytes.

Routed experts are 94% of V4-Flash's bytes, and a token uses 6 of 256 per layer. A streamed model
keeps everything else resident and holds at most a budget's worth of experts: one preallocated
slab per expert tensor (w1.weight [C, inter, d/8], w1.scales, ...) with C = budget // bytes per
expert. A layer's routed ids are mapped to slots; the experts missing from the slab are read in
one batch (parallel positioned reads of just their bytes) into the least recently used slots that
this call does not need. The expert matmuls then gather straight from the slabs: the same ops as
the resident model on the same bytes, hence the same logits, and no per-call copy of weights.

The store is runtime state (like a cache), referenced by the model, never one of its parameters.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from .moe import ExpertWeights

log = logging.getLogger("mlx_dsv4")

_MX_DTYPES = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32, "U32": mx.uint32, "U8": mx.uint8}
LOAD_BATCH = 8  # experts decoded per write into the slabs: bounds the transient copies (2 x 8 experts)


def check_budget(expert_memory_gb) -> float:
    """The budget in GB as a positive finite number, else a one-line ValueError."""
    if isinstance(expert_memory_gb, bool) or not isinstance(expert_memory_gb, numbers.Real):
        raise ValueError(f"expert_memory_gb must be a number of GB, got {expert_memory_gb!r}")
    if not (math.isfinite(expert_memory_gb) and expert_memory_gb > 0):
        raise ValueError(f"expert_memory_gb must be a positive number of GB, got {expert_memory_gb}")
    return float(expert_memory_gb)


def slab_spec(files: dict, dtype: mx.Dtype) -> dict[str, tuple[tuple[int, ...], mx.Dtype]]:
    """key -> (per-expert shape, dtype as the model holds it): floats in the model dtype, packed
    weights and E8M0 scales as stored (what build_model does to resident experts)."""
    sigs = {lf.signature() for lf in files.values()}
    if len(sigs) != 1:
        raise ValueError("expert streaming needs every layer's routed experts in one format and shape; "
                         f"this checkpoint has {len(sigs)} different ones")
    parts, _ = sigs.pop()
    out = {}
    for key, dt, shape in parts:
        if dt not in _MX_DTYPES:
            raise ValueError(f"expert streaming: unsupported expert tensor dtype {dt} ({key})")
        t = _MX_DTYPES[dt]
        out[key] = (tuple(shape), dtype if mx.issubdtype(t, mx.floating) else t)
    return out


def expert_nbytes(spec: dict) -> int:
    return sum(math.prod(shape) * dt.size for shape, dt in spec.values())


class ExpertStore:
    """files: prefix -> checkpoint.experts.LayerExpertFiles; budget_bytes: the most expert bytes held."""

    def __init__(self, files: dict, budget_bytes: int, dtype: mx.Dtype, top_k: int, threads: int = 8):
        self.files = files
        self.spec = slab_spec(files, dtype)
        self.expert_bytes = expert_nbytes(self.spec)
        self.total_bytes = self.expert_bytes * sum(lf.n_experts for lf in files.values())
        self.budget_bytes = budget_bytes
        self.capacity = budget_bytes // self.expert_bytes
        if self.capacity < top_k:
            raise ValueError(
                f"an expert budget of {budget_bytes / 1e9:.3g} GB holds {self.capacity} experts of "
                f"{self.expert_bytes / 1e6:.3g} MB, fewer than the {top_k} one token needs in one layer: "
                f"give at least {top_k * self.expert_bytes / 1e9:.3g} GB")
        n_layers = sum(p.startswith("layers.") for p in files)
        if self.capacity < top_k * n_layers:
            log.warning("note: an expert budget of %.3g GB holds %d experts, fewer than the %d one token uses "
                        "across %d layers: every token reads most of its experts from disk",
                        budget_bytes / 1e9, self.capacity, top_k * n_layers, n_layers)
        self.quant = {w: p for w, p in next(iter(files.values())).quantization.items()}
        # lazily allocated by the first write; never more than capacity * expert_bytes
        self.slabs = {k: mx.zeros((self.capacity, *shape), dtype=dt) for k, (shape, dt) in self.spec.items()}
        self._slot: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._free = list(range(self.capacity))[::-1]
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="expert-read")
        self._first = "layers.0.ffn.experts" if "layers.0.ffn.experts" in files else min(files)
        self._layers: dict[str, LayerExperts] = {}
        self.reset_stats()

    # -- statistics ------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.tokens = self.hits = self.misses = self.bytes_read = 0
        self.read_seconds = 0.0

    def stats(self) -> dict:
        looked = self.hits + self.misses
        return {"budget_gb": self.budget_bytes / 1e9, "experts_total_gb": self.total_bytes / 1e9,
                "expert_mb": self.expert_bytes / 1e6, "capacity_experts": self.capacity,
                "resident_experts": len(self._slot), "tokens": self.tokens, "hits": self.hits,
                "misses": self.misses, "hit_rate": self.hits / looked if looked else None,
                "bytes_read": self.bytes_read, "read_seconds": self.read_seconds,
                "bytes_per_token": self.bytes_read / self.tokens if self.tokens else None}

    # -- the model's side ------------------------------------------------------------------------
    def layer(self, prefix: str) -> LayerExperts:
        if prefix not in self._layers:
            if prefix not in self.files:
                raise ValueError(f"expert store: the checkpoint has no routed experts for {prefix}")
            self._layers[prefix] = LayerExperts(self, prefix)
        return self._layers[prefix]

    def stacks(self) -> tuple[ExpertWeights, ExpertWeights, ExpertWeights]:
        def proj(w: str) -> ExpertWeights:
            q = self.quant.get(w) or {}
            return ExpertWeights(self.slabs[f"{w}.weight"], self.slabs.get(f"{w}.scales"),
                                 self.slabs.get(f"{w}.biases"), q.get("mode"), q.get("bits"), q.get("group_size"))

        return proj("w1"), proj("w3"), proj("w2")

    def select(self, prefix: str, ids: mx.array):
        """Yield ((r0, r1), ids of rows r0:r1 renumbered to slots, stacks) with the rows' experts
        loaded; the rows are split only when their experts exceed the capacity (long prefills on
        small budgets). The caller evaluates each part before asking for the next."""
        a = np.array(ids)  # the layer's choices are needed on the host: this waits for the router
        if prefix == self._first:
            self.tokens += a.shape[0]
        r0 = 0
        while r0 < a.shape[0]:
            r1, need = self._fit(a, r0)
            lut = self._load(prefix, need)
            yield (r0, r1), mx.array(lut[a[r0:r1]].astype(a.dtype)), self.stacks()
            r0 = r1

    def _fit(self, a: np.ndarray, r0: int) -> tuple[int, np.ndarray]:
        need = np.unique(a[r0:])
        if len(need) <= self.capacity:
            return a.shape[0], need
        seen, r1 = set(), r0
        while r1 < a.shape[0] and len(seen | set(a[r1].tolist())) <= self.capacity:
            seen |= set(a[r1].tolist())
            r1 += 1
        return r1, np.array(sorted(seen))

    def _load(self, prefix: str, need: np.ndarray) -> np.ndarray:
        """Slots of `need` (an expert -> slot table), reading the missing experts in batches."""
        lf = self.files[prefix]
        lut = np.zeros(lf.n_experts, np.int64)
        missing = []
        for e in need.tolist():
            slot = self._slot.get((prefix, e))
            if slot is None:
                missing.append(e)
            else:
                self._slot.move_to_end((prefix, e))  # needed now: the evictions below never take it
                lut[e] = slot
        self.hits += len(need) - len(missing)
        self.misses += len(missing)
        for b in range(0, len(missing), LOAD_BATCH):
            batch = missing[b : b + LOAD_BATCH]
            slots = [self._take_slot() for _ in batch]
            t = time.perf_counter()
            raws = list(self._pool.map(lf.read_raw, batch))
            self.read_seconds += time.perf_counter() - t
            self.bytes_read += sum(x.nbytes for r in raws for x in r.values())
            experts = [lf.decode(r) for r in raws]
            del raws
            idx = mx.array(slots)
            for key, (_, dt) in self.spec.items():
                self.slabs[key][idx] = mx.stack([e[key].astype(dt) for e in experts])
            mx.eval(list(self.slabs.values()))
            for e, s in zip(batch, slots):
                self._slot[(prefix, e)] = s
                lut[e] = s
        return lut

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        _, slot = self._slot.popitem(last=False)  # least recently used; this call's experts are at the end
        return slot


class LayerExperts:
    """One block's view of the store, handed to its MoE."""

    def __init__(self, store: ExpertStore, prefix: str):
        self.store, self.prefix = store, prefix

    def select(self, ids: mx.array):
        return self.store.select(self.prefix, ids)


def open_expert_store(root, cfg: dict, expert_memory_gb: float, dtype: mx.Dtype, top_k: int) -> ExpertStore | None:
    """The store for a checkpoint, or None (with a note) when the budget holds every expert anyway."""
    from .checkpoint.experts import expert_files

    budget = int(check_budget(expert_memory_gb) * 1e9)
    files = expert_files(root, cfg)
    total = expert_nbytes(slab_spec(files, dtype)) * sum(lf.n_experts for lf in files.values())
    if budget >= total:
        log.warning("note: --expert-memory-gb %.3g holds all routed experts (%.3g GB): loading them resident",
                    budget / 1e9, total / 1e9)
        return None
    return ExpertStore(files, budget, dtype, top_k)
