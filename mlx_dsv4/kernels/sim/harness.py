"""Run a Metal kernel's source on the CPU: compile it with g++ against metal_sim.h, call it via ctypes.

The call mirrors mx.fast.metal_kernel's (inputs, template, grid, threadgroup, output_shapes,
output_dtypes, init_value). Every buffer sits between 64 MiB PROT_NONE guard regions, so reading or
writing past its end or before its start stops the launch with a message naming the buffer; slack
bytes and outputs without init_value hold 0xFF (NaN for floats), and a launch that wrote slack fails. By default the kernel runs
twice, with SIMD groups and lanes in forward and in reverse order, and the outputs must agree
bit for bit: a result that depends on the schedule is a race (typically a missing barrier).
Compiled libraries are cached by a hash of the translation unit, flags and headers.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import mmap
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from ..lint import check_spec
from ..registry import KernelSpec, load_spec
from .source import ArgInfo, mlx_source, shape_params, translation_unit, type_name

INCLUDE = Path(__file__).parent / "include"
FLAGS = ("-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-attributes", "-Wno-unknown-pragmas",
         # Metal has no double: unsuffixed literals are float there too.
         "-fsingle-precision-constant", "-ffp-contract=off", "-fno-strict-aliasing")
SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}
_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class MetalSimError(RuntimeError):
    """The kernel misbehaved on the CPU harness (fault, barrier divergence, ...)."""


class SimCompileError(MetalSimError):
    """g++ rejected the kernel; the message carries the compiler's diagnostics."""


class SimRaceError(MetalSimError):
    """Outputs differ between schedules: the kernel has a data race."""


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


