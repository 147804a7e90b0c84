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


# ---------------------------------------------------------------- public APIs of the libraries only
# Every tracked Python file and notebook code cell uses the libraries it stands on through their
# public, documented API: no private module, no `_name` of a library object, no `_`-keyword, no
# assignment to a library module's attribute (a monkeypatch), no subclass of a library's worker or
# engine. A library release may move any of these without notice; a learner can look up none of them.
OURS = {"ride_duration", "workbench", "benchmarks", "scripts", "tests", "lambda_function", "helpers", "conftest"}
# The only library classes that may be subclassed: exceptions, which libraries define to be extended. Any
# other (a worker, an engine, a handler subclassed "only to configure it") overrides what the next release moves.
SUBCLASSABLE = ("Error", "Exception", "Warning")
# Documented public API despite the underscore: namedtuple's methods (the underscore avoids field clashes).
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}


def _tracked(*patterns: str) -> list[Path]:
    import subprocess

    out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / line for line in out.stdout.splitlines() if (REPO / line).exists()]


def _sources() -> list[tuple[str, ast.AST]]:
    """(where, syntax tree) for each tracked .py file and each notebook code cell."""
    import json
    import sys

    flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    found = []
    for path in _tracked("*.py"):
        found.append((str(path.relative_to(REPO)), compile(path.read_text(), str(path), "exec", flags)))
    for path in _tracked("*.ipynb"):
        for number, cell in enumerate(json.loads(path.read_text())["cells"]):
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            if source.lstrip().startswith("%%"):
                continue  # a cell magic: the cell is not Python
            # IPython line magics and shell escapes (with their continuation lines) are not Python.
            lines, escaped = [], False
            for line in source.splitlines():
                escaped = escaped or line.lstrip().startswith(("%", "!"))
                lines.append("" if escaped else line)
                escaped = escaped and line.rstrip().endswith("\\")
            where = f"{path.relative_to(REPO)} cell {number}"
            found.append((where, compile("\n".join(lines), where, "exec", flags)))
    assert found, sys.argv
    return found


def _is_library(module: str) -> bool:
    import sys

    top = module.split(".")[0]
    return bool(top) and top not in OURS and top not in sys.stdlib_module_names


def _is_module(name: str) -> bool:
    """`from package import name` brought a module (not a function or class)?"""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_private_names(trees) -> set[str]:
    """Every `_name` this repository defines itself (functions, classes, attributes, arguments)."""
    names = set()
    for _, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return {name for name in names if _private(name)}


def _root_name(node: ast.AST) -> str | None:
    """The name an attribute chain starts at (`pq` of `pq.ParquetWriter.write`), or None (a call, a literal)."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def library_api_findings(trees=None) -> list[str]:
    trees = _sources() if trees is None else trees
    ours = _defined_private_names(trees)
    findings = []
    for where, tree in trees:
        modules, library_names = set(), {}  # local name -> the library module it came from
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _is_library(alias.name):
                        if any(_private(part) for part in alias.name.split(".")):
                            findings.append(f"{where}:{node.lineno} imports private module {alias.name}")
                        local = alias.asname or alias.name.split(".")[0]
                        modules.add(local)
                        library_names[local] = alias.name
            elif isinstance(node, ast.ImportFrom) and not node.level and _is_library(node.module or ""):
                if any(_private(part) for part in node.module.split(".")):
                    findings.append(f"{where}:{node.lineno} imports from private module {node.module}")
                for alias in node.names:
                    if _private(alias.name):
                        findings.append(f"{where}:{node.lineno} imports private name {node.module}.{alias.name}")
                    library_names[alias.asname or alias.name] = node.module
                    if _is_module(f"{node.module}.{alias.name}"):
                        modules.add(alias.asname or alias.name)
        for node in ast.walk(tree):
            private_read = isinstance(node, ast.Attribute) and _private(node.attr)
            # A `_name` this repository defines is ours, unless it is read straight off a library import.
            if (
                private_read
                and node.attr not in PUBLIC_UNDERSCORED
                and (node.attr not in ours or _root_name(node.value) in library_names)
            ):
                findings.append(f"{where}:{node.lineno} reads private attribute .{node.attr} of a library object")
            if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Attribute) and _root_name(target) in modules:
                        findings.append(f"{where}:{node.lineno} assigns to {ast.unparse(target)} (a library module)")
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg and _private(keyword.arg):
                        findings.append(f"{where}:{node.lineno} passes private keyword {keyword.arg}=")
                func = node.func
                if (
                    isinstance(func, ast.Attribute)
                    and func.attr == "setattr"
                    or (isinstance(func, ast.Name) and func.id == "setattr")
                ):
                    first = node.args[0] if node.args else None
                    if first is not None and _root_name(first) in library_names:
                        findings.append(
                            f"{where}:{node.lineno} sets an attribute of library object {ast.unparse(first)}"
                        )
                    if isinstance(first, ast.Constant) and isinstance(first.value, str) and _is_library(first.value):
                        findings.append(f"{where}:{node.lineno} patches {first.value}")
            if isinstance(node, ast.ClassDef):
                for base in node.bases:
                    root = _root_name(base)
                    if root not in library_names:
                        continue
                    name = ast.unparse(base)
                    if not name.endswith(SUBCLASSABLE):
                        module = library_names[root]
                        findings.append(f"{where}:{node.lineno} class {node.name} subclasses {module}'s {name}")
    return findings


def test_public_apis_only():
    assert library_api_findings() == []


def test_the_public_api_check_reports_what_it_promises():
    """One sample of each rule, and what it lets through, as the check parses a file."""
    sample = """
import pyarrow.parquet as pq
from botocore.exceptions import ClientError
from gevent.pywsgi import WSGIHandler
from prefect import flow
from gunicorn.workers import ggevent


class Handler(WSGIHandler):
    pass


class Worker(ggevent.GeventWorker):
    pass


class StorageFailed(ClientError):
    pass


pq.ParquetWriter._flush = None
ggevent.GeventWorker = Worker
flow(_sync=True)
print(flow._private_state)
"""
    found = library_api_findings([("sample.py", ast.parse(sample))])
    assert sorted(found, key=lambda line: int(line.split(":")[1].split()[0])) == [
        "sample.py:9 class Handler subclasses gevent.pywsgi's WSGIHandler",
        "sample.py:13 class Worker subclasses gunicorn.workers's ggevent.GeventWorker",
        "sample.py:21 assigns to pq.ParquetWriter._flush (a library module)",
        "sample.py:21 reads private attribute ._flush of a library object",
        "sample.py:22 assigns to ggevent.GeventWorker (a library module)",
        "sample.py:23 passes private keyword _sync=",
        "sample.py:24 reads private attribute ._private_state of a library object",
    ]  # and nothing for StorageFailed: exceptions are made to be subclassed


def test_the_batch_package_stays_readable_in_one_sitting():
    """ride_duration/batch/ at most 1,200 lines: its jobs split by module, no dead code kept."""
    lines = sum(len(path.read_text().splitlines()) for path in (PACKAGE / "batch").glob("*.py"))
    assert lines <= 1200, f"ride_duration/batch/ has {lines} lines"
