"""The Metal lint: each construct Metal rejects is caught in a minimal snippet; valid code passes."""

import pytest
from kernel_util import spec

from mlx_dsv4.kernels.lint import KernelLintError, check_spec, lint_source, lint_spec, recursion_issues
from mlx_dsv4.kernels.registry import available_kernels, load_spec

BAD = [  # (rule, snippet, section)
    ("double", "double acc = 0;", "source"),
    ("double", "inline float f(double x) { return x; }", "header"),
    ("alloc", "float* p = (float*)malloc(16);", "source"),
    ("alloc", "float* p = new float[4];", "source"),
    ("alloc", "delete p;", "source"),
    ("std", "float m = std::max(a, b);", "source"),
    ("include", "#include <vector>", "header"),
    ("include", '#include "cmath"', "header"),
    ("io", 'printf("%f", x);', "source"),
    ("goto", "goto done;", "source"),
    ("function-pointer", "float (*op)(float) = f;", "source"),
    ("function-pointer", "typedef float (*unary)(float);", "header"),
    ("exceptions", "try { x = 1; } catch (...) { x = 0; }", "source"),
    ("rtti", "struct S { virtual float f(); };", "header"),
    ("variadic", "inline float f(int n, ...) { return n; }", "header"),
    ("storage", "static float cache[4];", "source"),
    ("storage", "thread_local int k = 0;", "source"),
    ("asm", 'asm("nop");', "source"),
    ("cuda", "__syncthreads();", "source"),
    ("threadgroup", "threadgroup float a[4], b[4];", "source"),
    ("threadgroup", "inline void f() { threadgroup float t[4]; }", "header"),
    ("threadgroup", "if (lane == 0) {\n  threadgroup float t[4];\n}", "source"),
]


@pytest.mark.parametrize("rule,snippet,section", BAD, ids=[f"{r}:{s[:24]}" for r, s, _ in BAD])
def test_rejects(rule, snippet, section):
    issues = lint_source(snippet, section)
    assert rule in {i.rule for i in issues}, issues


def test_recursion_direct_and_mutual():
    direct = "inline int f(int n) { return n <= 1 ? 1 : n * f(n - 1); }"
    mutual = ("inline int even(int n);\ninline int odd(int n) { return n == 0 ? 0 : even(n - 1); }\n"
              "inline int even(int n) { return n == 0 ? 1 : odd(n - 1); }")
    assert [i.rule for i in recursion_issues(direct)] == ["recursion"]
    issues = recursion_issues(mutual)
    assert len(issues) == 1 and "even -> odd -> even" in issues[0].message
    # calls to other helpers, and a helper named like a prefix of another, are not recursion
    fine = "inline float g(float x) { return x; }\ninline float gg(float x) { return g(x) + g(x); }"
    assert recursion_issues(fine) == []


def test_valid_code_passes():
    ok = """
    // double, new, std::vector in a comment; "printf" and 'goto' in strings are fine
    const char* s = "double goto std::x";
    float doubled = static_cast<float>(x) * 2.0f;  // identifiers that only contain a banned word
    int newline = 1, deleted = 0;
    static_assert(sizeof(float) == 4, "float");
    threadgroup float tile[64];
    threadgroup float* p = tile;
    const threadgroup float* q = tile;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float y = metal::max(metal::exp(doubled), 0.0f);
    """
    assert lint_source(ok, "source") == []
    assert lint_source("#include <metal_stdlib>\ninline float f(threadgroup float* t) { return t[0]; }", "header") == []


def test_issues_carry_file_lines_and_check_spec_raises():
    s = spec("float a = x[0];\ndouble b = a;\ny[0] = b;", "x: float", "y: float", name="lined")
    issues = lint_spec(s)
    assert [(i.rule, i.line) for i in issues] == [("double", s.source_line + 1)]
    with pytest.raises(KernelLintError, match=r"<test:lined>:7: \[double\]"):
        check_spec(s)


def test_shipped_kernels_are_clean():
    names = available_kernels()
    assert {"sinkhorn_split", "indexer_score"} <= set(names)
    for name in names:
        check_spec(load_spec(name))
