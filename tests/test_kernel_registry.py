"""The .metal file convention, kernel lookup, and the dispatch rule."""

import mlx.core as mx
import pytest

from mlx_dsv4.kernels import registry
from mlx_dsv4.kernels.registry import KernelSpecError, available_kernels, kernel_dir, load_spec, parse_spec

GOOD = """// A test kernel.
//
// @kernel      demo
// @inputs      x: float[N]; n: int32[]
// @outputs     y: float[N]
// @template    T: type; K: int; FLAG: bool
// @row_contiguous false
// @grid        (N, 1, 1)
// @long-note   first line
//              continued here
//
// @header
inline float twice(float v) { return 2.0f * v; }

// @source
uint i = thread_position_in_grid.x;
y[i] = twice(x[i]);
"""


def test_parse_all_fields():
    s = parse_spec(GOOD, "demo.metal", "demo")
    assert (s.name, s.inputs, s.outputs) == ("demo", ("x", "n"), ("y",))
    assert s.template == (("T", "type"), ("K", "int"), ("FLAG", "bool"))
    assert not s.ensure_row_contiguous and not s.atomic_outputs
    assert s.header == "inline float twice(float v) { return 2.0f * v; }\n"
    assert s.source == "uint i = thread_position_in_grid.x;\ny[i] = twice(x[i]);\n"
    assert (s.header_line, s.source_line) == (13, 16)
    assert s.doc == {"grid": "(N, 1, 1)", "long-note": "first line continued here"}
    # template values come back in declared order, checked by kind
    assert s.template_args({"FLAG": True, "K": 3, "T": mx.float16}) == [("T", mx.float16), ("K", 3), ("FLAG", True)]
    for bad in ({"T": mx.float16, "K": True, "FLAG": True}, {"T": 3, "K": 3, "FLAG": True}, {"T": mx.float16}):
        with pytest.raises(ValueError, match="demo"):
            s.template_args(bad)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace("// @kernel      demo\n", ""), "missing @kernel"),
    (lambda t: t.replace("// @source\n", ""), "no '// @source' marker"),
    (lambda t: t.replace("@kernel      demo", "@kernel      other"), "equal to the file name"),
    (lambda t: t.replace("K: int", "K: float"), "@template entry 'K: float'"),
    (lambda t: t.replace("y: float[N]", "x: float[N]"), "names used twice: \\['x'\\]"),
    (lambda t: t.replace("@row_contiguous false", "@row_contiguous maybe"), "must be true or false"),
    (lambda t: t.replace("// @header\n", "// @header\n// @kernel x\n// @header\n"), "appears twice"),
    (lambda t: t.replace("\n// @header", "\nfloat stray;\n// @header"), "code before the '// @source' marker"),
    (lambda t: t.replace("@inputs      x: float[N]; n: int32[]", "@inputs      2x: float"), "not an identifier"),
])
def test_malformed_files_name_the_problem(edit, message):
    with pytest.raises(KernelSpecError, match=message):
        parse_spec(edit(GOOD), "demo.metal", "demo")


def test_shipped_kernels_load_from_the_checkout():
    assert kernel_dir().name == "metal_kernels"
    assert {"sinkhorn_split", "indexer_score"} <= set(available_kernels())
    assert load_spec("sinkhorn_split").template == (("ITERS", "int"),)
    with pytest.raises(KernelSpecError, match="no kernel 'nope'"):
        load_spec("nope")


@pytest.mark.parametrize("metal,env,expected", [(True, None, True), (True, "1", False), (True, "0", True),
                                                (False, None, False), (False, "0", False)])
def test_use_kernels_rule(monkeypatch, metal, env, expected):
    monkeypatch.setattr(registry, "metal_available", lambda: metal)
    if env is None:
        monkeypatch.delenv(registry.REFERENCE_ENV, raising=False)
    else:
        monkeypatch.setenv(registry.REFERENCE_ENV, env)
    assert registry.use_kernels() is expected


@pytest.mark.skipif(mx.metal.is_available(), reason="checks the non-Metal path")
def test_kernel_objects_need_metal():
    with pytest.raises(RuntimeError, match="Metal is not available"):
        registry.get_kernel("sinkhorn_split")


def test_include_prepends_shared_code_and_is_checked(tmp_path):
    """@include a: a.h from the file's folder leads the header MLX compiles; the lint and the harness's
    #line markers still point into the file each line came from."""
    from mlx_dsv4.kernels.lint import KernelLintError, check_spec
    from mlx_dsv4.kernels.sim.source import ArgInfo, mlx_source

    (tmp_path / "shared.h").write_text("inline float thrice(float v) { return 3.0f * v; }\n")
    text = GOOD.replace("// @grid", "// @include     shared\n// @grid")
    spec = parse_spec(text, str(tmp_path / "demo.metal"), "demo")
    assert spec.header.startswith("inline float thrice") and spec.own_header.startswith("inline float twice")
    assert "include" not in spec.doc
    args = [ArgInfo("float", 16, 1), ArgInfo("int32_t", 1, 0)]
    tmpl = [("T", mx.float32), ("K", 1), ("FLAG", True)]
    plain = mlx_source(spec, args, ["float"], tmpl)[1]
    assert plain.startswith(spec.header)  # what MLX gets: the shared code, then the file's own header
    marked = mlx_source(spec, args, ["float"], tmpl, _lines=spec.path)[1]
    assert marked.startswith(f'#line 1 "{tmp_path / "shared.h"}"\ninline float thrice')
    assert f'#line {spec.header_line} "{spec.path}"\ninline float twice' in marked
    check_spec(spec)
    (tmp_path / "shared.h").write_text("inline double thrice(double v) { return 3.0 * v; }\n")
    with pytest.raises(KernelLintError, match=r"shared\.h:1: \[double\]"):
        check_spec(parse_spec(text, str(tmp_path / "demo.metal"), "demo"))
    with pytest.raises(KernelSpecError, match="@include 'missing'"):
        parse_spec(GOOD.replace("// @grid", "// @include missing\n// @grid"), str(tmp_path / "demo.metal"), "demo")


