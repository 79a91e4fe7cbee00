"""One rank of the distributed tests, started by mlx.launch (see test_distributed.py).

argv: checkpoint dir, work dir (holding tokens.npy), sharding[, "break"]. Writes rank{r}.npz: the logits of a
full prefill, a chunked prefill and a token-by-token decode, and the number of parameters held.
"""

import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_dsv4.distributed import world_group
from mlx_dsv4.load import load

ckpt, work, sharding = sys.argv[1:4]
if sys.argv[4:] == ["break"]:  # negative control: the streams arrive halved at every stage but the first
    from mlx_dsv4.distributed import Stage

    _receive = Stage.receive
    Stage.receive = lambda self, shape: _receive(self, shape) * 0.5
CHUNK, PREFILL = 50, 120  # chunked prefill in 3 pieces; decode the rest one token at a time

group = world_group()
model, _ = load(ckpt, dtype=mx.float32, simulate_qat=False, group=group, sharding=sharding)
toks = mx.array(np.load(f"{work}/tokens.npy"))
full = model(toks)
cache = model.make_cache()
chunked = mx.concatenate([model(toks[:, s : s + CHUNK], cache) for s in range(0, toks.shape[1], CHUNK)], axis=1)
cache = model.make_cache()
steps = [model(toks[:, :PREFILL], cache, last_only=True)]
steps += [model(toks[:, i : i + 1], cache) for i in range(PREFILL, toks.shape[1])]
decode = mx.concatenate(steps, axis=1)  # logits at positions PREFILL-1 .. end
held = sum(p.size for _, p in tree_flatten(model.parameters()))  # parameters (elements)
np.savez(f"{work}/rank{group.rank()}.npz", full=np.array(full), chunked=np.array(chunked), decode=np.array(decode),
         held=held, layers=np.array(list(model.owned)), cache_layers=len(cache))
