"""The trained activation formats, applied where the reference applies them (`simulate_qat`).

The model was trained (and the reference runs) with the window KV and compressed entries rounded
through FP8 e4m3 in 1x64 blocks on their non-RoPE channels, and the indexer's q and keys passed
through a Hadamard transform and FP4 e2m1 in 1x32 blocks. With simulation off both are identity
(the Hadamard is orthogonal, so dropping it together on q and k leaves q . k unchanged).
"""

from __future__ import annotations

import mlx.core as mx


class TrainedFormats:
    def __init__(self, simulate: bool):
        self.simulate = simulate

    def kv(self, x: mx.array, nope_dims: int) -> mx.array:
        if not self.simulate:
            return x
        from .formats import fp8_block_roundtrip

        return fp8_block_roundtrip(x, block=64, dims=nope_dims)

    def index(self, x: mx.array) -> mx.array:
        if not self.simulate:
            return x
        from .formats import indexer_roundtrip

        return indexer_roundtrip(x).astype(x.dtype)
