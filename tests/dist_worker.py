"""One rank of the distributed tests, started by mlx.launch (see test_distributed.py).

argv: checkpoint dir, work dir (holding tokens.npy), shardings (comma-separated: each is loaded and run in
turn in this one launch)[, "break"]. Writes rank{r}.{sharding}.npz: the logits of a full prefill, a chunked
prefill and a token-by-token decode, the number of parameters held, and (tensor mode) the all_sums one
decode step issued.
"""

import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_dsv4 import distributed
from mlx_dsv4.distributed import world_group
from mlx_dsv4.load import load

ckpt, work, shardings = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
if sys.argv[4:] == ["break"]:
    # negative controls. pipeline: the streams arrive halved at every stage but the first.
    _receive = distributed.Stage.receive
    distributed.Stage.receive = lambda self, shape: _receive(self, shape) * 0.5
    # tensor: rank 1 takes its output groups one group early (a wrong shard offset: group 0 counted twice)
    _plan = distributed.plan_tensor

    def _shifted(group, *a):
        s = _plan(group, *a)
        if group.rank() == 1:
            s.o_groups = range(s.o_groups.start - 1, s.o_groups.stop - 1)
        return s

    distributed.plan_tensor = _shifted
CHUNK, PREFILL = 50, 120  # chunked prefill in 3 pieces; decode the rest one token at a time

group = world_group()
toks = mx.array(np.load(f"{work}/tokens.npy"))
for sharding in shardings:
    model, _ = load(ckpt, dtype=mx.float32, simulate_qat=False, group=group, sharding=sharding)
    full = model(toks)
    cache = model.make_cache()
    chunked = mx.concatenate([model(toks[:, s : s + CHUNK], cache) for s in range(0, toks.shape[1], CHUNK)],
                             axis=1)
    cache = model.make_cache()
    steps = [model(toks[:, :PREFILL], cache, last_only=True)]
    calls = model.shard.calls if model.shard is not None else -1
    steps += [model(toks[:, i : i + 1], cache) for i in range(PREFILL, toks.shape[1])]
    step_calls = (model.shard.calls - calls) // (toks.shape[1] - PREFILL) if model.shard is not None else -1
    decode = mx.concatenate(steps, axis=1)  # logits at positions PREFILL-1 .. end
    held = sum(p.size for _, p in tree_flatten(model.parameters()))  # parameters (elements)
    np.savez(f"{work}/rank{group.rank()}.{sharding}.npz", full=np.array(full), chunked=np.array(chunked),
             decode=np.array(decode), held=held, layers=np.array(list(model.owned)), cache_layers=len(cache),
             step_calls=step_calls)
    del model, cache
