"""Run the model's kernel paths on this CPU: the dispatch sees "Metal", each launch runs on the harness.

    with kernels_on_cpu() as calls:
        logits = model(tokens, cache)   # every registry.launch executes the .metal source via g++
    calls  # Counter: launches per kernel name

Slow (each launch runs its GPU threads as fibers, twice, for race detection) and eager (inputs are
evaluated at each launch): meant for tiny models in tests, to check the kernels in the model's own
call sites, layouts and dtypes against the reference path.
"""

from __future__ import annotations

import collections
import contextlib
import functools

from .. import registry
from ..registry import KernelSpec
from .harness import CpuKernel


@contextlib.contextmanager
def kernels_on_cpu(specs: dict[str, KernelSpec] | None = None, **options):
    """specs: KernelSpecs to run instead of the .metal files of those names (e.g. a broken copy);
    options go to the harness (e.g. schedules=("forward",) to run each launch once)."""
    calls: collections.Counter = collections.Counter()

    @functools.cache
    def kernel(name: str) -> CpuKernel:
        return CpuKernel((specs or {}).get(name, name), **options)

    def get_kernel(name: str):
        k = kernel(name)

        def launch(**kw):
            calls[name] += 1
            return k(**kw)

        return launch

    saved = registry.metal_available, registry.get_kernel
    registry.metal_available, registry.get_kernel = (lambda: True), get_kernel
    try:
        yield calls
    finally:
        registry.metal_available, registry.get_kernel = saved
