"""The package boundaries, checked on the source: what the runtime side may import.

`convgen.runtime` (and the GPU side of tuning, `convgen.tuning.measure`) runs on
deployment and GPU machines that have tvm-ffi but not the TVM compiler, so
nothing it imports, at module level or inside a function, may be `tvm`, the
compile stages (`convgen.compiler`) or the tuning code. The operator-level
modules it uses (spec, reference, onnx_export, errors) are held to the same rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "convgen"
RUNTIME_SIDE = [
    *sorted((PACKAGE / "runtime").glob("*.py")),
    PACKAGE / "tuning" / "measure.py",
    PACKAGE / "spec.py",
    PACKAGE / "reference.py",
    PACKAGE / "onnx_export.py",
    PACKAGE / "errors.py",
    PACKAGE / "__init__.py",
]
FORBIDDEN = ("tvm", "convgen.compiler", "convgen.tuning")
ALLOWED = ("convgen.tuning.measure",)  # the GPU side of tuning is runtime-side itself


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import statement in the file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def forbidden(module: str) -> bool:
    if module in ALLOWED:
        return False
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


@pytest.mark.parametrize("path", RUNTIME_SIDE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_runtime_side_imports_no_compiler(path):
    bad = [f"{path.name}:{line}: {mod}" for line, mod in imported_modules(path) if forbidden(mod)]
    assert not bad, "the runtime side imports the compiler or tuning code:\n" + "\n".join(bad)


def test_the_check_sees_nested_and_from_imports(tmp_path):
    """The rule must catch what a careless change would add: a lazy import inside a
    function, `from tvm import ...`, `import convgen.compiler.build`."""
    src = tmp_path / "leaky.py"
    src.write_text("def f():\n    from tvm import te\n    import convgen.compiler.build\n"
                   "from convgen import tuning\nimport tvm_ffi\n")
    mods = sorted(m for _, m in imported_modules(src) if forbidden(m))
    assert mods == ["convgen.compiler.build", "convgen.tuning", "tvm", "tvm.te"]


def test_compiler_and_tuning_never_import_the_cli():
    for path in [*PACKAGE.joinpath("compiler").rglob("*.py"),
                 *PACKAGE.joinpath("tuning").rglob("*.py"),
                 *PACKAGE.joinpath("runtime").rglob("*.py")]:
        assert not any(m.startswith("convgen.cli") for _, m in imported_modules(path)), path
