"""The source text MLX 0.32 generates for an mx.fast.metal_kernel call, and the C++ unit built from it.

`mlx_source` reproduces MLX's generator character for character (header, template line, the
signature with `[[buffer(i)]]` indices, `_shape/_strides/_ndim` parameters for inputs whose names
appear in the body, the thread attributes the body mentions, and the explicit instantiation);
tests/test_metal_sim.py checks it against what MLX itself prints with verbose=True.
`translation_unit` compiles that same text with g++ against include/metal_sim.h; the only edits
are #line markers (so diagnostics and SIMD call sites point into the .metal file) and threadgroup
array declarations, which become storage shared by the threadgroup's fibers.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from ..lint import TG_DECL
from ..registry import KernelSpec

# (attribute, type) in MLX's order; one is declared when its name occurs anywhere in the body.
ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"), ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"), ("grid_origin", "uint3"), ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"), ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"), ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"), ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"), ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"), ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"), ("threadgroups_per_grid", "uint3"), ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"), ("threads_per_threadgroup", "uint3"),
)
CONSTANT_LIMIT = 8  # inputs with fewer elements go to the `constant` address space

_MX_NAMES = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.bool_: "bool",
             mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t", mx.int64: "int64_t",
             mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t", mx.uint64: "uint64_t",
             mx.complex64: "complex64_t"}
_NP_NAMES = {"float32": "float", "float16": "float16_t", "bool": "bool", "int8": "int8_t", "int16": "int16_t",
             "int32": "int32_t", "int64": "int64_t", "uint8": "uint8_t", "uint16": "uint16_t",
             "uint32": "uint32_t", "uint64": "uint64_t", "complex64": "complex64_t"}
TYPE_NAMES = frozenset(_MX_NAMES.values())


def type_name(dtype: Any) -> str:
    """MLX's Metal type name for an mx.Dtype, a numpy dtype, or an MLX type name."""
    if isinstance(dtype, mx.Dtype):
        return _MX_NAMES[dtype]
    if isinstance(dtype, str) and dtype in TYPE_NAMES:
        return dtype
    try:
        return _NP_NAMES[np.dtype(dtype).name]
    except (KeyError, TypeError):
        raise ValueError(f"no Metal type for dtype {dtype!r} (Metal has no double)") from None


@dataclass(frozen=True)
class ArgInfo:
    """What the generator needs to know of one input array."""

    type: str
    size: int
    ndim: int

    @property
    def scalar(self) -> bool:
        return self.ndim == 0

    @property
    def constant(self) -> bool:
        return self.size < CONSTANT_LIMIT


