"""Structure rules, read from the source (ast, file names): kernels/ sits below the model (it reads only the
number formats, norms, RoPE and config, never the cache's stores or the CPU simulator on the dispatch
path); nothing relies on mlx-lm's private names (an unpinned mlx-lm may drop them in any release); each
Metal kernel, its wrapper module and its test share one name."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mlx_dsv4"
BELOW_KERNELS = {"formats", "norm", "rope", "config", "metal_kernels"}  # leaf modules, and the .metal sources


def imports(source: str, module: str) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every import in `source`, at any depth (function-level too);
    `module` is the dotted name of the file (a package's: its __init__.py), to resolve relative imports."""
    out = []
    package = module.split(".")
    if not (PKG.parent / Path(*package) / "__init__.py").is_file():
        package = package[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.append((name, [a.name for a in node.names]))
    return out


def kernel_violations(source: str, module: str) -> list[str]:
    bad = []
    for name, names in imports(source, module):
        targets = [name] + [f"{name}.{n}" for n in names]
        if not any(t.startswith("mlx_dsv4.") for t in targets):
            continue
        if name == "mlx_dsv4":  # `from .. import x`
            bad += [f"mlx_dsv4.{n}" for n in names if n not in BELOW_KERNELS]
        elif name.startswith("mlx_dsv4.kernels.sim"):
            bad.append(name)
        elif name == "mlx_dsv4.kernels":  # `from . import sim`
            bad += [f"{name}.{n}" for n in names if n == "sim"]
        elif name.startswith("mlx_dsv4.kernels."):
            continue
        elif name.split(".")[1] not in BELOW_KERNELS:
            bad.append(name)
    return bad


def private_mlx_lm(source: str, module: str) -> list[str]:
    return [f"{name}.{n}" for name, names in imports(source, module) if name.startswith("mlx_lm")
            for n in names if n.startswith("_")] + \
           [name for name, _ in imports(source, module) if name.startswith("mlx_lm") and "._" in name]


def _modules(root: Path):
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
        yield path, ".".join(parts)


def test_kernels_sit_below_the_model():
    found = {mod: v for path, mod in _modules(PKG / "kernels") if "sim" not in mod.split(".")
             if (v := kernel_violations(path.read_text(), mod))}
    assert not found, found


def test_no_private_mlx_lm_names():
    found = {mod: v for path, mod in _modules(PKG) if (v := private_mlx_lm(path.read_text(), mod))}
    assert not found, found


def test_the_rules_catch_what_they_forbid():
    """Negative controls: the imports this test exists to keep out are flagged, at any depth."""
    src = ("from ..kvstore import Rows\nfrom .. import qat, norm\nfrom .registry import launch\n"
           "def f():\n    from .sim.source import TG_DECL\n    from ..formats import pack_fp4\n")
    assert kernel_violations(src, "mlx_dsv4.kernels.sparse_attention") == [
        "mlx_dsv4.kvstore", "mlx_dsv4.qat", "mlx_dsv4.kernels.sim.source"]
    src = "from mlx_lm.models.cache import _BaseCache, KVCache\nimport mlx_lm.models._x\nfrom mlx_lm import load\n"
    assert private_mlx_lm(src, "mlx_dsv4.cache") == ["mlx_lm.models.cache._BaseCache", "mlx_lm.models._x"]


def unnamed(kernels: list[str], wrappers: set[str], tests: set[str]) -> list[str]:
    """Kernels without a wrapper module of their name (or of their family's stem: hc_pre -> hc) and a test
    tests/test_kernel_<that name>.py."""
    bad = []
    for k in kernels:
        stem = next((w for w in sorted(wrappers, key=len, reverse=True) if k == w or k.startswith(w + "_")), None)
        if stem is None or f"test_kernel_{stem}" not in tests:
            bad.append(k)
    return bad


def test_kernel_wrapper_and_test_share_a_name():
    root = PKG.parent
    kernels = sorted(p.stem for p in (root / "metal_kernels").glob("*.metal"))
    wrappers = {p.stem for p in (PKG / "kernels").glob("*.py")} - {"__init__"}
    tests = {p.stem for p in (root / "tests").glob("test_kernel_*.py")}
    assert len(kernels) >= 14 and not unnamed(kernels, wrappers, tests)
    # negative controls: a kernel whose wrapper or test goes by another name is reported
    assert unnamed(["sparse_attention_decode"], wrappers - {"sparse_attention"} | {"attention"}, tests)
    assert unnamed(["moe_router"], wrappers, tests - {"test_kernel_moe_router"} | {"test_kernel_router"})


def test_every_reference_line_names_a_function():
    """The `@reference` field of each .metal file names the pure-MLX twin by its dotted path: it must resolve
    (a rename that forgets it would leave a kernel pointing nowhere)."""
    import importlib

    from mlx_dsv4.kernels.registry import available_kernels, load_spec

    for name in available_kernels():
        path = load_spec(name).doc["reference"].split()[0]
        module, _, fn = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), fn, None)), f"{name}: @reference {path}"
