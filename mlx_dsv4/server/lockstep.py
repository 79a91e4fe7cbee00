"""`serve` under mlx.launch: rank 0 answers HTTP, every rank runs the same engine steps.

Each model call of a split model is collective (pipeline: the streams go stage to stage, then an
all_sum hands every rank the logits), so all ranks must make the same calls with the same inputs
in the same order. The engine loop is deterministic given what enters it, so only that is shared:
at the top of each iteration rank 0 sends what arrived since the last one (new requests with their
token ids and sampling parameters, cancellations by batch uid, shutdown) and every rank applies it
before the step. Nothing time-dependent is read mid-step: a client that leaves is a cancellation
in the next message, and sampled requests without a seed get one from rank 0, so every rank draws
the same tokens from the same logits.

Transport: MLX collectives on the group mlx.launch set up, not a separate RPC. An all_sum of the
message length (followers contribute 0), then, if non-zero, an all_sum of the JSON bytes (followers
contribute zeros: the sum is rank 0's bytes, exactly). A follower waiting for rank 0's next
message sits in that first all_sum; it is not guarded by the watchdog, so an idle server lives on.
A lost peer fails the collective: the rank then ends with one error line instead of spinning.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np

from ..watchdog import die


class Lockstep:
    def __init__(self, group):
        self.group = group
        self.rank = group.rank()

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, message: dict | None) -> dict | None:
        """Rank 0's `message` on every rank (None: nothing new this iteration; followers pass None)."""
        try:
            return self._share(message)
        except RuntimeError as e:  # a peer rank died: nothing can continue in lockstep
            die(f"rank {self.rank}: serving in lockstep failed, a peer rank died or cannot be reached ({e})")

    def _share(self, message: dict | None) -> dict | None:
        data = json.dumps(message, separators=(",", ":")).encode() if self.leader and message else b""
        n = mx.distributed.all_sum(mx.array([len(data)], dtype=mx.int32), group=self.group, stream=mx.cpu)
        mx.eval(n)  # not n.item(): eval lets go of the GIL while it waits, so the SIGTERM watcher can run
        n = int(n.item())
        if n == 0:
            return None
        mine = mx.array(np.frombuffer(data, dtype=np.uint8)) if self.leader else mx.zeros((n,), dtype=mx.uint8)
        out = mx.distributed.all_sum(mine, group=self.group, stream=mx.cpu)
        mx.eval(out)
        return json.loads(np.array(out).tobytes())