@functools.cache
def _headers_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(INCLUDE.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def cache_dir() -> Path:
    d = os.environ.get("MLX_DSV4_SIM_CACHE") or os.path.join(tempfile.gettempdir(), f"mlx_dsv4_metal_sim_{os.getuid()}")
    Path(d).mkdir(parents=True, exist_ok=True)
    return Path(d)


_LIBS: dict[str, ctypes.CDLL] = {}


@functools.cache
def _include_dir(cxx: str) -> Path:
    """A copy of include/ with metal_sim.h precompiled (halves each kernel's compile); else include/."""
    d = cache_dir() / f"pch-{hashlib.sha256((_headers_digest() + cxx + ' '.join(FLAGS)).encode()).hexdigest()[:16]}"
    if (d / "metal_sim.h.gch").exists():
        return d
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    for p in INCLUDE.iterdir():
        shutil.copy(p, tmp / p.name)
    flags = [f for f in FLAGS if f != "-shared"]
    r = subprocess.run([cxx, *flags, "-Wno-pragma-once-outside-header", "-x", "c++-header", str(tmp / "metal_sim.h"),
                        "-o", str(tmp / "metal_sim.h.gch")], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        return INCLUDE
    try:
        os.replace(tmp, d)  # atomic; a concurrent builder may have won, which is fine
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return d if (d / "metal_sim.h.gch").exists() else INCLUDE


def compile_unit(tu: str) -> ctypes.CDLL:
    """Compile (or reuse) the shared library for one translation unit."""
    cxx = compiler()
    if cxx is None:
        raise SimCompileError("no C++ compiler found (set CXX or install g++)")
    key = hashlib.sha256("\0".join((tu, cxx, *FLAGS, _headers_digest())).encode()).hexdigest()[:32]
    if key in _LIBS:
        return _LIBS[key]
    d = cache_dir()
    so, cpp = d / f"{key}.so", d / f"{key}.cpp"
    if not so.exists():
        cpp.write_text(tu)
        tmp = d / f"{key}.{os.getpid()}.tmp.so"
        r = subprocess.run([cxx, *FLAGS, f"-I{_include_dir(cxx)}", str(cpp), "-o", str(tmp)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise SimCompileError(f"g++ failed on {cpp}:\n{r.stderr[-6000:]}")
        os.replace(tmp, so)
    lib = ctypes.CDLL(str(so))
    lib.msim_launch.restype = ctypes.c_int
    lib.msim_launch.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_long),
                                ctypes.POINTER(ctypes.c_long), ctypes.c_int, ctypes.c_int, ctypes.c_uint,
                                ctypes.c_char_p, ctypes.c_int]
    _LIBS[key] = lib
    return lib


_GUARD = 64 << 20  # PROT_NONE address space on either side of a buffer (never touched, so never memory): a
# stray index of up to 64 MiB faults, where a single guard page let a larger one write into this process's heap


class _Buffer:
    """Bytes that end (16-byte aligned) just before _GUARD bytes of PROT_NONE pages, with as many before the page
    they start in; the slack between (under a page before, under 16 bytes after) is 0xFF, and a launch that
    writes it is caught afterwards (`stray`)."""

    def __init__(self, label: str, nbytes: int, lead: int = 0):
        self.label, self.nbytes = label, nbytes
        data = -(-(nbytes + 16) // _PAGE) * _PAGE
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        self.mm = mmap.mmap(-1, _GUARD + data + _GUARD, flags=flags)
        whole = np.frombuffer(self.mm, np.uint8)
        base = whole.ctypes.data
        self.lo, self.guard = base + _GUARD, base + _GUARD + data
        for at in (base, self.guard):
            if _libc.mprotect(at, _GUARD, 0) != 0:  # PROT_NONE: reads fault too
                raise OSError(ctypes.get_errno(), "mprotect failed for a guard region")
        self.raw = whole[_GUARD : _GUARD + data]
        self.raw[:] = 0xFF
        self.start = (self.guard - nbytes) & ~15
        self.bytes = self.raw[self.start - self.lo : self.start - self.lo + nbytes]
        self.ptr = self.start + lead  # lead: byte offset of element 0 in a strided view

    def view(self, dtype, shape) -> np.ndarray:
        return self.bytes.view(dtype).reshape(shape)

    def describe(self, addr: int) -> str | None:
        if self.start + self.nbytes <= addr < self.guard + _GUARD:
            return f"{addr - self.start - self.nbytes} bytes past the end of {self.label} ({self.nbytes} bytes)"
        if self.lo - _GUARD <= addr < self.start:
            return f"{self.start - addr} bytes before the start of {self.label} ({self.nbytes} bytes)"
        if self.start <= addr < self.start + self.nbytes:
            return f"inside {self.label}"
        return None

    def stray(self) -> str | None:
        """A write into the slack around the bytes (what no guard page catches), described; None if none."""
        k = self.start - self.lo
        before, after = np.flatnonzero(self.raw[:k] != 0xFF), np.flatnonzero(self.raw[k + self.nbytes :] != 0xFF)
        if before.size:
            return f"a write {k - before[0]} bytes before the start of {self.label} ({self.nbytes} bytes)"
        if after.size:
            return f"a write {after[-1]} bytes past the end of {self.label} ({self.nbytes} bytes)"
        return None


def _as_numpy(x: Any) -> tuple[np.ndarray, str]:
    if isinstance(x, mx.array):
        if x.dtype == mx.bfloat16:
            return np.array(x.view(mx.uint16)), "bfloat16_t"
        x = np.array(x)
    elif not isinstance(x, np.ndarray):
        x = np.asarray(x, dtype=np.float32 if isinstance(x, float) else None)
    return x, type_name(x.dtype)


def _bf16_bits(v: np.ndarray) -> np.ndarray:
    u = np.asarray(v, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(v), np.uint16(0x7FC0), r)


def run_metal_kernel_on_cpu(
    kernel_spec: KernelSpec | str, inputs: Sequence[Any], template: Mapping[str, Any] | Sequence | None,
    grid: Sequence[int], threadgroup: Sequence[int], output_shapes: Sequence[Sequence[int]],
    output_dtypes: Sequence[Any], init_value: float | None = None, *,
    schedules: Sequence[str] = ("forward", "reverse"), workers: int | None = None, seed: int = 0,
    lint: bool = True,
) -> list[np.ndarray]:
    """Execute the kernel's Metal source on the CPU; outputs as numpy (bfloat16 ones as exact float32).

    schedules: one run per entry ("forward", "reverse", "random" with `seed`); all must agree.
    lint: refuse sources Metal would reject before compiling them as C++ (see ..lint).
    """
    spec = load_spec(kernel_spec) if isinstance(kernel_spec, str) else kernel_spec
    if lint:
        check_spec(spec)
    if len(inputs) != len(spec.inputs):
        raise ValueError(f"kernel {spec.name!r} takes inputs {spec.inputs}, got {len(inputs)} arrays")
    if not (len(output_shapes) == len(output_dtypes) == len(spec.outputs)):
        raise ValueError(f"kernel {spec.name!r} has outputs {spec.outputs}: give one shape and dtype for each")
    if len(grid) != 3 or len(threadgroup) != 3:
        raise ValueError("grid and threadgroup must have three entries")
    if not schedules or any(s not in SCHEDULES for s in schedules):
        raise ValueError(f"schedules must be a non-empty list of {sorted(SCHEDULES)}, got {schedules!r}")
    targs = spec.template_args(template) if spec.template or template else []
    arrays = [_as_numpy(x) for x in inputs]
    if spec.ensure_row_contiguous:
        arrays = [(a if a.flags.c_contiguous else a.copy(order="C"), t) for a, t in arrays]
    infos = [ArgInfo(t, int(a.size), a.ndim) for a, t in arrays]
    out_types = [type_name(d) for d in output_dtypes]
    lib = compile_unit(translation_unit(spec, infos, out_types, targs))

    keep, ptrs, named = [], [], []
    for name, (a, _) in zip(spec.inputs, arrays):
        buf = _input_buffer(f"input '{name}'", a)
        keep.append(buf), ptrs.append(buf.ptr), named.append(buf)
        if a.ndim:
            extra = (np.array(a.shape, np.int32), np.array(a.strides, np.int64) // a.itemsize, np.array(a.ndim, np.int32))
            for flag, arr in zip(shape_params(spec, name), extra):
                if flag:
                    keep.append(arr), ptrs.append(arr.ctypes.data)
    results = []
    for schedule in schedules:
        outs = []
        for name, shape, t in zip(spec.outputs, output_shapes, out_types):
            dt = np.uint16 if t == "bfloat16_t" else np.dtype(_np_name(t))
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
            buf = _Buffer(f"output '{name}'", max(n, 1))
            if init_value is not None:
                view = buf.view(dt, -1)[: n // np.dtype(dt).itemsize]
                view[:] = _bf16_bits(np.float32(init_value)) if t == "bfloat16_t" else init_value
            outs.append((buf, dt, tuple(shape), t))
        all_ptrs = ptrs + [b.ptr for b, *_ in outs]
        err = ctypes.create_string_buffer(4096)
        rc = lib.msim_launch((ctypes.c_void_p * len(all_ptrs))(*all_ptrs), (ctypes.c_long * 3)(*grid),
                             (ctypes.c_long * 3)(*threadgroup), workers or min(4, os.cpu_count() or 1),
                             SCHEDULES[schedule], seed, err, len(err))
        if rc:
            msg = err.value.decode()
            if m := re.search(r"at address (0x[0-9a-f]+)", msg):
                where = [d for b in named + [b for b, *_ in outs] if (d := b.describe(int(m[1], 16)))]
                msg += f" ({where[0]})" if where else ""
            raise (ValueError if rc == 1 else MetalSimError)(f"kernel {spec.name!r}: {msg}")
        if stray := next((m for b in named + [b for b, *_ in outs] if (m := b.stray())), None):
            raise MetalSimError(f"kernel {spec.name!r}: {stray}")
        results.append([_read(b, dt, shape, t) for b, dt, shape, t in outs])
    for other, schedule in zip(results[1:], schedules[1:]):
        for name, a, b in zip(spec.outputs, results[0], other):
            if a.tobytes() != b.tobytes():
                bad = int(np.sum(a.view(np.uint8) != b.view(np.uint8)))
                raise SimRaceError(f"kernel {spec.name!r}: output '{name}' differs between the {schedules[0]} and "
                                   f"{schedule} schedules ({bad} bytes): a data race, e.g. a missing barrier")
    return results[0]


def _np_name(t: str) -> str:
    return {"float": "float32", "float16_t": "float16", "bool": "bool"}.get(t, t.removesuffix("_t"))


def _input_buffer(label: str, a: np.ndarray) -> _Buffer:
    if a.flags.c_contiguous or a.ndim == 0:
        buf = _Buffer(label, max(a.nbytes, 1))
        buf.bytes[: a.nbytes] = a.reshape(-1).view(np.uint8)
        return buf
    # A strided view (ensure_row_contiguous=False): copy the byte span it covers, keep its strides.
    lo = sum(min(0, (n - 1) * s) for n, s in zip(a.shape, a.strides))
    hi = sum(max(0, (n - 1) * s) for n, s in zip(a.shape, a.strides)) + a.itemsize
    buf = _Buffer(label, hi - lo, lead=-lo)
    ctypes.memmove(buf.start, a.ctypes.data + lo, hi - lo)
    return buf


def _read(buf: _Buffer, dt, shape, t: str) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64))
    v = buf.bytes[: n * np.dtype(dt).itemsize].view(dt).reshape(shape).copy()
    return (v.astype(np.uint32) << 16).view(np.float32) if t == "bfloat16_t" else v


def generated_source(kernel_spec: KernelSpec | str, inputs: Sequence[Any], template=None,
                     output_dtypes: Sequence[Any] = ()) -> str:
    """The text MLX would compile for this call (for reading, and for tests against MLX itself)."""
    spec = load_spec(kernel_spec) if isinstance(kernel_spec, str) else kernel_spec
    arrays = [_as_numpy(x) for x in inputs]
    targs = spec.template_args(template) if spec.template or template else []
    return mlx_source(spec, [ArgInfo(t, int(a.size), a.ndim) for a, t in arrays],
                      [type_name(d) for d in output_dtypes], targs)[1]


class CpuKernel:
    """Call-compatible with an mx.fast.metal_kernel object, running on the CPU harness."""

    @classmethod
    def from_metal_kernel_args(cls, name: str, input_names, output_names, source: str, header: str = "",
                               ensure_row_contiguous: bool = True, atomic_outputs: bool = False, **_) -> CpuKernel:
        """Stand-in for mx.fast.metal_kernel(...) itself (e.g. to run kernels written elsewhere)."""
        return cls(KernelSpec(name=name, inputs=tuple(input_names), outputs=tuple(output_names), source=source,
                              header=header, ensure_row_contiguous=ensure_row_contiguous,
                              atomic_outputs=atomic_outputs, path=f"<{name}>"))

    def __init__(self, spec: KernelSpec | str, **options):
        self.spec = load_spec(spec) if isinstance(spec, str) else spec
        self.options = options
        self.calls = 0

    def __call__(self, *, inputs, grid, threadgroup, output_shapes, output_dtypes, template=None,
                 init_value=None, verbose=False, stream=None) -> list[mx.array]:
        self.calls += 1
        spec = self.spec
        if template and not spec.template:  # a kernel built outside the .metal convention
            kinds = [(n, "bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "type")
                     for n, v in dict(template).items()]
            spec = dataclasses.replace(spec, template=tuple(kinds))
        outs = run_metal_kernel_on_cpu(spec, inputs, template, grid, threadgroup, output_shapes,
                                       output_dtypes, init_value, **self.options)
        return [mx.array(o).astype(d) if d == mx.bfloat16 else mx.array(o) for o, d in zip(outs, output_dtypes)]
