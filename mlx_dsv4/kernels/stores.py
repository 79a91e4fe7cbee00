"""The row stores that the attention and indexer kernels read in place, as this layer sees them.

A store is what the cache keeps compressed entries and indexer keys in (kvstore.Rows and its kinds
conform); kernels take one or a plain [B, N, D] array, and know a store by its attributes, not its class,
so that nothing here imports the cache's modules:
- kind: "dense" (parts["rows"] [B, cap, D]), "fp8" (parts "codes", "exps", "rope"; attributes nope and
  block) or "fp4" (parts "packed", "exps"; attributes block and dtype, the decoded dtype or None);
- n: the rows in use along axis 1 of every part (the rest is spare capacity);
- view(): the n rows decoded to [B, n, D] (None when n = 0), and take(ids): rows ids [B, L, k] decoded to
  [B, L, k, D]; what the references read.
"""

from __future__ import annotations

import mlx.core as mx


def is_store(x) -> bool:
    """A row store rather than an array (or None)."""
    return x is not None and not isinstance(x, mx.array)