def test_launch_checks_every_template_though_it_caches_the_check(monkeypatch):
    """launch() remembers validated templates; one that differs only by type (1 for True) is still refused."""
    seen = []
    monkeypatch.setattr(registry, "get_kernel", lambda name: lambda **kw: seen.append(kw["template"]) or [])
    spec = load_spec("hc_pre")
    ok = {n: (mx.float32 if k == "type" else True if k == "bool" else 4) for n, k in spec.template}
    args = dict(inputs=[mx.zeros(1)] * len(spec.inputs), grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[],
                output_dtypes=[])
    for _ in range(2):
        registry.launch("hc_pre", template=ok, **args)
    assert seen[0] == seen[1] == [(n, ok[n]) for n, _ in spec.template]
    bad = {n: 1 if k == "bool" else ok[n] for n, k in spec.template}
    with pytest.raises(ValueError, match="must be bool"):
        registry.launch("hc_pre", template=bad, **args)


def _small_float_inputs(monkeypatch, steps: int = 2) -> list[list[tuple[str, int, mx.array]]]:
    """Per decode step of the tiny model with the kernel paths taken (stand-ins, as on Metal): every
    float input of at most 2 elements handed to a launch (eps, scales, routing constants), as
    (kernel, input index, array)."""
    from mlx_dsv4 import load

    model, _ = load("tiny-random")
    cache = model.make_cache()
    mx.eval(model(mx.array([[3, 4, 5]]), cache))
    seen = []

    def stand_in(name):
        def run(*, inputs, output_shapes, output_dtypes, **_):
            seen[-1] += [(name, i, a) for i, a in enumerate(inputs)
                         if a.size <= 2 and mx.issubdtype(a.dtype, mx.floating)]
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return run

    monkeypatch.delenv(registry.REFERENCE_ENV, raising=False)
    monkeypatch.setattr(registry, "metal_available", lambda: True)
    monkeypatch.setattr(registry, "get_kernel", stand_in)
    for _ in range(steps):
        seen.append([])
        mx.eval(model(mx.array([[6]]), cache))
    return seen


def test_a_decode_step_allocates_no_constant_inputs(monkeypatch):
    """The eps / scale / routing constants of a decode step (~530 in 460 launches on the Flash schedule) are built once
    (registry.constant), not per launch: over two decode steps, each kernel input of one value is one
    array. Negative control: fresh arrays per launch are caught."""
    def arrays_per_value(steps):
        by_value = {}
        for k, i, a in (x for step in steps for x in step):
            by_value.setdefault((k, i, str(a.dtype), tuple(a.reshape(-1).tolist())), set()).add(id(a))
        return by_value

    seen = _small_float_inputs(monkeypatch)
    assert {k for k, _, _ in seen[0]} >= {"rows_finish", "hc_pre", "moe_router", "sparse_attention_decode"}
    groups = arrays_per_value(seen)
    assert all(len(ids) == 1 for ids in groups.values()), {k: len(v) for k, v in groups.items()}
    monkeypatch.setattr(registry, "constant", lambda v, d: mx.array(v, d))
    assert any(len(ids) > 1 for ids in arrays_per_value(_small_float_inputs(monkeypatch)).values())


def test_constant_is_the_value_once_per_dtype():
    a = registry.constant(1e-6, mx.float32)
    assert a is registry.constant(1e-6, mx.float32) and a.dtype == mx.float32 and a.item() == pytest.approx(1e-6)
    assert registry.constant((0.5, 2.0), mx.float32).tolist() == [0.5, 2.0]
    assert registry.constant(3, mx.int32).dtype == mx.int32 and registry.constant(3, mx.int32).item() == 3


def test_fixed_inputs_can_be_made_while_building_for_the_evaluator_thread():
    """A pipelined CPU decode builds its step under the evaluator worker's stream (evaluator.py), which only that
    worker may evaluate: placeholders and constants made then must need no evaluation (they come from host memory)
    and serve both threads. Negative control: a placeholder filled by a graph (mx.zeros) cannot be made there."""
    from mlx_dsv4 import evaluator

    ev = evaluator.Evaluator()
    ev.adopt()  # the global random key, which every submission hands over, made usable by the worker
    with mx.stream(ev.stream):
        p = registry.placeholder((8, 5), mx.bfloat16)
        c = registry.constant(0.25, mx.float32)
        y = (p.astype(mx.float32) + c).sum()
        ev.submit(y)
    ev.wait()
    assert p.dtype == mx.bfloat16 and p.shape == (8, 5) and not p.any().item() and y.item() == 10.0
    with mx.stream(ev.stream), pytest.raises(RuntimeError, match="no Stream"):
        mx.eval(mx.zeros((8, 5), mx.bfloat16))
