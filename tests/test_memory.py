"""Long prefill in bounded memory: real sparsity and chunking keep activations flat in L.

Runs in a subprocess so the peak is this prefill's alone. The bound (400 MB) is far below what
any dense path needs: a dense [L, entries] indexer score at 16k tokens is 4096x16384 floats
(256 MB) per head-sum alone, and a dense [L, L] window mask of 16k tokens is 1 GB.
"""

import functools
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys, mlx.core as mx
sys.path.insert(0, sys.argv[1])
from tinymodels import mlx_model, tokens
n = int(sys.argv[2])
m = mlx_model("flash", simulate_qat=True, dtype=mx.bfloat16)
c = m.make_cache(); mx.eval(m.parameters())
mx.reset_peak_memory(); base = mx.get_active_memory()
y = m(mx.array(tokens(n)), c, last_only=True); mx.eval(y)
print(json.dumps({"peak": mx.get_peak_memory() - base, "cache": sum(x.nbytes for x in c),
                  "finite": bool(mx.isfinite(y).all().item())}))
"""


@functools.cache  # both tests read the 16k run: one subprocess
def _peak(n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(Path(__file__).parent), str(n)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_16k_prefill_stays_within_a_few_hundred_mb():
    r16 = _peak(16384)
    assert r16["finite"]
    assert r16["peak"] < 400e6, r16


def test_peak_does_not_grow_with_prompt_length():
    r4, r16 = _peak(4096), _peak(16384)
    growth = (r16["peak"] - r16["cache"]) - (r4["peak"] - r4["cache"])
    assert growth < 0.15 * r4["peak"], (r4, r16)
