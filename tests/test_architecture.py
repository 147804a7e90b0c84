"""The package's import graph: one direction, no cycles, nothing imports training."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ride_duration"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (at the top or inside functions)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph):
    seen, stack, found = set(), [], []

    def visit(node, on_path):
        if node in on_path:
            found.append(stack[stack.index(node) :] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt, on_path | {node})
        stack.pop()

    for node in sorted(graph):
        visit(node, frozenset())
    return found


def test_no_import_cycles():
    graph = import_graph()
    # A package's __init__ re-exporting its modules is not a cycle of behaviour.
    pruned = {m: {t for t in ts if not (m.startswith(t + "."))} for m, ts in graph.items()}
    assert _cycles(pruned) == []


def test_nothing_imports_training():
    graph = import_graph()
    assert [m for m, targets in graph.items() if "ride_duration.train" in targets] == []


# ---------------------------------------------------------------- what ships, and lazy imports
REPO = PACKAGE.parent
WORKBENCH = ("workbench", "benchmarks")
LAZY_NOTE = "# Imported inside functions, to keep them lazy:"


def _imports(path: Path):
    """(node, inside a function?) for every import statement of a module."""
    tree = ast.parse(path.read_text())
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inside |= {id(sub) for sub in ast.walk(node) if isinstance(sub, ast.Import | ast.ImportFrom)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, id(node) in inside


def _top_names(node) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        return ["." if node.level else (node.module or "").split(".")[0]]
    return [alias.name.split(".")[0] for alias in node.names]


def test_the_shipped_package_never_imports_the_workbench_or_the_benchmarks():
    found = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in PACKAGE.rglob("*.py")
        for node, _ in _imports(path)
        if set(_top_names(node)) & set(WORKBENCH)
    ]
    assert found == []


def test_function_level_imports_are_declared_lazy_dependencies():
    """The package's own modules are imported at the top; an import inside a function is a heavy
    optional dependency kept lazy, named in the module's `# Imported inside functions` comment
    (ride_duration/batch/cli.py keeps Prefect out of a failing CLI: its own flows are lazy too)."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        note = text.partition(LAZY_NOTE)[2].split("\n\n", 1)[0] if LAZY_NOTE in text else ""
        for node, inside in _imports(path):
            if not inside:
                continue
            for name in _top_names(node):
                if name == "." and path.name == "cli.py" and path.parent.name == "batch":
                    continue
                if name == "." or name == "ride_duration":
                    problems.append(f"{path.relative_to(REPO)}:{node.lineno} imports the package inside a function")
                elif name not in note:
                    problems.append(f"{path.relative_to(REPO)}:{node.lineno} {name} is imported lazily, undeclared")
    assert problems == []


def test_docker_contexts_leave_out_the_workbench():
    """Neither image's build context holds the stand-ins, the benchmarks or the course scripts."""
    for dockerfile in sorted((REPO / "docker").glob("*/Dockerfile")):
        ignored = Path(f"{dockerfile}.dockerignore").read_text().split()
        assert {*WORKBENCH, "scripts", "infra", "tests", "notebooks"} <= set(ignored), dockerfile
        copied = [line.split()[1:-1] for line in dockerfile.read_text().splitlines() if line.startswith("COPY ")]
        assert not [c for c in copied if any(part.startswith(WORKBENCH) for part in c)], dockerfile
