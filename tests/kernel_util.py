"""Helpers shared by the Metal-kernel tests (CPU harness)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from mlx_dsv4.kernels.registry import KernelSpec, parse_spec
from mlx_dsv4.kernels.sim import MetalSimError, compiler

needs_cxx = pytest.mark.skipif(compiler() is None, reason="the CPU harness needs a C++ compiler (g++)")


def spec(source: str, inputs: str, outputs: str, *, header: str = "", template: str = "", name: str = "t",
         **flags: str) -> KernelSpec:
    """A KernelSpec from a bare body, written through the .metal convention (so the parser is used)."""
    lines = [f"// @kernel {name}", f"// @inputs {inputs}", f"// @outputs {outputs}"]
    lines += [f"// @template {template}"] if template else []
    lines += [f"// @{k} {v}" for k, v in flags.items()]
    text = "\n".join(lines) + "\n\n" + (f"// @header\n{header}\n" if header else "") + f"// @source\n{source}\n"
    return parse_spec(text, path=f"<test:{name}>", name=name)


def variant(base: KernelSpec, old: str, new: str, section: str = "source") -> KernelSpec:
    """A deliberately broken copy: `old` must occur exactly once in the section (so the edit is real)."""
    text = getattr(base, section)
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in the {section}"
    changes = {section: text.replace(old, new)}
    if section == "header":  # the edit may fall in an @include'd file: keep includes and header in step
        changes["includes"] = tuple((p, t.replace(old, new)) for p, t in base.includes)
    return dataclasses.replace(base, **changes)


def assert_caught(run, matches) -> str:
    """A broken kernel is caught if the harness stops it (fault, race, divergence) or its output
    fails the check `matches(outputs) -> bool`. Returns how it was caught."""
    try:
        outs = run()
    except MetalSimError as e:
        return f"harness: {e}"
    assert not matches(outs), "the broken kernel was not caught: its output passes the reference check"
    return "mismatch"


def fake_metal(monkeypatch, spec) -> "CpuKernel":
    """Make the dispatch see Metal with every kernel served by one CpuKernel of `spec` (a KernelSpec
    or a name): the wrapper's own launch runs on the harness. Returns it, to count its calls."""
    from mlx_dsv4.kernels import registry
    from mlx_dsv4.kernels.sim import CpuKernel

    kernel = CpuKernel(spec)
    monkeypatch.delenv(registry.REFERENCE_ENV, raising=False)
    monkeypatch.setattr(registry, "metal_available", lambda: True)
    monkeypatch.setattr(registry, "get_kernel", lambda name: kernel)
    return kernel


def benchmark(name: str):
    """The module benchmarks/<name>.py (not a package: loaded from its file)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec_ = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    return mod
