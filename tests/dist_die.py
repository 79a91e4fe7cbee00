"""A rank that dies mid-generation (test_distributed_faults.py): the last rank SIGKILLs itself
at decode step 3; the others must end with one `error:` line, never hang.

argv: checkpoint dir, sharding."""

import os
import signal
import sys
import time

import mlx.core as mx

from mlx_dsv4.distributed import world_group
from mlx_dsv4.load import load
from mlx_dsv4.watchdog import DistributedError

group = world_group()
model, _ = load(sys.argv[1], dtype=mx.float32, simulate_qat=False, group=group, sharding=sys.argv[2])
cache = model.make_cache()
tok = mx.array([[5]])
try:
    for step in range(1000):
        if step == 3 and group.rank() == group.size() - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == 3:
            print(f"rank {group.rank()} step 3 at {time.time():.3f}", flush=True)
        tok = model(tok, cache).argmax(-1).astype(mx.int32)
except DistributedError as e:
    print(f"error: {e} (at {time.time():.3f})", file=sys.stderr, flush=True)
    sys.exit(1)
print("finished without noticing the dead rank", flush=True)
