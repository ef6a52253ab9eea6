"""The shape a reader meets: no import circle among the project's modules, no function longer than 80 lines."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for p in [*ROOT.glob("*.py"), *ROOT.glob("eval/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("benchmarks/gpu_check/*.py"),
                             *ROOT.glob("launch/*.py")])


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] + (rel.parts[-1],)) if rel.parts[-1] != "__init__" else ".".join(rel.parts[:-1])


def project_imports(path: Path, names: set[str]) -> set[str]:
    """Project modules that `path` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in names:
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in names}
    return found


def test_no_import_circle():
    names = {module_name(p) for p in SOURCES}
    graph = {module_name(p): project_imports(p, names) - {module_name(p)} for p in SOURCES}
    assert "curate" not in graph["data"] and "data" not in graph["curate"]
    importers = [m for m, deps in graph.items() if "train" in deps and not m.startswith(("benchmarks.", "launch."))]
    assert not importers, f"nothing but the benchmarks and launchers imports train.py: {importers}"
    state = {}

    def visit(m, path):
        state[m] = "open"
        for dep in sorted(graph[m]):
            assert state.get(dep) != "open", "import circle: " + " -> ".join(path + [m, dep])
            if dep not in state:
                visit(dep, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_no_function_over_80_lines():
    long = []
    for path in [*SOURCES, *ROOT.glob("tests/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)
