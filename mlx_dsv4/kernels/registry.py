"""Custom Metal kernels: the .metal file convention, lazy kernel objects, and the dispatch rule.

Each ``metal_kernels/<name>.metal`` holds the *body* of one kernel (what ``mx.fast.metal_kernel``
takes as ``source``), optional helper code for its ``header``, and a leading comment block that
declares the interface::

    // @kernel       sinkhorn_split            (must equal the file name)
    // @inputs       mixes: float[N, 24]; scale: float[3]
    // @outputs      comb: float[N, 4, 4]
    // @template     ITERS: int; T: type        (optional; kinds int | bool | type)
    // @row_contiguous true                     (optional, default true)
    // @atomic_outputs false                    (optional, default false)
    // @grid         (16 * N, 1, 1)             (any other @field is documentation,
    //               continued on lines indented by 3+ spaces)
    // @header                                  (optional marker line: helper code follows)
    // @source                                  (marker line: the kernel body follows)

Only the names (before ``:``) of inputs / outputs are binding; the types and shapes after them
document what the Python wrapper passes. Template arguments are always passed in declared order.
See README.md in this folder for the full convention and how the CPU harness verifies kernels.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

REFERENCE_ENV = "MLX_DSV4_REFERENCE"
TEMPLATE_KINDS = ("int", "bool", "type")
_FIELD = re.compile(r"^//\s?@([\w-]+)\s*(.*)$")
_CONT = re.compile(r"^//\s{3,}(\S.*)$")
_IDENT = re.compile(r"^[A-Za-z_]\w*$")


class KernelSpecError(ValueError):
    """A .metal file that does not follow the convention (the message names file and field)."""


@dataclass(frozen=True)
class KernelSpec:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    source: str
    header: str = ""
    template: tuple[tuple[str, str], ...] = ()  # (name, kind) in declared order
    ensure_row_contiguous: bool = True
    atomic_outputs: bool = False
    doc: Mapping[str, str] = field(default_factory=dict)  # every other @field, verbatim
    path: str = "<string>"
    source_line: int = 1  # 1-based line of the body's first line in `path` (for diagnostics)
    header_line: int = 1
    includes: tuple[tuple[str, str], ...] = ()  # (path, text) of shared .h files, leading `header`

    @property
    def own_header(self) -> str:
        """The header section of the .metal file itself (`header` minus the included files)."""
        return self.header[sum(len(t) for _, t in self.includes):]

    def template_args(self, template: Mapping[str, Any] | Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
        """Check `template` against the declaration; return it as (name, value) pairs in declared order."""
        given = dict(template or {})
        declared = dict(self.template)
        if set(given) != set(declared):
            missing, extra = sorted(set(declared) - set(given)), sorted(set(given) - set(declared))
            raise ValueError(f"kernel {self.name!r}: template arguments missing {missing}, unexpected {extra}")
        out = []
        for name, kind in self.template:
            v = given[name]
            ok = {"bool": isinstance(v, bool), "int": isinstance(v, int) and not isinstance(v, bool)}.get(kind)
            if kind == "type":
                ok = isinstance(v, (mx.Dtype, str)) or hasattr(v, "itemsize")
            if not ok:
                raise ValueError(f"kernel {self.name!r}: template argument {name} must be {kind}, got {v!r}")
            out.append((name, v))
        return out


def parse_spec(text: str, path: str = "<string>", name: str | None = None,
               include_dir: Path | None = None) -> KernelSpec:
    """Parse the text of one .metal file (see the module docstring for the format). `@include a; b`
    prepends include_dir/a.h, b.h (default: the file's folder) to the header: code two kernels share."""
    lines = text.splitlines()
    fields: dict[str, str] = {}
    last = None
    i = 0
    while i < len(lines) and lines[i].lstrip().startswith("//"):
        line = lines[i].strip()
        if line in ("// @header", "// @source"):
            break
        if m := _FIELD.match(line):
            last = m.group(1)
            if last in fields:
                raise KernelSpecError(f"{path}: field @{last} given twice")
            fields[last] = m.group(2).strip()
        elif (m := _CONT.match(line)) and last is not None:
            fields[last] += " " + m.group(1).strip()
        else:
            last = None
        i += 1
    sections: dict[str, tuple[int, list[str]]] = {}
    current = None
    for j in range(i, len(lines)):
        marker = lines[j].strip()
        if marker in ("// @header", "// @source"):
            current = marker[4:]
            if current in sections:
                raise KernelSpecError(f"{path}: section marker '{marker}' appears twice")
            sections[current] = (j + 2, [])
        elif current is not None:
            sections[current][1].append(lines[j])
        elif marker:
            raise KernelSpecError(f"{path}: line {j + 1}: code before the '// @source' marker")
    if "source" not in sections:
        raise KernelSpecError(f"{path}: no '// @source' marker line")
    if "header" in sections and sections["header"][0] > sections["source"][0]:
        raise KernelSpecError(f"{path}: '// @header' must come before '// @source'")

    for required in ("kernel", "inputs", "outputs"):
        if required not in fields:
            raise KernelSpecError(f"{path}: missing @{required} field")
    kname = fields.pop("kernel")
    if not _IDENT.match(kname) or (name is not None and kname != name):
        raise KernelSpecError(f"{path}: @kernel {kname!r} must be an identifier equal to the file name {name!r}")

    def names(key: str, allow_empty: bool = False) -> tuple[str, ...]:
        items = [s.strip() for s in fields.pop(key, "").split(";") if s.strip()]
        out = tuple(s.split(":")[0].strip() for s in items)
        for n in out:
            if not _IDENT.match(n):
                raise KernelSpecError(f"{path}: @{key}: {n!r} is not an identifier")
        if not out and not allow_empty:
            raise KernelSpecError(f"{path}: @{key} lists nothing")
        return out

    inputs, outputs = names("inputs", allow_empty=True), names("outputs")
    template = []
    for item in [s.strip() for s in fields.pop("template", "").split(";") if s.strip()]:
        tname, _, kind = (p.strip() for p in item.partition(":"))
        if not _IDENT.match(tname) or kind not in TEMPLATE_KINDS:
            raise KernelSpecError(f"{path}: @template entry {item!r}: want 'NAME: {' | '.join(TEMPLATE_KINDS)}'")
        template.append((tname, kind))
    all_names = list(inputs) + list(outputs) + [t for t, _ in template]
    if dup := sorted({n for n in all_names if all_names.count(n) > 1}):
        raise KernelSpecError(f"{path}: names used twice: {dup}")

    def flag(key: str, default: bool) -> bool:
        v = fields.pop(key, str(default).lower()).lower()
        if v not in ("true", "false"):
            raise KernelSpecError(f"{path}: @{key} must be true or false, got {v!r}")
        return v == "true"

    def body(sec: str) -> tuple[str, int]:
        start, blines = sections.get(sec, (1, []))
        while blines and not blines[0].strip():
            blines, start = blines[1:], start + 1
        return "\n".join(blines).rstrip() + ("\n" if blines else ""), start

    source, source_line = body("source")
    header, header_line = body("header")
    includes = []
    for inc in [t.strip() for t in fields.pop("include", "").split(";") if t.strip()]:
        ipath = Path(include_dir or Path(path).parent) / f"{inc}.h"
        if not _IDENT.match(inc) or not ipath.is_file():
            raise KernelSpecError(f"{path}: @include {inc!r}: no file {ipath}")
        itext = ipath.read_text()
        includes.append((str(ipath), itext if itext.endswith("\n") else itext + "\n"))
    if not source.strip():
        raise KernelSpecError(f"{path}: empty kernel body")
    return KernelSpec(
        name=kname, inputs=inputs, outputs=outputs, source=source, template=tuple(template),
        header="".join(t for _, t in includes) + header,
        ensure_row_contiguous=flag("row_contiguous", True), atomic_outputs=flag("atomic_outputs", False),
        doc=dict(fields), path=path, source_line=source_line, header_line=header_line, includes=tuple(includes),
    )


def kernel_dir() -> Path:
    """Installed: the package mlx_dsv4.metal_kernels; from a checkout: <repo>/metal_kernels."""
    try:
        import mlx_dsv4.metal_kernels as pkg

        return Path(pkg.__file__).parent
    except ImportError:
        return Path(__file__).resolve().parents[2] / "metal_kernels"


def available_kernels() -> list[str]:
    return sorted(p.stem for p in kernel_dir().glob("*.metal"))


@functools.cache
def load_spec(name: str) -> KernelSpec:
    path = kernel_dir() / f"{name}.metal"
    if not path.is_file():
        raise KernelSpecError(f"no kernel {name!r}: {path} does not exist (have {available_kernels()})")
    return parse_spec(path.read_text(), str(path), name)


def metal_available() -> bool:
    return mx.metal.is_available()


def use_kernels() -> bool:
    """True only on Metal and when MLX_DSV4_REFERENCE is not "1" (then the pure-MLX references run)."""
    return metal_available() and os.environ.get(REFERENCE_ENV) != "1"


@functools.cache
def get_kernel(name: str):
    """The mx.fast.metal_kernel object for `name`, built on first use (Metal only)."""
    if not metal_available():
        raise RuntimeError(f"kernel {name!r}: Metal is not available; call the reference instead")
    from .lint import check_spec

    spec = load_spec(name)
    check_spec(spec)
    return mx.fast.metal_kernel(
        name=spec.name, input_names=list(spec.inputs), output_names=list(spec.outputs), source=spec.source,
        header=spec.header, ensure_row_contiguous=spec.ensure_row_contiguous, atomic_outputs=spec.atomic_outputs,
    )


@functools.lru_cache(maxsize=256)
def placeholder(shape: tuple, dtype) -> mx.array:
    """An input a kernel's template never reads, made once per shape and dtype: a decode step's graph then holds
    no fill launch for it, nor its step an evaluation. Made from host memory (no graph to evaluate), so a step built
    for another thread's stream (evaluator.py) can make it too. Use 8+ elements to keep it in device memory like
    the inputs it stands for."""
    return mx.array(np.zeros(shape, np.float32), dtype)


@functools.lru_cache(maxsize=1024)
def constant(value: float | int | tuple, dtype) -> mx.array:
    """A small input that is the same at every launch (an eps, a scale, a routing constant), built and
    evaluated once: a decode step then allocates and copies none of them (~530 in the 460 launches of a
    Flash-schedule step)."""
    a = mx.array(value, dtype)
    mx.eval(a)
    return a


def int_inputs(*values: int | mx.array) -> mx.array:
    """The int32 vector of `values`: Python ints, or int scalar arrays where a compiled decode step computes a
    position (compiled_step.py), so that one trace serves every position. There the ints are shared constants:
    mx.compile then merges the vectors the layers build from the same position (one node, not one per launch)."""
    if all(isinstance(v, int) for v in values):
        return mx.array(values, dtype=mx.int32)
    return mx.concatenate([v.reshape(1).astype(mx.int32) if isinstance(v, mx.array) else constant((v,), mx.int32)
                           for v in values])


@functools.lru_cache(maxsize=4096)
def _template(name: str, given: tuple) -> tuple:
    """KernelSpec.template_args, once per distinct template (a decode step launches ~2,400 kernels with a
    few dozen templates). The type is part of the key: True == 1, but an int is no bool argument."""
    return tuple(load_spec(name).template_args([(k, v) for k, _, v in given]))


def launch(name: str, inputs: Sequence[mx.array], *, template=None, grid, threadgroup, output_shapes,
           output_dtypes, init_value: float | None = None) -> list[mx.array]:
    """Call kernel `name` with its template checked and put in declared order."""
    spec = load_spec(name)
    if len(inputs) != len(spec.inputs):
        raise ValueError(f"kernel {name!r} takes {len(spec.inputs)} inputs {spec.inputs}, got {len(inputs)}")
    kw = {"inputs": list(inputs), "grid": tuple(grid), "threadgroup": tuple(threadgroup),
          "output_shapes": [tuple(s) for s in output_shapes], "output_dtypes": list(output_dtypes)}
    if spec.template:
        given = template.items() if isinstance(template, Mapping) else (template or ())
        kw["template"] = list(_template(name, tuple((k, type(v), v) for k, v in given)))
    if init_value is not None:
        kw["init_value"] = init_value
    return get_kernel(name)(**kw)
