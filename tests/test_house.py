"""The house's limits, as the project keeps them: a README a newcomer reads in one sitting, train.py short enough
to read top to bottom, no function over 50 lines, and no import circle among the project's modules (imports
inside functions count)."""
import ast

from conftest import ROOT

MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def project_imports(path) -> set[str]:
    """The project's modules `path` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        found |= {n.split(".")[0] for n in names} & set(MODULES)
    return found - {path.stem}


def test_the_house_stays_small():
    assert len((ROOT / "README.md").read_text().split()) <= 4000
    assert len((ROOT / "train.py").read_text().splitlines()) <= 400
    long = [f"{p.name}:{f.name} ({f.end_lineno - f.lineno + 1} lines)" for p in MODULES.values()
            for f in ast.walk(ast.parse(p.read_text()))
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) and f.end_lineno - f.lineno + 1 > 50]
    assert long == []


def test_no_module_imports_itself_through_others():
    graph = {m: project_imports(p) for m, p in MODULES.items()}

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(n == goal or (n not in seen and not seen.add(n) and reaches(n, goal, seen)) for n in graph[start])
    assert [m for m in graph if reaches(m, m, set())] == []
