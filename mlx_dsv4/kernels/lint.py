"""Reject what the Metal Shading Language does not accept, before a Mac ever sees the kernel.

The CPU harness compiles kernels as C++, which is more permissive than Metal: double, the
standard library, heap allocation, recursion, function pointers and exceptions all compile there
but not on a GPU. This lint closes that gap on the kernel sources (header and body of a .metal
file; comments and string literals are ignored). It also enforces the one convention the harness
relies on: threadgroup arrays are declared in the kernel body, one per statement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .registry import KernelSpec

# `threadgroup T name[dims];` (one per statement, at kernel scope): storage shared by the fibers
# of one threadgroup. Pointers and references (`threadgroup T* p`) keep only the qualifier.
TG_DECL = re.compile(
    r"\bthreadgroup\s+(?P<type>(?:const\s+)?[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?)\s+"
    r"(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\];]+\]\s*)*);"
)

METAL_HEADERS = {"metal_stdlib", "metal_simdgroup", "metal_simdgroup_matrix", "metal_atomic", "metal_math",
                 "metal_compute", "metal_integer", "metal_common"}
_RULES = [  # (rule, pattern, message, sections)
    ("double", r"\bdouble\b", "Metal has no double precision; use float", "hs"),
    ("alloc", r"\b(?:malloc|calloc|realloc|free|aligned_alloc|alloca)\s*\(|\bnew\b|\bdelete\b",
     "no dynamic allocation on the GPU: use fixed-size arrays or threadgroup memory", "hs"),
    ("std", r"\bstd\s*::", "the C++ standard library does not exist in Metal; use the metal:: functions", "hs"),
    ("io", r"\b(?:printf|fprintf|sprintf|snprintf|puts|cout|cerr|fopen)\b", "no printing or files on the GPU", "hs"),
    ("goto", r"\bgoto\b", "Metal does not support goto", "hs"),
    ("function-pointer", r"\(\s*(?:\w+\s*::\s*)?\*\s*\w*\s*\)\s*\(", "Metal has no function pointers", "hs"),
    ("exceptions", r"\b(?:try|catch|throw)\b", "Metal has no exceptions", "hs"),
    ("rtti", r"\b(?:dynamic_cast|typeid|virtual)\b", "Metal has no RTTI or virtual functions", "hs"),
    ("asm", r"\b(?:asm|__asm__)\b", "no inline assembly", "hs"),
    ("variadic", r"[(,]\s*\.\.\.\s*\)", "Metal has no variadic (C-style ...) functions", "hs"),
    ("storage", r"\b(?:thread_local|extern)\b|\bstatic\b(?!\s+(?:constexpr|const|inline)\b)",
     "static, thread_local and extern variables do not exist in Metal kernels", "s"),
    ("cuda", r"\b(?:__syncthreads|__shared__|__global__|threadIdx|blockIdx|blockDim|atomicAdd|__shfl\w*)\b",
     "a CUDA construct; Metal spells it differently", "hs"),
]
_INCLUDE = re.compile(r"^[ \t]*#[ \t]*include[ \t]*[<\"]([^>\"]+)[>\"]", re.MULTILINE)
_TG_WORD = re.compile(r"\bthreadgroup\b(?!_)")
_TG_POINTER = re.compile(r"\bthreadgroup\s+(?:const\s+)?[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?\s*(?:const\s*)?[*&]")
_FUNC_DEF = re.compile(r"\b([A-Za-z_]\w*)\s*\([^;{}()]*(?:\([^;{}()]*\)[^;{}()]*)*\)\s*(?:const\s*)?\{")
_CALL = re.compile(r"\b([A-Za-z_]\w*)\s*(?:<[^;{}()]*?>\s*)?\(")
_KEYWORDS = {"if", "for", "while", "switch", "return", "sizeof", "catch", "decltype", "alignof", "static_assert",
             "defined"}


@dataclass(frozen=True)
class LintIssue:
    rule: str
    line: int  # line in the .metal file (or in the snippet when linting a bare string)
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: [{self.rule}] {self.message}"


class KernelLintError(ValueError):
    pass


def strip_comments_and_strings(text: str) -> str:
    """Blank out comments and string / char literals, keeping every newline (line numbers hold)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
        else:
            out.append(c)
            i += 1
            continue
        out.append(re.sub(r"[^\n]", " ", text[i:j]))
        i = j
    return "".join(out)


