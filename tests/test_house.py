"""The package's shape: no import circles (counting imports inside functions), recipe functions that read top to
bottom (<= 80 lines), and no lab notebook in the code (no numbered rounds of work or dates in comments or help)."""

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "distillability"


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every distillability module `path` imports, anywhere in the file."""
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("distillability")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("distillability"):
                continue
            for a in node.names:  # `from . import calibrate` imports the submodule
                sub = f"{target}.{a.name}"
                out.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists() else target)
    return out - {me}


def test_no_module_imports_one_that_imports_it_back():
    graph = {_module(p): _imports(p) for p in PKG.rglob("*.py")}
    circles = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, ())})
    assert not circles, circles


def test_recipe_functions_are_short():
    long = []
    for path in (PKG / "recipes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.name}:{node.name} {n} lines")
    assert not long, long


NARRATION = re.compile(r"\bsession\s+\d|\bround\s+\d|\b20\d\d-\d\d-\d\d\b|\bsessions\s+\d", re.IGNORECASE)


def test_no_lab_notebook_in_the_code():
    found = [f"{p.relative_to(PKG)}:{i}: {line.strip()[:80]}" for p in PKG.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if NARRATION.search(line)]
    assert not found, found
