"""The package's import structure: no circle, counting every import (a deferred one inside a function too, which
would only hide it), and at most 10 floors (a module's floor: one above the highest it imports)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gpt2repro"
MAX_FLOORS = 10


def imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports, anywhere in its text."""
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in modules:
        deps = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "gpt2repro":
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gpt2repro."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("gpt2repro.")}
        graph[name] = deps & modules - {name}
    return graph


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor; an AssertionError names the first circle found."""
    floor: dict[str, int] = {}

    def visit(name: str, path: tuple[str, ...]) -> int:
        assert name not in path, "import circle: " + " -> ".join(path[path.index(name) :] + (name,))
        if name not in floor:
            floor[name] = 1 + max((visit(dep, path + (name,)) for dep in graph[name]), default=0)
        return floor[name]

    for name in graph:
        visit(name, ())
    return floor


def test_no_import_circle_and_at_most_ten_floors():
    floor = floors(imports())
    assert max(floor.values()) <= MAX_FLOORS, sorted(floor.items(), key=lambda kv: -kv[1])[:4]


def test_the_check_finds_a_circle_hidden_in_a_function():
    graph = {"metrics": {"references"}, "references": set(), "tune": {"train"}, "train": {"metrics"}}
    floors(graph)  # no circle
    graph["metrics"].add("tune")  # metrics importing tune.Forecast inside a method, as it once did
    try:
        floors(graph)
    except AssertionError as e:
        assert "metrics -> tune -> train -> metrics" in str(e)
    else:
        raise AssertionError("the circle was not found")