def lint_source(text: str, section: str = "source", first_line: int = 1) -> list[LintIssue]:
    """Issues in one section ("header" or "source") of a kernel; `first_line` maps to file lines."""
    code = strip_comments_and_strings(text)
    key = "s" if section == "source" else "h"

    def line(pos: int) -> int:
        return first_line + code.count("\n", 0, pos)

    issues = [LintIssue(rule, line(m.start()), msg)
              for rule, pat, msg, where in _RULES if key in where for m in re.finditer(pat, code)]
    issues += [LintIssue("include", line(m.start()), f"#include <{m[1]}>: only Metal's own headers exist on a GPU")
               for m in _INCLUDE.finditer(text) if m[1] not in METAL_HEADERS]  # raw text: "x.h" is a string
    issues += _threadgroup_issues(code, section, line)
    return sorted(issues, key=lambda i: (i.line, i.rule))


def _threadgroup_issues(code: str, section: str, line) -> list[LintIssue]:
    declared = {m.start() for m in TG_DECL.finditer(code)}
    pointers = {m.start() for m in _TG_POINTER.finditer(code)}
    issues = []
    for m in _TG_WORD.finditer(code):
        if m.start() in pointers:
            continue
        if section != "source":
            issues.append(LintIssue("threadgroup", line(m.start()),
                                    "threadgroup variables belong in the kernel body (helpers take pointers)"))
        elif m.start() not in declared:
            issues.append(LintIssue("threadgroup", line(m.start()),
                                    "declare threadgroup memory one array per statement: `threadgroup T name[N];`"))
        elif code.count("{", 0, m.start()) != code.count("}", 0, m.start()):
            issues.append(LintIssue("threadgroup", line(m.start()),
                                    "declare threadgroup memory at the kernel's top level, not inside a block"))
    return issues


def recursion_issues(header: str, header_line: int = 1) -> list[LintIssue]:
    """Direct or mutual recursion among the header's functions (Metal has no call stack for it)."""
    code = strip_comments_and_strings(header)
    bodies: dict[str, tuple[int, str]] = {}
    for m in _FUNC_DEF.finditer(code):
        if m[1] in _KEYWORDS:
            continue
        depth, j = 1, m.end()
        while j < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            j += 1
        bodies[m[1]] = (header_line + code.count("\n", 0, m.start()), code[m.end() : j])
    calls = {f: {c for c in _CALL.findall(b) if c in bodies} for f, (_, b) in bodies.items()}
    issues, reported = [], set()

    def visit(f: str, path: list[str]) -> None:
        for g in sorted(calls[f]):
            if g in path:
                cycle = path[path.index(g):] + [g]
                if frozenset(cycle) not in reported:
                    reported.add(frozenset(cycle))
                    issues.append(LintIssue("recursion", bodies[g][0], "recursive call " + " -> ".join(cycle)
                                            + ": Metal does not support recursion"))
            else:
                visit(g, path + [g])

    for f in sorted(bodies):
        visit(f, [f])
    return issues


def lint_spec(spec: KernelSpec) -> list[LintIssue]:
    """Issues in the .metal file's own header and body (included files: `lint_includes`)."""
    return sorted(lint_source(spec.own_header, "header", spec.header_line)
                  + lint_source(spec.source, "source", spec.source_line)
                  + recursion_issues(spec.own_header, spec.header_line), key=lambda i: i.line)


def lint_includes(spec: KernelSpec) -> list[tuple[str, LintIssue]]:
    """(path, issue) in the shared .h files the kernel includes, and recursion across all its header code."""
    found = [(p, i) for p, t in spec.includes for i in lint_source(t, "header") + recursion_issues(t)]
    if spec.includes and not found:
        found = [(f"{spec.path} with its includes", i) for i in recursion_issues(spec.header)]
    return found


def check_spec(spec: KernelSpec) -> None:
    """Raise KernelLintError listing every issue (path:line: [rule] message)."""
    issues = [(spec.path, i) for i in lint_spec(spec)] + lint_includes(spec)
    if issues:
        raise KernelLintError(f"kernel {spec.name!r} is not valid Metal:\n"
                              + "\n".join(f"{p}:{i.line}: [{i.rule}] {i.message}" for p, i in issues))
