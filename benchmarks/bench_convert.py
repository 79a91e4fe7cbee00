"""Conversion throughput (MB/s of official input) and peak RSS for a few checkpoint sizes.

    python benchmarks/bench_convert.py [--experts 16 64 128] [--modes lossless affine8] [--dir /tmp]

Checkpoints are official-layout (2 layers + MTP, hidden 2048, expert inter 2048, E routed
experts per layer, so the size scales with E), written once with random codes. Every conversion
runs in a fresh process that reports its own peak RSS. Numbers include reading and fsyncing
the files, so they depend on the disk and the page cache as much as on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GEN = """
import sys
sys.path.insert(0, {tests!r})
from ckpt_util import small_config
from mlx_dsv4.checkpoint import write_random_official_checkpoint
cfg = small_config(hidden_size=2048, moe_intermediate_size=2048, n_routed_experts={E},
                   compress_ratios=[0, 4, 0], num_hidden_layers=2)
write_random_official_checkpoint({out!r}, cfg, seed=0)
"""

RUN = """
import json, resource, sys, time
from mlx_dsv4.checkpoint import convert
t = time.perf_counter()
convert({src!r}, {dst!r}, quant_mode={mode!r}, progress=False, overwrite=True)
dt = time.perf_counter() - t
# Linux: VmHWM of this (exec'd) address space. ru_maxrss would carry the parent's lifetime peak
# (Python spawns with vfork and Linux keeps the pre-exec high-water mark across exec).
try:
    peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 2**10
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
print(json.dumps({{"seconds": dt, "peak_mb": peak}}))
"""


def _py(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode:
        sys.exit(r.stderr)
    return r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""


def machine() -> str:
    import mlx.core as mx

    mem = ""
    if Path("/proc/meminfo").exists():
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    elif sys.platform == "darwin":
        out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True).stdout
        mem = f", {int(out) / 2**30:.0f} GiB RAM" if out.strip() else ""
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{mem}; "
            f"Python {platform.python_version()}, MLX {mx.__version__} ({mx.default_device()})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--modes", nargs="+", default=["lossless", "affine8"])
    ap.add_argument("--dir", default=None, help="scratch directory (needs ~2x the largest size free)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print(f"{'experts':>7} {'input GB':>9} {'mode':>9} {'seconds':>8} {'MB/s':>7} {'peak RSS MB':>12}")
    scratch = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.dir))
    try:
        for E in args.experts:
            src = scratch / f"official-{E}"
            _py(GEN.format(tests=str(ROOT / "tests"), E=E, out=str(src)))
            size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
            for mode in args.modes:
                r = json.loads(_py(RUN.format(src=str(src), dst=str(scratch / "mlx"), mode=mode)))
                print(f"{E:>7} {size / 1e9:>9.2f} {mode:>9} {r['seconds']:>8.2f} "
                      f"{size / 1e6 / r['seconds']:>7.0f} {r['peak_mb']:>12.0f}", flush=True)
            shutil.rmtree(src)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