def template_value(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return type_name(v)


def shape_params(spec: KernelSpec, name: str) -> tuple[bool, bool, bool]:
    return tuple(f"{name}{suffix}" in spec.source for suffix in ("_shape", "_strides", "_ndim"))


def used_attributes(spec: KernelSpec) -> list[tuple[str, str]]:
    return [(a, t) for a, t in ATTRIBUTES if a in spec.source]


def function_name(spec: KernelSpec, inputs: Sequence[ArgInfo], output_types: Sequence[str],
                  template: Sequence[tuple[str, Any]]) -> str:
    name = f"custom_kernel_{spec.name}"
    if template:
        name += "_" + "".join("_" + template_value(v) for _, v in template).replace("-", "_")
    name += "".join("_" + a.type + ("s" if a.scalar else "c" if a.constant else "") for a in inputs)
    return name + "".join("_" + t for t in output_types)


def mlx_source(spec: KernelSpec, inputs: Sequence[ArgInfo], output_types: Sequence[str],
               template: Sequence[tuple[str, Any]], *, _lines: str | None = None) -> tuple[str, str]:
    """(function name, source text) exactly as MLX 0.32 generates them for this call."""
    if len(inputs) != len(spec.inputs) or len(output_types) != len(spec.outputs):
        raise ValueError(f"kernel {spec.name!r}: {len(spec.inputs)} inputs / {len(spec.outputs)} outputs expected")
    func = function_name(spec, inputs, output_types, template)
    out = [spec.header]
    if _lines:  # #line markers: diagnostics and SIMD call sites then refer to the .metal file
        out = [f'#line 1 "{p}"\n{t}' for p, t in spec.includes]
        out += [f'#line {spec.header_line} "{_lines}"\n{spec.own_header}' if spec.own_header else "",
                f'\n#line 1 "{spec.name}:signature"\n']
    if template:
        params = [f"{'bool' if isinstance(v, bool) else 'int' if isinstance(v, int) else 'typename'} {n}"
                  for n, v in template]
        out.append(f"template <{', '.join(params)}>\n")
    out.append(f"[[kernel]] void {func}(\n")
    params, index = [], 0
    for name, a in zip(spec.inputs, inputs):
        space = "constant" if a.constant else "device"
        params.append(f"  const {space} {a.type}{'&' if a.scalar else '*'} {name} [[buffer({index})]]")
        index += 1
        if not a.scalar:
            for flag, decl in zip(shape_params(spec, name), ("const constant int* {}_shape",
                                                              "const constant int64_t* {}_strides",
                                                              "const constant int& {}_ndim")):
                if flag:
                    params.append(f"  {decl.format(name)} [[buffer({index})]]")
                    index += 1
    for name, t in zip(spec.outputs, output_types):
        t = f"atomic<{t}>" if spec.atomic_outputs else t
        params.append(f"  device {t}* {name} [[buffer({index})]]")
        index += 1
    params += [f"  {t} {a} [[{a}]]" for a, t in used_attributes(spec)]
    out.append(",\n".join(params) + ") {\n")
    body = spec.source
    if _lines:
        body = f'#line {spec.source_line} "{_lines}"\n' + rewrite_threadgroup(body)
    out.append(body + "\n}\n")
    if template:
        inst = f"{func}<{', '.join(template_value(v) for _, v in template)}>"
        out.append(f'\ntemplate [[host_name("{func}")]] [[kernel]] decltype({inst}) {inst};\n')
    return func, "".join(out)


def rewrite_threadgroup(body: str) -> str:
    return TG_DECL.sub(lambda m: f"static thread_local {m['type']} {m['name']}{m['dims'].rstrip()}; "
                                 f"::msim::tg_declare((void*)&{m['name']}, sizeof({m['name']}));", body)


def translation_unit(spec: KernelSpec, inputs: Sequence[ArgInfo], output_types: Sequence[str],
                     template: Sequence[tuple[str, Any]]) -> str:
    """The C++ file: metal_sim.h, MLX's text inside namespace metal, and an entry point per thread."""
    func, text = mlx_source(spec, inputs, output_types, template, _lines=spec.path)
    targs = [template_value(v) if isinstance(v, int) else _ctype(template_value(v)) for _, v in template]
    inst = f"metal::{func}" + (f"<{', '.join(targs)}>" if template else "")
    args, b = [], 0
    for name, a in zip(spec.inputs, inputs):
        ctype = _ctype(a.type)
        args.append(f"*(const {ctype}*)b[{b}]" if a.scalar else f"(const {ctype}*)b[{b}]")
        b += 1
        if not a.scalar:
            for flag, ctype in zip(shape_params(spec, name), ("const int*", "const long*", None)):
                if flag:
                    args.append(f"({ctype})b[{b}]" if ctype else f"*(const int*)b[{b}]")
                    b += 1
    for t in output_types:
        ctype = f"metal::atomic<{_ctype(t)}>" if spec.atomic_outputs else _ctype(t)
        args.append(f"({ctype}*)b[{b}]")
        b += 1
    args += [f"t.{a}" for a, _ in used_attributes(spec)]
    return (
        '#include "metal_sim.h"\nnamespace metal {\n' + text + "}  // namespace metal\n"
        '#line 1 "harness-entry"\n'
        "static void msim_entry(const msim::Ids& t, void* const* b) {\n"
        f"  {inst}({', '.join(args)});\n}}\n"
        'extern "C" int msim_launch(void* const* bufs, const long* grid, const long* tg, int workers,\n'
        "                           int schedule, unsigned seed, char* err, int errlen) {\n"
        "  return msim::launch(msim_entry, bufs, grid, tg, workers, schedule, seed, err, errlen);\n}\n"
    )


def _ctype(t: str) -> str:
    if t == "complex64_t":
        raise ValueError("the CPU harness does not model complex64_t")
    return f"metal::{t}" if t in ("float16_t", "bfloat16_t") else t
