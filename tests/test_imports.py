"""The package's layout, read from its source: no import cycle, the package's own imports at the
top of each file, and no ModelOpt anywhere the exporter imports."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lean"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at top level?) for every import in a file; ``from a import b`` counts
    as ``a.b`` when that is a module of ours."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub if sub in MODULES else node.module, id(node) in top))
    return out


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def graph() -> dict[str, set[str]]:
    return {m: {i for i, _ in imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def closure(roots, g) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += g.get(m, ())
    return seen


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m, stack):
        state[m] = 1
        for n in sorted(g[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


def test_own_imports_are_at_the_top_of_each_file():
    late = [f"{m}: {i}" for m, p in MODULES.items() for i, top in imports(p) if i.startswith("lean") and not top]
    assert not late, late


def test_the_exporter_never_imports_modelopt():
    g = graph()
    roots = [i for i, _ in imports(ROOT / "export_camera.py") if i in MODULES]
    reach = closure(roots, g)
    assert "lean.export" in reach and "lean.quant.modelopt" not in reach
    users = [m for m in reach for i, _ in imports(MODULES[m]) if i.split(".")[0] == "modelopt"]
    assert not users, users


def test_export_does_not_import_modelopt_at_run_time(small_ptq_ckpt, example_dir, tmp_path):
    """The export builds its INT8 model from the checkpoint's amax alone."""
    code = (
        "import sys\nfrom pathlib import Path\nfrom lean.export import ExportOptions, export_camera\n"
        f"export_camera(ExportOptions(ckpt=Path({str(small_ptq_ckpt)!r}), out_dir=Path({str(tmp_path)!r}), "
        f"data=Path({str(example_dir)!r}), check_bev=False, device='cpu'))\n"
        "print(sorted(m for m in sys.modules if m.startswith('modelopt')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:].replace(chr(10), ' | ')
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "camera.backbone.onnx").exists()


def test_the_lint_needs_no_torch():
    """``python -m lean.lint`` judges ONNX files where PyTorch is not even installed."""
    code = "import sys, lean.lint.__main__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_the_engine_check_needs_no_torch():
    """``python -m lean.check_engine`` runs on a Jetson image with numpy and Polygraphy alone."""
    code = "import sys, lean.check_engine, lean.engine_check; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
