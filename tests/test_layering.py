"""Every import points down DESIGN.md's Layout: a module never imports one on a higher floor.

The modules of mpcompile/ are read with ``ast`` (the package is never imported here), and
every import is collected: at module level and inside functions, relative ones resolved,
those under ``if TYPE_CHECKING:`` left out (they never run). The tests fail on

- an import of a module on a higher floor (same-floor imports are allowed where they form no
  cycle), or of a module the floor table does not know;
- an import cycle among module-level imports;
- ``from X import _name``: another module's private name;
- ``import mpcompile`` loading the runtime, torchvision or triton (the package is lazy).

Plug-ins that register themselves from a higher floor (``mpcompile.codegen``) are loaded by
name, with importlib, by ``mpcompile.backends.load_plugins``: an ordinary import there would
point up.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# The floor of each top-level module or package of mpcompile/ (DESIGN.md, Layout), lowest first.
FLOORS = {
    "errors": 1, "random_bits": 1, "backends": 1,  # backends: which implementation runs an op
    "profiling": 1,  # the named sections of an op's work, for torch.profiler
    "formats": 2,
    "rounding": 3,
    "ops": 4,
    "codegen": 5, "policy": 5,
    "capture": 6, "passes": 6,
    "compiler": 7, "views": 7,  # views beside the compiler, whose table()/explain() call it
    "runtime": 8, "models": 8,  # models: the small models the runtime trains by name
    "sweep": 9, "report": 9,
    "cli": 10, "__main__": 10,  # __main__: python -m mpcompile, torchrun -m mpcompile
    "__init__": 11,  # mpcompile/__init__.py: the public API, above everything
}

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mpcompile"


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    target: str  # the imported mpcompile module, dotted
    names: tuple[str, ...]  # the names of ``from target import ...``
    path: str  # the importing file, relative to the repository
    line: int
    top_level: bool  # runs when the module is imported (not inside a function)

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def floor_key(module: str) -> str:
    """The key of ``module`` in FLOORS: its top-level name under mpcompile (``__init__`` for the package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(source: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in ``source``."""
    if level == 0:
        return module or ""
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _collect(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = str(path.relative_to(ROOT))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def add(target: str, names: tuple[str, ...], line: int, top_level: bool) -> None:
        if target == "mpcompile" or target.startswith("mpcompile."):
            found.append(Import(module, target, names, rel, line, top_level))

    def visit(nodes: list[ast.stmt], top_level: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse, top_level)  # the body never runs
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, (), node.lineno, top_level)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module)
                names = []
                for alias in node.names:  # ``from pkg import sub`` imports the submodule pkg.sub
                    sub = f"{base}.{alias.name}"
                    if sub in MODULES:
                        add(sub, (), node.lineno, top_level)
                    else:
                        names.append(alias.name)
                if names:
                    add(base, tuple(names), node.lineno, top_level)
            inner_top = top_level and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    visit([c for c in children if isinstance(c, (ast.stmt, ast.ExceptHandler))], inner_top)
            for case in getattr(node, "cases", []):  # match statements
                visit(case.body, inner_top)

    visit(tree.body, True)
    return found


IMPORTS = [imp for module, path in MODULES.items() for imp in _collect(module, path)]


def test_every_module_has_a_floor():
    missing = sorted({f"{MODULES[m].relative_to(ROOT)} ({floor_key(m)!r})" for m in MODULES if floor_key(m) not in FLOORS})
    assert not missing, ("modules without a floor: add each to FLOORS in tests/test_layering.py, at its place in "
                         "DESIGN.md's Layout:\n  " + "\n  ".join(missing))


def test_imports_point_down():
    bad = []
    for imp in IMPORTS:
        src, dst = FLOORS.get(floor_key(imp.source)), FLOORS.get(floor_key(imp.target))
        if imp.target not in MODULES:
            bad.append(f"{imp.where()}: {imp.source} imports {imp.target}, which is not a module of mpcompile/")
        elif src is not None and dst is not None and dst > src:
            bad.append(f"{imp.where()}: {imp.source} (floor {src}) imports {imp.target} (floor {dst})")
    assert not bad, "imports that point up DESIGN.md's Layout:\n  " + "\n  ".join(bad)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycles():
    edges: dict[str, set[str]] = {}
    lines: dict[tuple[str, str], str] = {}
    for imp in IMPORTS:
        if imp.top_level and imp.target != imp.source and imp.target in MODULES:
            edges.setdefault(imp.source, set()).add(imp.target)
            lines.setdefault((imp.source, imp.target), imp.where())
    report = []
    for component in _cycles(edges):
        members = set(component)
        inside = [f"{lines[(a, b)]}: {a} imports {b}" for a in component for b in sorted(edges.get(a, ()))
                  if b in members]
        report.append(" <-> ".join(component) + "\n    " + "\n    ".join(inside))
    assert not report, "import cycles (module-level imports):\n  " + "\n  ".join(report)


def test_no_private_names_imported():
    bad = [f"{imp.where()}: {imp.source} imports {name} from {imp.target}"
           for imp in IMPORTS if imp.target != imp.source
           for name in imp.names if name.startswith("_") and not name.startswith("__")]
    assert not bad, ("private names imported from another module: make each public in the module that owns "
                     "it, or move it:\n  " + "\n  ".join(bad))


def test_import_is_lazy():
    heavy = ["mpcompile.runtime", "torchvision", "triton"]
    code = f"import mpcompile, sys; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [], f"`import mpcompile` loads {run.stdout.strip()}: they must load on first use"


def test_floor_table_reads_the_tree():
    """The checks above see real imports (a parser that found none would pass them all)."""
    assert ("mpcompile.rounding", "mpcompile.formats") in {(i.source, i.target) for i in IMPORTS}
    assert any(not i.top_level for i in IMPORTS), "no import inside a function was found"
